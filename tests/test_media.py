import io
import os
import queue
import re
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from mhmd_builder import media
from mhmd_builder.logs import LOG_NAME
from mhmd_builder.media import (CONTAINERS, VIDEO_EXTENSIONS, Crop, MediaError, Part, Sampling, decode_frames,
                                detect_letterbox, ffmpeg_release, find_movies, movie_id, output_size, probe, slug)

from conftest import ffmpeg, ffprobe_pts, first_at_or_after, make_movie


def test_movie_id_is_safe_and_follows_content(tmp_path):
    a = tmp_path / "Der Untergang. (2004) – Ära.mp4"
    a.write_bytes(b"some bytes")
    b = tmp_path / "copy.mp4"
    b.write_bytes(b"some bytes")
    mid = movie_id(a)
    assert mid.startswith("der-untergang-2004-ara-")
    assert "." not in mid and " " not in mid and "_" not in mid
    assert mid.split("-")[-1] == movie_id(b).split("-")[-1]  # same content, same hash
    b.write_bytes(b"other bytes")
    assert mid.split("-")[-1] != movie_id(b).split("-")[-1]
    assert slug("日本語") == ""  # nothing left: movie_id then falls back to "movie-<hash>"


def test_find_movies_takes_explicit_files_and_video_files_in_folders(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "a.MKV").write_bytes(b"x")
    (tmp_path / "d" / "notes.txt").write_bytes(b"x")
    explicit = tmp_path / "clip.weird"
    explicit.write_bytes(b"x")
    found = find_movies([tmp_path / "d", explicit, tmp_path / "d" / "sub" / "a.MKV"])
    assert [p.name for p in found] == ["a.MKV", "clip.weird"]
    with pytest.raises(MediaError, match="no such file"):
        find_movies([tmp_path / "missing.mp4"])


def test_probe_reads_size_rate_and_duration(tmp_path):
    info = probe(make_movie(tmp_path / "m.mp4", seconds=2, size="320x180", rate=25))
    assert (info.width, info.height, info.rotation, info.codec) == (320, 180, 0, "h264")
    assert info.fps == pytest.approx(25)
    assert info.duration == pytest.approx(2.0, abs=0.05)


def test_probe_swaps_size_of_rotated_phone_video(tmp_path):
    plain = make_movie(tmp_path / "plain.mp4", size="320x180")
    rotated = tmp_path / "rotated.mp4"
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(rotated))
    info = probe(rotated)
    assert info.rotation in (90, 270)
    assert (info.width, info.height) == (180, 320)
    frames = list(decode_frames(rotated, Sampling("fps", 1.0), output_size(info, None, None)))
    assert frames[0][1].shape == (320, 180, 3)  # ffmpeg turned the pixels too


def test_probe_corrects_non_square_pixels(tmp_path):
    anamorphic = make_movie(tmp_path / "dvd.mp4", size="720x480", vf="setsar=32/27")
    info = probe(anamorphic)
    assert (info.width, info.height) == (853, 480)
    assert output_size(info, None, 427) == (426, 240)


@pytest.mark.parametrize("content,match", [
    (b"", "empty file"),
    (b"this is a text file, not a movie\n" * 20, "not a readable movie"),
])
def test_probe_rejects_non_movies_with_one_line(tmp_path, content, match):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    with pytest.raises(MediaError, match=match) as err:
        probe(bad)
    assert "\n" not in str(err.value)


def test_probe_rejects_audio_only(tmp_path):
    audio = tmp_path / "sound.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(audio))
    with pytest.raises(MediaError, match="no video stream"):
        probe(audio)


ENCODERS = {".webm": ["-c:v", "libvpx"], ".ogv": ["-c:v", "libtheora"], ".wmv": ["-c:v", "wmv2"],
            ".flv": ["-c:v", "flv"], ".3gp": ["-c:v", "h263"], ".mpg": ["-c:v", "mpeg2video"],
            ".mpeg": ["-c:v", "mpeg2video"], ".vob": ["-c:v", "mpeg2video"], ".mxf": ["-c:v", "mpeg2video"]}


@pytest.mark.parametrize("extension", sorted(VIDEO_EXTENSIONS))
def test_every_video_extension_opens_with_an_allowed_demuxer(tmp_path, extension):
    movie = make_movie(tmp_path / f"m{extension}", seconds=1, size="176x144", codec=ENCODERS.get(extension))
    info = probe(movie)
    assert info.demuxer in CONTAINERS
    assert len(list(decode_frames(movie, Sampling("fps", 1.0), (64, 48), demuxer=info.demuxer))) == 1


@pytest.mark.parametrize("kind,reason", [("hls", "an HLS playlist (hls)"), ("concat", "a concat file list (concat)")])
def test_playlists_reaching_other_files_are_refused(playlists, kind, reason):
    with pytest.raises(MediaError, match=rf"^refused: {re.escape(reason)}, not a movie container \(mov, ") as err:
        probe(playlists[kind])
    assert "\n" not in str(err.value)
    assert list(decode_frames(playlists[kind], Sampling("fps", 1.0), (64, 48))) == []  # the decode is restricted too


def test_decode_keeps_to_the_probed_demuxer(tmp_path):
    movie = make_movie(tmp_path / "m.mp4", seconds=1)
    assert len(list(decode_frames(movie, Sampling("fps", 1.0), (64, 48), demuxer=probe(movie).demuxer))) == 1
    assert list(decode_frames(movie, Sampling("fps", 1.0), (64, 48), demuxer="mpegts")) == []


@pytest.mark.timeout(30)  # a FIFO opened for reading would block for ever
@pytest.mark.parametrize("name,reason", [
    ("fifo.mp4", r"not a regular file \(fifo\)"), ("socket.mp4", r"not a regular file \(socket\)"),
    ("device.mp4", r"not a regular file \(character device\)"),
    ("broken.mp4", r"broken symbolic link \(to /.*/gone\.mp4\)"), ("loop.mp4", "symbolic link loop"),
])
def test_special_files_and_bad_links_are_refused_unopened(special_files, name, reason):
    for read in (movie_id, probe):
        with pytest.raises(MediaError, match=f"^{reason}$"):
            read(special_files / name)


@pytest.mark.timeout(30)
def test_find_movies_skips_special_files_in_folders_and_keeps_named_ones(special_files, tmp_path):
    movie = make_movie(special_files / "real.mp4", seconds=1)
    assert find_movies([special_files]) == [movie]
    named = [special_files / n for n in ("fifo.mp4", "socket.mp4", "device.mp4", "broken.mp4", "loop.mp4")]
    assert find_movies(named) == named[:2] + [Path("/dev/zero")] + named[3:]  # taken, to be recorded failed


def test_a_search_that_finds_no_movie_is_an_error(tmp_path):
    (tmp_path / "x.mp4").mkdir()
    (tmp_path / "x.mp4" / "notes.txt").write_text("x")
    with pytest.raises(MediaError, match=r"x\.mp4: no movie files found \(folders are searched for \.3gp "):
        find_movies([tmp_path / "x.mp4"])
    with pytest.raises(MediaError, match="^http://example.com/a.mp4: a URL, not a file"):
        find_movies(["http://example.com/a.mp4"])


def test_fps_sampling_takes_first_frame_of_each_slot_with_exact_times(tmp_path):
    movie = make_movie(tmp_path / "m.mp4", seconds=4, rate=25)
    times = [t for t, _ in decode_frames(movie, Sampling("fps", 2.0), (64, 48))]
    pts = ffprobe_pts(movie)  # 25 fps has no frame at 0.5 s: the slot's first is 0.52 s
    assert times == pytest.approx(first_at_or_after(pts, 2.0)) and len(times) == 8
    every = [t for t, _ in decode_frames(movie, Sampling("fps", 25.0), (64, 48))]
    assert every == pytest.approx(ffprobe_pts(movie))  # sampling at the source rate loses nothing


def test_fps_sampling_on_variable_frame_rate_uses_real_timestamps(tmp_path):
    # 1 s at 25 fps, then 2 s at 4 fps: a frame index x fps guess would be wrong after 1 s.
    movie = make_movie(tmp_path / "vfr.mp4", seconds=1.5, rate=25,
                       vf="setpts='if(lt(N,25),N/25,1+(N-25)/4)/TB'", extra=["-fps_mode", "vfr"])
    pts = ffprobe_pts(movie)
    times = [t for t, _ in decode_frames(movie, Sampling("fps", 1.0), (64, 48))]
    assert times == pytest.approx(first_at_or_after(pts, 1.0))
    assert max(times) > 3


def test_keyframes_mode_returns_only_key_frames(tmp_path):
    movie = make_movie(tmp_path / "gop.mp4", seconds=4, rate=25, codec=["-c:v", "libx264", "-g", "25",
                       "-keyint_min", "25", "-sc_threshold", "0", "-pix_fmt", "yuv420p"])
    times = [t for t, _ in decode_frames(movie, Sampling("keyframes"), (64, 48))]
    assert times == pytest.approx([0, 1, 2, 3])


def test_scenes_mode_takes_a_frame_at_each_cut(tmp_path):
    parts = []
    for i, colour in enumerate(["red", "blue", "green"]):
        parts.append(make_movie(tmp_path / f"{i}.mp4", seconds=2, source=f"color=c={colour}"))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"file '{p}'\n" for p in parts))
    movie = tmp_path / "shots.mp4"
    ffmpeg("-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(movie))
    times = [t for t, _ in decode_frames(movie, Sampling("scenes", scene_max_gap=100), (64, 48))]
    assert times == pytest.approx([0, 2, 4], abs=0.05)


def test_head_and_tail_window_keeps_movie_times(tmp_path):
    movie = make_movie(tmp_path / "m.mp4", seconds=6, rate=25)
    times = [t for t, _ in decode_frames(movie, Sampling("fps", 1.0), (64, 48), start=2.0, duration=3.0)]
    assert times == pytest.approx([2, 3, 4])


def test_letterbox_is_detected_and_cropped(tmp_path):
    movie = make_movie(tmp_path / "scope.mp4", seconds=3, size="320x136", vf="pad=320:240:0:52:black")
    info = probe(movie)
    crop = detect_letterbox(movie, info, 0, 3)
    assert crop is not None
    assert crop.x == 0 and crop.w == 320
    assert abs(crop.y - 52) <= 2 and abs(crop.h - 136) <= 4
    (_, frame), *_ = decode_frames(movie, Sampling("fps", 1.0), output_size(info, crop, None), crop)
    assert frame.shape[:2] == (crop.h, crop.w)
    assert frame[:4].mean() > 40 and frame[-4:].mean() > 40  # no black band left


def test_no_letterbox_on_full_frame_content(tmp_path):
    movie = make_movie(tmp_path / "full.mp4", seconds=2)
    assert detect_letterbox(movie, probe(movie), 0, 2) is None


def test_ten_bit_and_odd_sized_movies_decode(tmp_path):
    ten_bit = make_movie(tmp_path / "10bit.mp4", codec=["-c:v", "libx264", "-pix_fmt", "yuv420p10le"])
    odd = make_movie(tmp_path / "odd.mp4", vf="scale=161:121", codec=["-c:v", "libx264", "-pix_fmt", "yuv444p"])
    for movie in (ten_bit, odd):
        info = probe(movie)
        size = output_size(info, None, None)
        frames = list(decode_frames(movie, Sampling("fps", 1.0), size))
        assert len(frames) == 3
        assert frames[0][1].shape == (size[1], size[0], 3) and frames[0][1].std() > 10
    assert output_size(probe(odd), None, None) == (160, 120)  # even, never larger


def test_scaling_keeps_aspect_and_crops_are_even():
    assert output_size(_info(1920, 1080), None, 640) == (640, 360)
    assert output_size(_info(1920, 1080), Crop(0, 132, 1920, 816), 640) == (640, 272)
    assert output_size(_info(1920, 1080), None, None) == (1920, 1080)


def _info(w, h):
    from mhmd_builder.media import MovieInfo
    return MovieInfo(duration=10, fps=24, coded_width=w, coded_height=h, width=w, height=h, rotation=0, sar=1.0,
                     codec="h264", pix_fmt="yuv420p", bit_rate=None, header_frames=None, variable_frame_rate=False,
                     demuxer="mov")


def test_dancer_header_count_is_wrong_but_every_decodable_frame_comes_out(shared_samples):
    dancer = shared_samples / "videos" / "dancer.avi"
    info = probe(dancer)
    assert info.header_frames == 1572
    times = [t for t, _ in decode_frames(dancer, Sampling("fps", 25.0), (32, 32))]
    assert len(times) == 1571
    assert times == pytest.approx(ffprobe_pts(dancer))
    assert np.all(np.diff(times) > 0)


@pytest.mark.parametrize("line, release", [
    ("ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright (c) 2000-2021 the FFmpeg developers", (4, 4)),
    ("ffmpeg version 5.1.6-0+deb12u1 Copyright (c) 2000-2024 the FFmpeg developers", (5, 1)),
    ("ffmpeg version n6.1.1 Copyright (c) 2000-2023 the FFmpeg developers", (6, 1)),
    ("ffmpeg version 7.1-static https://johnvansickle.com/ffmpeg/  Copyright (c) 2000-2024", (7, 1)),
    ("ffmpeg version 10.0 Copyright (c) 2000-2030 the FFmpeg developers", (10, 0)),
    ("ffmpeg version N-112233-gabcdef1234 Copyright (c) 2000-2024 the FFmpeg developers", None),  # a git build
])
def test_the_ffmpeg_release_is_read_from_its_version_line(line, release):
    assert ffmpeg_release(line) == release


MHMD = [sys.executable, "-m", "mhmd_builder.cli"]


def fake_ffmpeg(folder: Path, version_line: str) -> dict:
    """An environment whose PATH finds first an `ffmpeg` that prints `version_line` to -version."""
    folder.mkdir()
    script = folder / "ffmpeg"
    script.write_text(f"#!/bin/sh\necho '{version_line}'\necho 'built with gcc 11 (Ubuntu 11.2.0-19ubuntu1)'\n")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("version_line, error", [
    ("ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright (c) 2000-2021 the FFmpeg developers",
     "Error: ffmpeg version 4.4.2-0ubuntu0.22.04.1: too old, mhmd needs ffmpeg >= 5.1 (for -fps_mode)\n"),
    (None, "Error: ffmpeg not found on PATH: install ffmpeg >= 5.1\n"),
])
def test_extract_refuses_an_old_or_missing_ffmpeg_in_one_line(tmp_path, version_line, error):
    movie = make_movie(tmp_path / "a.mp4", seconds=1)
    env = (fake_ffmpeg(tmp_path / "bin", version_line) if version_line
           else {**os.environ, "PATH": str(tmp_path / "nothing")})
    result = subprocess.run([*MHMD, "extract", str(movie), "-w", str(tmp_path / "w")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", error)
    assert not (tmp_path / "w" / "extract").exists()  # refused before any movie was planned


def test_a_new_enough_ffmpeg_is_accepted_and_named_in_the_log(tmp_path):
    movie = make_movie(tmp_path / "a.mp4", seconds=1)
    real = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.partition(" Copyright")[0]
    result = subprocess.run([*MHMD, "extract", str(movie), "-w", str(tmp_path / "w")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"INFO {real}\n" in (tmp_path / "w" / LOG_NAME).read_text()


def test_nvdec_codecs_are_asked_of_ffmpeg():
    assert media.cuda_decodes("h264") and media.cuda_decodes("hevc")
    assert not media.cuda_decodes("ffv1") and not media.cuda_decodes("no-such-codec")


def test_nvdecs_refusal_of_a_stream_is_noted_from_ffmpegs_warning():
    """libavcodec's words when the hardware decoder cannot take a stream (a profile NVDEC lacks) and
    it decodes in software: the one sign that the GPU did not decode the film."""
    refused = (b"[h264 @ 0x5581] Failed setup for format cuda: hwaccel initialisation returned error.\n"
               b"[Parsed_showinfo_3 @ 0x5582] n:   0 pts:      0 pts_time:0.5 duration:1\n")
    stats, times = media.DecodeStats(), queue.Queue()
    media._read_stderr(io.BytesIO(refused), times, deque(), stats)
    assert stats.gpu_refused and times.get() == 0.5  # no time base logged: the printed time
    plain = media.DecodeStats()
    media._read_stderr(io.BytesIO(refused.splitlines(keepends=True)[1]), queue.Queue(), deque(), plain)
    assert not plain.gpu_refused


def test_frame_times_are_pts_times_the_time_base_not_the_rounded_printed_ones(tmp_path):
    """ffmpeg 5.1 prints pts_time to 6 digits ("1234.57" for 1234.567 s): a film's frames past
    1,000 s keep their exact time (and frame id) only when read from their pts."""
    movie = make_movie(tmp_path / "long.mp4", seconds=0.4, rate=25, vf="settb=1/1000,setpts='if(eq(N,0),0,1234.567+N*0.04)/TB'",
                       extra=["-fps_mode", "vfr", "-enc_time_base", "1/1000", "-video_track_timescale", "1000"])
    pts = ffprobe_pts(movie)
    assert pts[1] == pytest.approx(1234.607, abs=1e-9)
    times = [t for t, _ in decode_frames(movie, Sampling("fps", 25.0), (64, 48))]
    assert times == pytest.approx(pts, abs=1e-9)


def test_showinfo_lines_without_a_time_still_count_a_frame():
    """Every frame line gives a time, so that frames and times stay paired: NOPTS and nan give 0."""
    lines = (b"[Parsed_showinfo_3 @ 0x1] config in time_base: 1/90000, frame_rate: 25/1\n"
             b"[Parsed_showinfo_3 @ 0x1] n:   0 pts:  90045 pts_time:1.0005 duration:3600\n"
             b"[Parsed_showinfo_3 @ 0x1] n:   1 pts:NOPTS pts_time:NOPTS duration:3600\n"
             b"[Parsed_showinfo_3 @ 0x1] color_range:tv color_space:bt709\n")
    times = queue.Queue()
    media._read_stderr(io.BytesIO(lines), times, deque(), media.DecodeStats())
    assert list(times.queue) == [1.0005, 0.0, None]
    printed = queue.Queue()
    media._read_stderr(io.BytesIO(b"[Parsed_showinfo_3 @ 0x1] n:   0 pts:  7 pts_time:nan duration:1\n"), printed,
                       deque(), media.DecodeStats())
    assert list(printed.queue) == [0.0, None]


@pytest.mark.parametrize("sampling,bounds", [(Sampling("fps", 2.5), [7, 12]), (Sampling("keyframes"), [2.5, 4.2])])
def test_parts_of_a_window_sample_the_frames_the_whole_window_samples(tmp_path, sampling, bounds):
    """B-frames, 23.976 fps, a window from 0.3 s: each part decoded from its own seek point."""
    movie = make_movie(tmp_path / "m.mp4", seconds=6, rate="24000/1001",
                       codec=["-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-pix_fmt", "yuv420p"])
    window = {"start": 0.3, "duration": 5.4}
    whole = [(t, f.tobytes()) for t, f in decode_frames(movie, sampling, (64, 48), **window)]
    edges = [None, *bounds, None]
    parts = [(t, f.tobytes()) for first, end in zip(edges, edges[1:])
             for t, f in decode_frames(movie, sampling, (64, 48), part=Part(first, end), **window)]
    assert len(whole) >= 4 and parts == whole


# Key frames at whole seconds only (no scene-cut key frames), B-frames: MP4 seeks by presentation time.
KEY_EVERY_SECOND = ["-c:v", "libx264", "-preset", "veryfast", "-bf", "2", "-pix_fmt", "yuv420p",
                    "-x264-params", "keyint=25:min-keyint=25:scenecut=0"]


@pytest.mark.parametrize("extra", [[], ["-movflags", "frag_keyframe+empty_moov"]])  # fragmented: starts at 0.08 s
def test_key_frames_at_gives_the_key_frame_a_seek_lands_on_in_film_time(tmp_path, extra):
    movie = make_movie(tmp_path / "m.mp4", seconds=4, codec=KEY_EVERY_SECOND, extra=extra)
    times = [0.0, 0.5, 2.0, 2.96, 3.5]
    assert media.key_frames_at(movie, "mov", times) == pytest.approx([0.0, 0.0, 2.0, 2.0, 3.0], abs=1e-6)
    assert media.key_frames_at(movie, "mov", []) == []


def test_key_frames_at_is_none_for_what_ffprobe_cannot_answer_in_time(tmp_path, monkeypatch):
    movie = make_movie(tmp_path / "m.mp4", seconds=2, codec=KEY_EVERY_SECOND)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0\0\0\x18ftypmp42" + b"x" * 1000)
    assert media.key_frames_at(junk, "mov", [1.0]) is None
    monkeypatch.setattr(media, "KEY_FRAME_TIMEOUT", 1e-4)
    assert media.key_frames_at(movie, "mov", [1.0]) is None


@pytest.mark.parametrize("origin,fps", [(0.0, 1.0), (0.3, 2.5), (1.0, 25.0), (0.0, 24000 / 1001)])
def test_the_first_slot_after_a_key_frame_seeks_to_it_and_the_slot_before_does_not(origin, fps):
    sampling = Sampling("fps", fps)
    slack = media.BORDER_MARGIN + media.SEEK_SLACK
    for key in (origin, origin + 3.0, origin + 3.0 + 0.5 / fps, 7.123, origin + 10.0 - slack):
        slot = sampling.first_slot_after(origin, key)
        assert sampling.border_time(origin, slot) - slack >= key > sampling.border_time(origin, slot - 1) - slack


def test_python_finds_each_frame_in_the_slot_select_took_it_for(tmp_path):
    """A frame at pts 47976 of a 1/24000 time base (1.999 s): select's t, the pts times the time base
    as a double, puts it in slot 1 at 1 fps (1.9989999... + 0.001 < 2); the exact 1.999 s would give
    slot 2. Chunks sort a run's frames by `Sampling.position`, which must agree with select."""
    movie = make_movie(tmp_path / "edge.mp4", seconds=0.24, rate=25, vf="settb=1/24000,setpts='N*12000-eq(N,4)*24'",
                       extra=["-fps_mode", "vfr", "-enc_time_base", "1/24000", "-video_track_timescale", "24000"])
    every = [t for t, _ in decode_frames(movie, Sampling("fps", 25.0), (64, 48))]
    assert len(every) == 6 and every[4] == pytest.approx(1.999, abs=1e-12)
    sampling = Sampling("fps", 1.0)
    slots = [sampling.position(0.0, t) for t in every]
    assert slots == [0, 0, 1, 1, 1, 2]
    firsts = [t for k, t in enumerate(every) if k == 0 or slots[k] > slots[k - 1]]
    assert [t for t, _ in decode_frames(movie, sampling, (64, 48))] == firsts == [every[0], every[2], every[5]]
