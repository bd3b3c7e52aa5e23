import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import pandas as pd
import pytest
from click.testing import CliRunner

from mhmd_builder.cli import main
from mhmd_builder.extract import ExtractSettings, ExtractStage, _stopped_early, extract, frame_id, plan_movies
from mhmd_builder.logs import LOG_NAME
from mhmd_builder.tables import MANIFEST_COLUMNS
from mhmd_builder.media import Sampling, cuda_decoding_problem
from mhmd_builder.runners import LocalRunner
from mhmd_builder.stages import Partition, run_partition
from mhmd_builder.workdir import WorkDir

from conftest import INTERRUPTIBLE_MHMD, ffmpeg, ffprobe_pts, first_at_or_after, make_movie


def run_cli(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def export(workdir: Path) -> pd.DataFrame:
    out = workdir / "manifest.parquet"
    assert run_cli("manifest", "export", "-w", workdir, "-o", out).exit_code == 0
    return pd.read_parquet(out)


def test_extract_records_every_sampled_frame_and_writes_kept_jpegs(tmp_path, movie_factory):
    movie_factory("a.mp4", seconds=3, size="320x240")
    movie_factory("b.mkv", seconds=2, size="320x240")
    work = tmp_path / "work"
    result = run_cli("extract", movie_factory.folder, "-w", work, "--fps", 2, "--max-side", 160)
    assert result.exit_code == 0, result.output
    assert "2 movies extracted, 0 failed" in result.output
    frames = export(work)
    assert list(frames.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert len(frames) == 10 and frames.frame_id.is_unique
    assert frames.persons.isna().all() and frames.label.isna().all() and frames.split.isna().all()
    assert (frames.width == 160).all() and (frames.height == 120).all()
    for row in frames.itertuples():
        assert row.frame_id == f"{row.movie_id}_{round(row.timestamp * 1000)}"
        jpeg = work / row.jpeg if row.kept else None
        if row.kept:
            assert cv2.imread(str(jpeg)).shape == (120, 160, 3)
        else:
            assert row.jpeg is None and row.reject_reason
    status = run_cli("status", "-w", work, "--json")
    report = __import__("json").loads(status.output)["extract"]
    assert report["partitions"] == {"done": 2, "failed": 0, "pending": 0}
    assert report["frames_in"] == 10 and report["frames_out"] == int(frames.kept.sum())


def test_frame_ids_past_a_thousand_seconds_keep_the_millisecond(tmp_path, movie_factory):
    """A frame at 1234.607 s is `<movie>_1234607`, not the `_1234610` that ffmpeg 5.1's printed
    time (6 significant digits) gave."""
    movie_factory("late.mp4", seconds=0.4, vf="settb=1/1000,setpts='if(eq(N,0),0,1234.567+N*0.04)/TB'",
                  extra=["-fps_mode", "vfr", "-enc_time_base", "1/1000", "-video_track_timescale", "1000"])
    work = tmp_path / "work"
    assert run_cli("extract", movie_factory.folder, "-w", work, "--fps", 1).exit_code == 0
    frames = export(work)
    assert sorted(frames.timestamp) == pytest.approx([0.0, 1234.607], abs=1e-9)
    assert sorted(frames.frame_id) == sorted(f"{frames.movie_id[0]}_{ms}" for ms in (0, 1234607))


def test_rerun_skips_done_movies(tmp_path, movie_factory):
    movie_factory("a.mp4", seconds=2)
    work = WorkDir(tmp_path / "work")
    first = extract([movie_factory.folder], work, runner=LocalRunner(1))
    marker = work.parts_dir("extract") / f"{first[0].movie_id}.done"
    stamp = marker.stat().st_mtime_ns
    second = extract([movie_factory.folder], work, runner=LocalRunner(1))
    assert [o.status for o in first] == ["done"] and [o.status for o in second] == ["skipped"]
    assert marker.stat().st_mtime_ns == stamp


def test_rerun_with_other_settings_is_refused(tmp_path, movie_factory):
    movie_factory("a.mp4", seconds=2)
    work = tmp_path / "work"
    assert run_cli("extract", movie_factory.folder, "-w", work).exit_code == 0
    result = run_cli("extract", movie_factory.folder, "-w", work, "--fps", 2, "--max-side", 100)
    assert result.exit_code == 1
    assert "was extracted with other settings (max_side, sampling)" in result.output
    assert run_cli("extract", movie_factory.folder, "-w", work).exit_code == 0
    redo = run_cli("extract", movie_factory.folder, "-w", work, "--fps", 2, "--redo")
    assert redo.exit_code == 0 and len(export(work)) == 4  # 2 s at 2 fps, replacing the 1 fps rows


def test_bad_inputs_are_recorded_as_failed_and_the_rest_finishes(tmp_path, movie_factory):
    folder = movie_factory.folder
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("not a movie at all\n" * 50)
    ffmpeg("-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac", str(folder / "audio only.mp4"))
    whole = make_movie(tmp_path / "whole.mp4", seconds=4)  # moov atom at the end: cut, it is unreadable
    (folder / "truncated.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    stream = make_movie(tmp_path / "stream.ts", seconds=8, extra=["-f", "mpegts"])
    (folder / "truncated stream.ts").write_bytes(stream.read_bytes()[: stream.stat().st_size // 2])
    movie_factory("Der Untergang. (2004) – Ära.mp4", seconds=2)
    movie_factory("10bit.mkv", seconds=2, codec=["-c:v", "libx264", "-pix_fmt", "yuv420p10le"])
    movie_factory("odd size.mp4", seconds=2, vf="scale=161:121", codec=["-c:v", "libx264", "-pix_fmt", "yuv444p"])
    movie_factory("vfr.mp4", seconds=1.5, vf="setpts='if(lt(N,25),N/25,1+(N-25)/4)/TB'", extra=["-fps_mode", "vfr"])
    plain = make_movie(tmp_path / "plain.mp4", seconds=2, size="320x180")
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(folder / "phone.mp4"))

    work = tmp_path / "work"
    result = run_cli("extract", folder, "-w", work, "--workers", 2)
    assert result.exit_code == 1
    failed = {line.split(": ")[0].split("/")[-1]: line for line in result.output.splitlines() if line.startswith("FAILED")}
    assert set(failed) == {"empty.mp4", "notes.mp4", "audio only.mp4", "truncated.mp4"}
    assert "empty file" in failed["empty.mp4"] and "no video stream" in failed["audio only.mp4"]
    assert "not a readable movie" in failed["notes.mp4"] and "moov atom not found" in failed["truncated.mp4"]
    assert "6 movies extracted, 4 failed" in result.output

    wd = WorkDir(work)
    done = {Path(s["path"]).name: s for s in wd.done("extract").values()}
    assert set(done) == {"Der Untergang. (2004) – Ära.mp4", "10bit.mkv", "odd size.mp4", "vfr.mp4", "phone.mp4",
                         "truncated stream.ts"}
    assert done["phone.mp4"]["frame_size"] == [180, 320]
    assert done["vfr.mp4"]["frames_in"] == 5  # 25 fps up to 1 s, then 4 fps up to 4.0 s: slots 0..4
    assert done["truncated stream.ts"]["frames_in"] in range(3, 7)
    assert all(s["frames_in"] >= 2 for s in done.values())
    assert wd.failed("extract") and all("\n" not in f["reason"] for f in wd.failed("extract").values())
    frames = export(work)
    assert frames.frame_id.is_unique and not frames.frame_id.str.contains(r"[ .]").any()
    status = run_cli("status", "-w", work)
    assert "extract        6       4        0" in status.output


@pytest.mark.timeout(300)  # a FIFO opened for reading would block for ever
def test_hostile_inputs_are_refused_and_the_rest_finishes(tmp_path, playlists, special_files):
    folder = playlists["hls"].parent  # also holds the concat list and a link to the folder of the movie they reach
    make_movie(folder / "good.mp4", seconds=2)
    os.mkfifo(folder / "pipe.mp4")  # in a folder: skipped, never opened
    named = [special_files / name for name in ("fifo.mp4", "socket.mp4", "broken.mp4", "loop.mp4")]
    work = tmp_path / "work"
    result = run_cli("extract", folder, *named, "-w", work, "--workers", 1)
    assert result.exit_code == 1
    failed = dict(line.removeprefix("FAILED   ").split(": ", 1) for line in result.output.splitlines()
                  if line.startswith("FAILED"))
    assert {Path(path).name: reason.split(",")[0] for path, reason in failed.items()} == {
        "holiday.mp4": "refused: an HLS playlist (hls)", "party.mkv": "refused: a concat file list (concat)",
        "fifo.mp4": "not a regular file (fifo)", "socket.mp4": "not a regular file (socket)",
        "broken.mp4": f"broken symbolic link (to {tmp_path / 'gone.mp4'})", "loop.mp4": "symbolic link loop"}
    assert "1 movies extracted, 6 failed" in result.output
    frames = export(work)
    assert len(frames) == 2 and frames.movie_id.str.startswith("good-").all()  # nothing of the movie elsewhere


def test_a_run_that_finds_no_movie_fails(tmp_path):
    (tmp_path / "x.mp4").mkdir()
    result = run_cli("extract", tmp_path / "x.mp4", "-w", tmp_path / "w")
    assert result.exit_code == 1 and f"{tmp_path / 'x.mp4'}: no movie files found" in result.output


def test_skip_head_and_tail_and_keyframes_through_the_cli(tmp_path, movie_factory):
    movie_factory("m.mp4", seconds=10, codec=["-c:v", "libx264", "-g", "50", "-sc_threshold", "0", "-pix_fmt", "yuv420p"])
    work = tmp_path / "work"
    assert run_cli("extract", movie_factory.folder, "-w", work, "--skip-head", 2, "--skip-tail", 3).exit_code == 0
    assert export(work).timestamp.tolist() == pytest.approx([2, 3, 4, 5, 6])
    work2 = tmp_path / "work2"
    assert run_cli("extract", movie_factory.folder, "-w", work2, "--keyframes").exit_code == 0
    assert export(work2).timestamp.tolist() == pytest.approx([0, 2, 4, 6, 8])
    too_much = run_cli("extract", movie_factory.folder, "-w", tmp_path / "w3", "--skip-head", 6, "--skip-tail", 5)
    assert too_much.exit_code == 1 and "leave nothing of this 10.0 s movie" in too_much.output


def test_letterboxed_movie_is_cropped(tmp_path, movie_factory):
    movie_factory("scope.mp4", seconds=2, size="320x136", vf="pad=320:240:0:52:black")
    work = WorkDir(tmp_path / "work")
    (outcome,) = extract([movie_factory.folder], work, ExtractSettings(max_side=None), LocalRunner(1))
    assert outcome.summary["crop"]["w"] == 320 and abs(outcome.summary["crop"]["h"] - 136) <= 4
    frames = work.read_table("extract")
    assert (frames.height <= 136).all()


def test_missing_input_is_a_usage_error(tmp_path):
    result = run_cli("extract", tmp_path / "nope.mp4", "-w", tmp_path / "w")
    assert result.exit_code == 1 and "nope.mp4: no such file or directory" in result.output


MHMD = [sys.executable, "-m", "mhmd_builder.cli"]


def four_films_extracted_once(tmp_path, movie_factory, workers: int) -> tuple[list[str], Path]:
    """The extract arguments for four films (not four copies of one: a copy would be one movie),
    and a work directory where they were extracted without interruption."""
    for i in range(4):
        movie_factory(f"m{i}.mp4", seconds=8, size="320x240", rate=25, vf=f"hue=h={90 * i}")
    args = ["extract", str(movie_factory.folder), "--fps", "25", "--workers", str(workers)]
    reference = tmp_path / "reference"
    subprocess.run([*MHMD, *args, "-w", str(reference)], check=True, capture_output=True)
    return args, reference


def assert_resumed_as_never_interrupted(work: Path, reference: Path, args: list[str]) -> None:
    """The same command run again completes the work directory to what an uninterrupted run made."""
    subprocess.run([*MHMD, *args, "-w", str(work)], check=True, capture_output=True)
    ours, theirs = export(work), export(reference)
    assert ours.frame_id.is_unique
    columns = ["frame_id", "timestamp", "kept", "reject_reason"]
    pd.testing.assert_frame_equal(ours[columns], theirs[columns])
    jpegs = sorted(p.relative_to(work) for p in work.glob("frames/*/*.jpg"))
    assert jpegs == sorted(p.relative_to(reference) for p in reference.glob("frames/*/*.jpg"))
    assert len(jpegs) == int(ours.kept.sum())


@pytest.mark.parametrize("chunks,writing,recorded", [
    # whole films: a film's JPEGs are written to its staging folder, its table committed at its end
    ("0", "extract/tmp/*/frames/*.jpg", "extract/parts/*.done"),
    # the default, a run of chunks per film (one chunk each here): a chunk's JPEGs are written to its
    # own folder, its records committed at its end, and the film joined right after
    ("60", "extract/chunks/frames/*/*.jpg", "extract/chunks/parts/*.done"),
])
def test_killed_run_resumes_with_no_frame_lost_or_duplicated(tmp_path, movie_factory, chunks, writing, recorded):
    args, reference = four_films_extracted_once(tmp_path, movie_factory, workers=1)
    args += ["--chunk-seconds", chunks]
    work = tmp_path / "work"
    proc = subprocess.Popen([*MHMD, *args, "-w", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60

    def being_written() -> set[str]:  # films (or chunks) with JPEGs written and no record yet
        folders = {p.parent.name if chunks != "0" else p.parents[1].name for p in work.glob(writing)}
        return folders - {p.name.removesuffix(".done") for p in work.glob(recorded)}

    while not being_written() or not list(work.glob("extract/parts/*.done")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-movie, after at least one movie was committed
    proc.wait()
    done_at_kill = len(list(work.glob("extract/parts/*.done")))
    assert 1 <= done_at_kill < 4
    assert_resumed_as_never_interrupted(work, reference, args)
    assert not list((work / "extract" / "tmp").glob("*"))


def test_shared_sample_videos_extract_at_the_right_times(tmp_path, shared_samples):
    work = WorkDir(tmp_path / "work")
    outcomes = extract([shared_samples / "videos"], work, runner=LocalRunner(2))
    assert {o.status for o in outcomes} == {"done"}
    frames = work.read_table("extract")
    by_movie = frames.groupby("movie_id").timestamp.apply(list)
    for name, movie in [("dancer", "dancer.avi"), ("vtest", "vtest_pets2009_480x360_h264.avi")]:
        ours = next(v for k, v in by_movie.items() if k.startswith(f"{name}-"))
        assert ours == pytest.approx(first_at_or_after(ffprobe_pts(shared_samples / "videos" / movie), 1.0))
        assert len(ours) in (63, 80)  # 62.88 s and 79.5 s long
    shutil.rmtree(work.root)


def test_shared_sample_videos_keyframes_are_the_streams_key_frames(tmp_path, shared_samples):
    movie = shared_samples / "videos" / "dancer.avi"
    work = WorkDir(tmp_path / "work")
    extract([movie], work, ExtractSettings(sampling=Sampling("keyframes")), LocalRunner(1))
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-skip_frame", "nokey", "-show_entries",
                          "frame=best_effort_timestamp_time", "-of", "csv=p=0", str(movie)],
                         capture_output=True, text=True, check=True).stdout
    keys = [float(t) for t in out.split()]
    assert len(keys) > 100
    assert work.read_table("extract").timestamp.tolist() == pytest.approx(keys)


def test_two_copies_in_one_run_are_one_movie(tmp_path, movie_factory):
    original = movie_factory("a.mp4", seconds=2)
    shutil.copy(original, movie_factory.folder / "b copy.mkv")
    work = tmp_path / "work"
    result = run_cli("extract", movie_factory.folder, "-w", work)
    assert result.exit_code == 0, result.output
    (movie,) = WorkDir(work).done("extract")
    assert f"same     {movie_factory.folder / 'b copy.mkv'}: same footage as {movie} (not extracted again)" \
        in result.output
    assert "1 movies extracted, 0 failed, 1 with the same footage as another file" in result.output
    assert WorkDir(work).planned("extract") == {movie: {"path": str(original), "content_hash": movie.split("-")[-1],
                                                        "copies": [str(movie_factory.folder / "b copy.mkv")]}}
    assert list((work / "frames").iterdir()) == [work / "frames" / movie]


def test_a_renamed_or_copied_film_keeps_its_movie_id_and_is_not_extracted_again(tmp_path, movie_factory):
    original = movie_factory("a.mp4", seconds=2)
    work = WorkDir(tmp_path / "work")
    (first,) = extract([movie_factory.folder], work, runner=LocalRunner(1))
    frames = work.read_table("extract").frame_id.tolist()
    marker = work.parts_dir("extract") / f"{first.movie_id}.done"
    stamp = marker.stat().st_mtime_ns
    # A work directory of an earlier version recorded no content hash: the id's suffix is the hash.
    plan = work.stage_dir("extract") / "plan" / f"{first.movie_id}.json"
    plan.write_text(json.dumps({"path": str(original)}))

    renamed = tmp_path / "elsewhere" / "Another title (1950).mkv"
    renamed.parent.mkdir()
    original.rename(renamed)
    shutil.copy(renamed, renamed.parent / "z copy.mp4")
    outcomes = extract([renamed.parent], work, runner=LocalRunner(1))
    assert sorted((o.movie_id, o.status) for o in outcomes) == [(first.movie_id, "copy"), (first.movie_id, "skipped")]
    assert marker.stat().st_mtime_ns == stamp and list(work.done("extract")) == [first.movie_id]
    assert work.read_table("extract").frame_id.tolist() == frames
    assert work.planned("extract")[first.movie_id]["path"] == str(renamed)


def test_ctrl_c_stops_in_one_line_and_the_rerun_resumes(tmp_path, movie_factory):
    args, reference = four_films_extracted_once(tmp_path, movie_factory, workers=2)
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, *INTERRUPTIBLE_MHMD, *args, "-w", str(work)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(work.glob("extract/chunks/progress/*.json")):  # runs of a film's chunks (a run per film here)
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # stderr is a pipe: the progress comes as plain lines, the last one where the run stopped
    *progress, last = err.strip().splitlines()
    assert out == "" and last == "interrupted: rerun the same command to resume"
    assert progress and all(re.fullmatch(r"extract/chunks: [0-3]/4 partitions, 0 failed", line) for line in progress)
    assert "ERROR interrupted" in (work / LOG_NAME).read_text()
    assert not [p for p in work.rglob("*") if ".tmp" in p.name]
    assert_resumed_as_never_interrupted(work, reference, args)


@pytest.mark.parametrize("seconds,frame", [(0.0, "m_0"), (1.0004, "m_1000"), (1.0006, "m_1001"), (1.0015, "m_1002"),
                                           (2.9995, "m_3000"), (59.9996, "m_60000"), (3600.0004, "m_3600000")])
def test_frame_ids_are_the_timestamp_rounded_to_the_millisecond(seconds, frame):
    assert frame_id("m", seconds) == frame


# -- where ffmpeg decodes (--decoder) ---------------------------------------------------------------
needs_no_cuda = pytest.mark.skipif(cuda_decoding_problem() is None, reason="needs a machine where ffmpeg has no CUDA")


@needs_no_cuda
def test_decoder_cuda_without_a_gpu_is_one_line_before_any_movie(tmp_path, movie_factory):
    movie_factory("a.mp4", seconds=1)
    result = run_cli("extract", movie_factory.folder, "-w", tmp_path / "work", "--decoder", "cuda")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("Error: --decoder cuda: ffmpeg cannot open a CUDA device on this machine (")
    assert result.output.rstrip().endswith("): use --decoder cpu or auto")
    assert not (tmp_path / "work" / "extract" / "plan").exists()


@needs_no_cuda
def test_decoder_auto_decodes_on_the_cpu_here_and_records_it(tmp_path, movie_factory):
    movie_factory("a.mp4", seconds=2)
    cpu, auto = WorkDir(tmp_path / "cpu"), WorkDir(tmp_path / "auto")
    extract([movie_factory.folder], cpu, ExtractSettings(decoder="cpu"), LocalRunner(1))
    [outcome] = extract([movie_factory.folder], auto, ExtractSettings(decoder="auto"), LocalRunner(1))
    assert outcome.summary["decoder"] == "cpu" and outcome.summary["warnings"] == []
    assert cpu.read_table("extract").jpeg_xxh3.tolist() == auto.read_table("extract").jpeg_xxh3.tolist()
    # The decoder is not a setting a done movie must share: resuming with another one skips it.
    [again] = extract([movie_factory.folder], auto, ExtractSettings(decoder="cpu"), LocalRunner(1))
    assert again.status == "skipped"


def gpu_stage(work: WorkDir, decoder: str, movie: Path) -> tuple[ExtractStage, Partition]:
    """A stage whose worker found a GPU, on this machine where ffmpeg's `-hwaccel cuda` really fails:
    the failure a film the GPU cannot decode meets."""
    stage = ExtractStage(work, ExtractSettings(decoder=decoder))
    # Under Ray: a share of a GPU for each film with cuda (films share a GPU); none with auto.
    assert stage.resources.gpus == (1 / 8 if decoder == "cuda" else 0)
    stage.decoder = "cuda"  # as setup() resolves it where ffmpeg opens a GPU
    [partition], _ = plan_movies(work, [movie])
    return stage, partition


@needs_no_cuda
def test_a_film_the_gpu_cannot_decode_is_recorded_failed_in_one_line_with_decoder_cuda(tmp_path, movie_factory):
    work = WorkDir(tmp_path / "work")
    stage, partition = gpu_stage(work, "cuda", movie_factory("a.mp4", seconds=1))
    result = run_partition(stage, partition, lambda *_: None)
    assert not result.ok
    assert re.fullmatch(r"GPU decoding failed \(ffmpeg exit \d+\): .+: use --decoder cpu or auto", result.reason)
    assert "\n" not in result.reason and "traceback" not in result.summary
    assert work.failed("extract")[partition.id]["reason"] == result.reason


@needs_no_cuda
def test_a_film_the_gpu_cannot_decode_is_decoded_on_the_cpu_with_decoder_auto(tmp_path, movie_factory, caplog):
    movie = movie_factory("a.mp4", seconds=2)
    cpu = WorkDir(tmp_path / "cpu")
    extract([movie], cpu, ExtractSettings(decoder="cpu"), LocalRunner(1))
    work = WorkDir(tmp_path / "work")
    stage, partition = gpu_stage(work, "auto", movie)
    summary = stage.process(partition, lambda *_: None)
    assert summary["decoder"] == "cpu"
    [warning] = summary["warnings"]
    assert warning.startswith("GPU decoding failed (ffmpeg exit ") and warning.endswith("; decoded on the CPU")
    assert f"{partition.id}: GPU decoding failed" in caplog.text and "the CPU decodes it" in caplog.text
    assert work.read_table("extract").jpeg_xxh3.tolist() == cpu.read_table("extract").jpeg_xxh3.tolist()


@pytest.mark.parametrize("decoder", ["cuda", "auto"])
def test_a_codec_nvdec_lacks_fails_or_is_decoded_on_the_cpu_without_asking_the_gpu(tmp_path, movie_factory, decoder):
    """FFV1: ffmpeg's decoder has no CUDA path, and -hwaccel cuda would decode it on the CPU without a
    word: it is told from the probe, on any machine."""
    movie = movie_factory("lossless.mkv", seconds=1, codec=["-c:v", "ffv1"])
    work = WorkDir(tmp_path / "work")
    stage, partition = gpu_stage(work, decoder, movie)
    result = run_partition(stage, partition, lambda *_: None)
    if decoder == "cuda":
        assert not result.ok and result.reason == "NVDEC cannot decode ffv1: use --decoder cpu or auto"
    else:
        assert result.ok and result.summary["decoder"] == "cpu"
        assert result.summary["warnings"] == ["NVDEC cannot decode ffv1; decoded on the CPU"]


# Key frames every 8 s and nowhere else (25 fps): the last of a 30 s film at 24 s, 6 s before its end.
GOP_8S = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-x264-params", "keyint=200:min-keyint=200:scenecut=0"]


def test_key_frames_far_apart_are_not_taken_for_a_truncated_file_and_a_cut_file_still_is(tmp_path):
    """The last key frame 6 s before the end is where key-frame sampling ends (a film of 30 s warned
    when its last frame lay over 5 s before the end), undivided or in chunks; the same film cut at 40%
    of its bytes still stops at 8 s."""
    film = make_movie(tmp_path / "film.mp4", seconds=30, codec=GOP_8S, extra=["-movflags", "+faststart"])
    settings = ExtractSettings(sampling=Sampling("keyframes"))
    for chunk_seconds in (None, 10.0):
        work = tmp_path / f"work-{chunk_seconds}"
        [outcome] = extract([film], work, replace(settings, chunk_seconds=chunk_seconds))
        assert outcome.status == "done" and outcome.summary["warnings"] == []
        assert WorkDir(work).read_table("extract")["timestamp"].tolist() == [0.0, 8.0, 16.0, 24.0]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(film.read_bytes()[: int(film.stat().st_size * 0.4)])
    [outcome] = extract([cut], tmp_path / "cut", settings)
    assert outcome.summary["warnings"] == ["decoding stopped at 8.0 s of 30.0 s (truncated file?)"]


@pytest.mark.parametrize("times,end,warns", [
    ([0.0, 8.0, 16.0, 24.0], 36.0, False), ([0.0, 8.0, 16.0, 24.0], 36.1, True),  # 1.5 gaps of 8 s: 12 s
    ([i / 2 for i in range(41)], 25.0, False), ([i / 2 for i in range(41)], 25.1, True),  # at least 5 s
    ([0.0, 1.0], 1000.0, True), ([0.0, 1.0], None, False),  # no known end: nothing to judge
])
def test_a_film_is_taken_for_truncated_past_5_s_and_one_and_a_half_sampling_gaps_after_its_last_frame(times, end, warns):
    assert bool(_stopped_early(times, end, end or 0.0)) == warns
