"""extract --chunk-seconds: a film decoded in time ranges gives the rows, JPEGs and shards of an
undivided extract, duplicate runs included, and a killed run loses one chunk at most."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from mhmd_builder.cli import main
from mhmd_builder import extract as extract_module
from mhmd_builder.extract import (CHUNKS, ChunkStage, ExtractSettings, chunk_frames_dir, chunk_runs, extract,
                                  film_geometry, film_parts)
from mhmd_builder.errors import InputError
from mhmd_builder.media import Sampling
from mhmd_builder.runners import LocalRunner
from mhmd_builder.stages import Partition
from mhmd_builder.workdir import WorkDir

from conftest import Terminal, make_movie

MHMD = [sys.executable, "-m", "mhmd_builder.cli"]
# Frames 3 s to 7 s frozen (at 25 fps): one duplicate run across the border at 5 s of 2.5 s chunks.
FREEZE = "split[a][b];[a][b]freezeframes=first=75:last=175:replace=75"

GOP_1S = ["-c:v", "libx264", "-g", "25", "-pix_fmt", "yuv420p", "-preset", "ultrafast"]  # a key frame a second
# Key frames at whole seconds and nowhere else, with B-frames; and a film with one key frame.
B_FRAMES = ["-c:v", "libx264", "-preset", "veryfast", "-bf", "2", "-pix_fmt", "yuv420p"]
GOP_1S_B = [*B_FRAMES, "-x264-params", "keyint=25:min-keyint=25:scenecut=0"]
ONE_KEY_FRAME = [*B_FRAMES, "-x264-params", "keyint=infinite:scenecut=0"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def rows(work: Path) -> pd.DataFrame:
    """Every column: the frames' records and all their scores."""
    return WorkDir(work).read_table("extract")


def jpegs(work: Path) -> dict[str, bytes]:
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.glob("frames/*/*.jpg"))}


def assert_same_extract(ours: Path, reference: Path) -> None:
    pd.testing.assert_frame_equal(rows(ours), rows(reference), check_exact=True)
    assert jpegs(ours) == jpegs(reference)
    chunks = ours / "extract" / "chunks"
    assert not [*chunks.glob("parts/*"), *chunks.glob("frames/*")]  # joined, then removed


@pytest.mark.parametrize("name,options,chunks", [
    ("film.mp4", ["--fps", "2", "--skip-head", "0.3"], 5),
    ("film.mkv", ["--keyframes"], 5),
    ("film.ts", ["--fps", "2"], 1),  # MPEG-TS seeks land a key frame off: one chunk, still the same frames
])
def test_chunked_extract_gives_the_rows_jpegs_and_shards_of_an_undivided_one(tmp_path, name, options, chunks):
    film = make_movie(tmp_path / name, seconds=12, size="320x240", vf=FREEZE, codec=GOP_1S)
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    assert run_cli("extract", film, "-w", whole, *options).exit_code == 0
    result = run_cli("extract", film, "-w", chunked, *options, "--chunk-seconds", 2.5, "--workers", 2)
    assert result.exit_code == 0, result.output
    assert_same_extract(chunked, whole)
    [summary] = WorkDir(chunked).done("extract").values()
    assert summary["chunks"] == chunks
    # The frozen run from 3 s to 7 s crosses the border at 5 s: one frame of it at most is kept, not
    # one on each side as runs decided chunk by chunk would keep.
    frozen = rows(chunked).query("3 <= timestamp < 7")
    assert len(frozen) >= 4 and frozen.kept.sum() <= 1 and set(frozen.reject_reason.dropna()) == {"duplicate"}
    assert_same_shards(chunked, whole)


def assert_same_shards(ours: Path, reference: Path) -> None:
    for work in (ours, reference):
        assert run_cli("shard", "-w", work, "-o", work.with_name(f"{work.name}-shards")).exit_code == 0
    tars = sorted(reference.with_name(f"{reference.name}-shards").glob("*.tar"))
    assert tars and [t.read_bytes() for t in tars] == [
        (ours.with_name(f"{ours.name}-shards") / t.name).read_bytes() for t in tars]


@pytest.mark.parametrize("name,codec,sampling,skip_head,borders", [
    # A key frame on the first frame of every other 1 s slot (a plain border a frame before it):
    # each border moves a slot past it, where the chunk's seek lands on it.
    ("film.mp4", GOP_1S, Sampling("fps", 1.0), 0.0, [3, 5, 7, 9, 11]),
    # From 0.001 s, every slot starts exactly on a frame and the plain borders exactly on key frames:
    # each moves a slot on, and the frame on a slot's border is that slot's in every chunk.
    ("film.mp4", GOP_1S, Sampling("fps", 1.0), 0.001, [3, 5, 7, 9, 11]),
    # Plain borders 0.1 s past the key frames: too close for ffmpeg's seek by decoding time in
    # Matroska (SEEK_SLACK), so each moves a slot on.
    ("film.mkv", GOP_1S_B, Sampling("fps", 2.0), 0.1, [5, 9, 13, 17, 21]),
    # One key frame, over half a chunk before every border: plain borders.
    ("film.mp4", ONE_KEY_FRAME, Sampling("fps", 1.0), 0.0, [2, 4, 6, 8, 10]),
])
def test_borders_after_key_frames_give_the_rows_jpegs_and_shards_of_an_undivided_extract(
        tmp_path, name, codec, sampling, skip_head, borders):
    film = make_movie(tmp_path / name, seconds=12, size="320x240", vf=FREEZE, codec=codec)
    settings = ExtractSettings(sampling=sampling, skip_head=skip_head, chunk_seconds=2.0)
    parts = film_parts(film_geometry(film, settings), settings, film)
    assert [p.first for p in parts] == [None, *borders]
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    extract([film], whole, replace(settings, chunk_seconds=None), LocalRunner(1))
    extract([film], chunked, settings, LocalRunner(1))
    assert_same_extract(chunked, whole)
    assert_same_shards(chunked, whole)


def chunk(movie: str, k: int) -> Partition:
    return Partition(f"{movie}@{k}", {"movie_id": movie, "part": [k or None, k + 1]}, {"path": movie})


def test_runs_are_consecutive_chunks_of_one_film_an_even_share_of_them_each():
    pending = [chunk("a", k) for k in (0, 1, 2, 4, 5)] + [chunk("b", k) for k in (0, 1, 2)]  # a@3: done before

    def runs(workers):
        return [[c.id for c in run.info["chunks"]] for run in chunk_runs(pending, workers)]

    assert runs(1) == [["a@0", "a@1", "a@2"], ["a@4", "a@5"], ["b@0", "b@1", "b@2"]]
    assert runs(3) == [["a@0", "a@1", "a@2"], ["a@4", "a@5"], ["b@0", "b@1", "b@2"]]
    assert runs(4) == [["a@0", "a@1"], ["a@2"], ["a@4", "a@5"], ["b@0", "b@1"], ["b@2"]]
    assert runs(8) == [[c.id] for c in pending]
    [run, *_] = chunk_runs(pending, 4)
    assert run.id == "a@1" and run.record == {"path": "a"}  # named after the chunk it commits last


@pytest.mark.parametrize("sampling,skip_head", [(Sampling("fps", 2.0), 0.3), (Sampling("keyframes"), 0.0)])
def test_a_run_of_chunks_records_each_chunk_as_its_own_ffmpeg_would(tmp_path, sampling, skip_head):
    """One ffmpeg for the run, each frame recorded in the chunk its slot (or time) lies in: the
    records of every chunk, rows and JPEGs, are those of the chunk decoded alone."""
    film = make_movie(tmp_path / "film.mkv", seconds=12, size="320x240", vf=FREEZE, codec=GOP_1S)
    settings = ExtractSettings(sampling=sampling, skip_head=skip_head, chunk_seconds=2.5)
    geometry = film_geometry(film, settings)
    movie = Partition("film-0123abcd", {"path": str(film), "content_hash": "0123abcd"})
    chunks = extract_module._chunk_partitions(movie, geometry, settings)
    assert len(chunks) == 5
    records = []
    for workers in (1, len(chunks)):  # one run of every chunk; a run of one chunk each
        work = WorkDir(tmp_path / f"work-{workers}")
        stage = ChunkStage(work, settings)
        stage.setup()
        for run in chunk_runs(chunks, workers):
            stage.process(run, lambda done, total: None)
        records.append([(work.read_partition(CHUNKS, c.id).to_pylist(),
                         sorted(p.name for p in chunk_frames_dir(work, c.id).iterdir())) for c in chunks])
    assert all(rows for rows, _ in records[0]) and records[0] == records[1]


class InOneProcess:
    """A runner that plans runs for `workers` workers and runs them one after the other here."""

    def __init__(self, workers: int):
        self.workers = workers

    def worker_count(self, stage):
        return self.workers

    def run(self, stage, partitions, on_result=None):
        return LocalRunner(1).run(stage, partitions, on_result)


def test_a_film_cut_short_gives_the_frames_and_warning_of_an_undivided_extract(tmp_path):
    """The file ends at 6.5 s of its 12: ffmpeg stops there without an error, in the run that holds
    it, and the runs after it get no frame; the join judges the film's end as an undivided decode does."""
    film = make_movie(tmp_path / "film.mp4", seconds=12, size="320x240", codec=GOP_1S, extra=["-movflags", "+faststart"])
    os.truncate(film, int(film.stat().st_size * 0.55))
    settings = ExtractSettings(sampling=Sampling("fps", 2.0))
    [whole] = extract([film], tmp_path / "whole", settings)
    assert whole.status == "done" and whole.summary["warnings"] == ["decoding stopped at 6.5 s of 12.0 s (truncated file?)"]
    for workers in (1, 3):  # one run; runs of two chunks, of which the last decodes nothing
        work = tmp_path / f"chunked-{workers}"
        [chunked] = extract([film], work, replace(settings, chunk_seconds=2.0), InOneProcess(workers))
        assert chunked.status == "done" and chunked.summary["warnings"] == whole.summary["warnings"]
        assert_same_extract(work, tmp_path / "whole")


def test_each_film_is_joined_as_soon_as_its_last_run_ends(tmp_path, monkeypatch):
    """Films are committed one by one as their runs end, not all after the last run: `status` counts
    them done, and a kill later keeps them."""
    (tmp_path / "films").mkdir()
    for name, hue in (("a", 0), ("b", 90)):  # two films, not two copies of one
        make_movie(tmp_path / "films" / f"{name}.mp4", seconds=4, size="320x240", vf=f"hue=h={hue}", codec=GOP_1S)
    events = []
    real_process, real_join = ChunkStage.process, extract_module.join_chunks
    monkeypatch.setattr(ChunkStage, "process", lambda self, run, progress: events.append(("run", run.id[0], len(
        run.info["chunks"]))) or real_process(self, run, progress))
    monkeypatch.setattr(extract_module, "join_chunks", lambda workdir, film, *rest: events.append(
        ("join", film.id[0], len(workdir.done("extract")))) or real_join(workdir, film, *rest))
    settings = ExtractSettings(sampling=Sampling("fps", 2.0), chunk_seconds=2.0)
    outcomes = extract([tmp_path / "films"], tmp_path / "work", settings, InOneProcess(1))
    assert [o.status for o in outcomes] == ["done", "done"]
    assert events == [("run", "a", 2), ("join", "a", 0), ("run", "b", 2), ("join", "b", 1)]


def test_on_a_file_system_without_hard_links_the_join_copies_the_jpegs(tmp_path, monkeypatch):
    """exFAT, FAT and some network mounts refuse link(2) with EPERM: the chunks' JPEGs are copied."""
    film = make_movie(tmp_path / "film.mp4", seconds=6, size="320x240", codec=GOP_1S)
    settings = ExtractSettings(sampling=Sampling("fps", 2.0))
    extract([film], tmp_path / "whole", settings)

    def refuse(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(target))

    monkeypatch.setattr(os, "link", refuse)
    [outcome] = extract([film], tmp_path / "chunked", replace(settings, chunk_seconds=2.0), InOneProcess(2))
    assert outcome.status == "done" and outcome.summary["chunks"] == 3
    assert_same_extract(tmp_path / "chunked", tmp_path / "whole")


def test_a_film_without_a_usable_key_frame_index_is_cut_at_plain_borders(tmp_path, monkeypatch):
    """key_frames_at's None: ffprobe failed, timed out or answered other than one key frame a time."""
    film = make_movie(tmp_path / "film.mp4", seconds=12, size="320x240", codec=GOP_1S)
    settings = ExtractSettings(sampling=Sampling("fps", 1.0), chunk_seconds=2.0)
    monkeypatch.setattr(extract_module, "key_frames_at", lambda *args: None)
    assert [p.first for p in film_parts(film_geometry(film, settings), settings, film)] == [None, 2, 4, 6, 8, 10]


def test_the_letterbox_is_decided_once_per_film(tmp_path, monkeypatch):
    """Every chunk crops the film's bars, found on frames spread over the whole film: a chunk alone
    (its frames all dark at the top) would crop more."""
    film = make_movie(tmp_path / "scope.mp4", seconds=6, size="320x240",
                      vf="drawbox=x=0:y=0:w=320:h=52:color=black:t=fill:enable='lt(t,3)',"
                         "drawbox=x=0:y=188:w=320:h=52:color=black:t=fill", codec=GOP_1S)
    work = WorkDir(tmp_path / "work")
    calls = []
    import mhmd_builder.extract as extract_module
    real = extract_module.detect_letterbox
    monkeypatch.setattr(extract_module, "detect_letterbox", lambda *a, **k: calls.append(a) or real(*a, **k))
    [outcome] = extract([film], work, ExtractSettings(max_side=None, chunk_seconds=2.0), LocalRunner(1))
    assert outcome.status == "done" and outcome.summary["chunks"] == 3 and len(calls) == 1
    assert outcome.summary["crop"] == {"x": 0, "y": 0, "w": 320, "h": 188}
    assert set(work.read_table("extract").height) == {188}


@pytest.mark.timeout(300)
def test_a_run_killed_inside_a_chunk_resumes_with_only_the_unfinished_chunks(tmp_path):
    film = make_movie(tmp_path / "long.mp4", seconds=16, size="320x240", vf=FREEZE, codec=GOP_1S)
    args = ["extract", str(film), "--fps", "25", "--chunk-seconds", "2", "--workers", "1"]
    reference = tmp_path / "reference"
    assert run_cli("extract", film, "-w", reference, "--fps", 25).exit_code == 0
    work = tmp_path / "work"
    chunks = work / "extract" / "chunks"
    proc = subprocess.Popen([*MHMD, *args, "-w", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    # inside a chunk: one chunk committed, the next one's JPEGs being written
    while len(list(chunks.glob("parts/*.done"))) < 2 or len(list(chunks.glob("frames/*/*.jpg"))) <= 2 * 50:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in chunks.glob("parts/*.done")}
    assert 2 <= len(done_at_kill) < 8
    status = json.loads(run_cli("status", "-w", work, "--json").output)["extract"]
    assert status["partitions"] == {"done": 0, "failed": 0, "pending": 1}  # one film, whatever its chunks

    # The rerun decodes the unfinished chunks only (one run, from the first of them): the chunks
    # done stay as they were until the join, which reads their records and removes them.
    real_join = extract_module.join_chunks
    kept_at_join = {}

    def join_chunks(workdir, film, films_chunks, settings):
        kept_at_join.update({p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in chunks.glob("parts/*.done")})
        return real_join(workdir, film, films_chunks, settings)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract_module, "join_chunks", join_chunks)
        again = run_cli(*args, "-w", work)
    assert again.exit_code == 0, again.output
    assert len(kept_at_join) == 8 and all(kept_at_join[name] == done_at_kill[name] for name in done_at_kill)
    assert_same_extract(work, reference)
    status = json.loads(run_cli("status", "-w", work, "--json").output)["extract"]
    assert status["partitions"] == {"done": 1, "failed": 0, "pending": 0}
    assert status["frames_in"] == len(rows(reference))



class Killed(Exception):
    """The run stopped (as a SIGKILL stops it) after some partitions."""


class KilledAfter:
    """A runner that runs the first `n` partitions it is given, then stops the run."""

    def __init__(self, n: int):
        self.n = n

    def worker_count(self, stage):
        return 100  # runs of one chunk each

    def run(self, stage, partitions, on_result=None):
        LocalRunner(1).run(stage, partitions[:self.n], on_result)
        raise Killed


def test_an_undivided_extract_after_a_killed_chunked_one_leaves_no_chunk_behind(tmp_path):
    """A chunked run stopped with two chunks done, then the film extracted whole: the chunks' records
    and JPEGs, which nothing would ever join, go once the film is done; a film not done keeps its
    chunks for a chunked run to come."""
    film = make_movie(tmp_path / "film.mp4", seconds=8, size="320x240", codec=GOP_1S)
    settings = ExtractSettings(sampling=Sampling("fps", 2.0), chunk_seconds=2.0)
    work, reference = tmp_path / "work", tmp_path / "reference"
    with pytest.raises(Killed):
        extract([film], work, settings, KilledAfter(2))
    chunks = work / "extract" / "chunks"
    assert len(list(chunks.glob("parts/*.done"))) == 2 and list(chunks.glob("frames/*/*.jpg"))
    (chunks / "frames" / "broken-0123abcd@000000").mkdir()  # a chunk of a film not done: kept
    extract([film], work, replace(settings, chunk_seconds=None), LocalRunner(1))
    extract([film], reference, replace(settings, chunk_seconds=None), LocalRunner(1))
    assert sorted(p.name for p in chunks.glob("frames/*")) == ["broken-0123abcd@000000"]
    (chunks / "frames" / "broken-0123abcd@000000").rmdir()
    assert_same_extract(work, reference)

def test_chunk_seconds_must_be_positive_and_not_with_scene_cuts(tmp_path):
    film = make_movie(tmp_path / "a.mp4", seconds=1)
    for bad in ("-5", "nan"):
        result = run_cli("extract", film, "-w", tmp_path / "w", "--chunk-seconds", bad)
        assert result.exit_code == 2 and "--chunk-seconds" in result.output
    scenes = run_cli("extract", film, "-w", tmp_path / "w", "--scenes", "--chunk-seconds", 60)
    assert scenes.exit_code == 1 and scenes.output.count("\n") == 1
    assert scenes.output.startswith("Error: --chunk-seconds: scene-cut sampling (--scenes) cannot be cut into chunks")
    with pytest.raises(InputError, match=r"^--chunk-seconds: -1 is not in the range 0 <= x$"):
        extract([film], tmp_path / "w", ExtractSettings(chunk_seconds=-1))
    with pytest.raises(InputError, match="scene-cut sampling"):
        extract([film], tmp_path / "w", ExtractSettings(sampling=Sampling("scenes"), chunk_seconds=10))
    assert not (tmp_path / "w" / "extract").exists()


def test_the_films_probed_before_any_chunk_is_decoded_go_by_on_a_bar(tmp_path, monkeypatch):
    """Each film is probed and its letterbox found before decoding starts (half a second a film: a
    minute for the paper's 147), shown on a bar."""
    films = [make_movie(tmp_path / f"{seconds}s.mp4", seconds=seconds) for seconds in (2, 3)]
    monkeypatch.setattr(sys, "stderr", Terminal())
    extract(films, tmp_path / "w", ExtractSettings(chunk_seconds=1.0), InOneProcess(1))
    assert "extract: cutting films into chunks:   0%" in sys.stderr.getvalue() and "0/2 [" in sys.stderr.getvalue()
