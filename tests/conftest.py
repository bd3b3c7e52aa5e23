"""Shared test fixtures: movies generated with ffmpeg (as PySceneDetect's tests do), and the
real sample media of ../shared when it is there."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

SHARED_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-nostdin", *args], check=True)


def make_movie(path: Path, seconds: float = 3.0, size: str = "160x120", rate: float = 25,
               source: str = "testsrc2", vf: str | None = None, codec: list[str] | None = None,
               audio: bool = False, extra: list[str] | None = None) -> Path:
    """A short synthetic movie. `source` is a lavfi video source (testsrc2 is colourful and
    moving); `vf` an optional filter chain; `codec` the encoder arguments (H.264 by default)."""
    joiner = ":" if "=" in source else "="
    args = ["-f", "lavfi", "-i", f"{source}{joiner}size={size}:rate={rate}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac", "-shortest"]
    if vf:
        args += ["-vf", vf]
    args += codec or ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast"]
    ffmpeg(*args, *(extra or []), str(path))
    return path


def ffprobe_pts(path: Path) -> list[float]:
    """ffprobe's own timestamp of every video frame (best effort: AVI H.264 has no pts)."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries",
                          "frame=best_effort_timestamp_time", "-of", "json", str(path)],
                         capture_output=True, check=True).stdout
    frames = json.loads(out)["frames"]
    return [float(f["best_effort_timestamp_time"]) for f in frames if "best_effort_timestamp_time" in f]


def first_at_or_after(pts: list[float], fps: float) -> list[float]:
    """What uniform sampling must return: the first frame of each 1/fps slot."""
    slots = {}
    for t in sorted(pts):
        slots.setdefault(int(t * fps + 0.001), t)
    return list(slots.values())


@pytest.fixture
def movie_factory(tmp_path):
    """make(name, **make_movie options) -> path of a new movie under a fresh folder."""
    folder = tmp_path / "movies"
    folder.mkdir()

    def make(name: str, **options) -> Path:
        return make_movie(folder / name, **options)

    make.folder = folder
    return make


def ffprobe_says(path) -> str:
    """What plain ffprobe, unrestricted, reads from a file: its format and its streams' types."""
    return subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=format_name:stream=codec_type", "-of",
                           "csv=p=0", str(path)], capture_output=True, text=True).stdout


@pytest.fixture
def playlists(tmp_path):
    """An HLS playlist and a concat list named like movies, each reaching a real movie outside
    their folder (the concat list through a link to that folder: it refuses absolute paths itself)."""
    elsewhere, folder = tmp_path / "elsewhere", tmp_path / "movies"
    elsewhere.mkdir()
    folder.mkdir()
    secret = make_movie(elsewhere / "secret.ts", seconds=2, extra=["-f", "mpegts"])
    hls = folder / "holiday.mp4"
    hls.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{secret}\n#EXT-X-ENDLIST\n")
    (folder / "outside").symlink_to(elsewhere)
    concat = folder / "party.mkv"
    concat.write_text("ffconcat version 1.0\nfile 'outside/secret.ts'\n")
    for listing, demuxer in [(hls, "hls"), (concat, "concat")]:
        assert "video" in ffprobe_says(listing) and demuxer in ffprobe_says(listing)  # unrestricted, it reads secret.ts
    return {"hls": hls, "concat": concat}


@pytest.fixture
def special_files(tmp_path):
    """A FIFO, a socket, a device, a broken link and a link loop, all named like movies."""
    folder = tmp_path / "special"
    folder.mkdir()
    os.mkfifo(folder / "fifo.mp4")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket.mp4"))
    (folder / "device.mp4").symlink_to("/dev/zero")
    (folder / "broken.mp4").symlink_to(tmp_path / "gone.mp4")
    (folder / "loop.mp4").symlink_to(folder / "loop.mp4")
    yield folder
    server.close()


@pytest.fixture
def shared_samples() -> Path:
    if not SHARED_SAMPLES.is_dir():
        pytest.skip("../shared/samples is not present")
    return SHARED_SAMPLES


# Run in another process while the demo labels its sample: can it take the work directory's lock?
TRY_LOCK = """
import sys
from mhmd_builder.workdir import FolderBusy, locked
try:
    with locked(sys.argv[1]):
        print("free")
except FolderBusy as busy:
    print(busy)
"""


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`mhmd demo` run once per session, offline (no YOLO weights: the OpenCV detector):
    (its output folder, what it printed, its exit code). While the demo labelled its sample, another
    process tried to take the work directory's lock: what it found is in OUT/../lock-while-labelling."""
    import sys

    from click.testing import CliRunner

    from mhmd_builder import demo
    from mhmd_builder.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    real_label_sample = demo.label_sample

    def label_sample(todo, workdir, labelled):
        tried = subprocess.run([sys.executable, "-c", TRY_LOCK, str(workdir.root)], capture_output=True, text=True)
        (out.parent / "lock-while-labelling").write_text(tried.stdout + tried.stderr)
        return real_label_sample(todo, workdir, labelled)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MHMD_WEIGHTS_DIR", str(out.parent / "no-weights"))
        patch.setattr(demo, "label_sample", label_sample)
        result = CliRunner().invoke(main, ["demo", "-o", str(out), "--workers", "2"])
    return out, result.output, result.exit_code


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance on 2 CPUs for one test module, shut down after it. Its workers can
    import the test modules, so stages defined in tests can run there."""
    from mhmd_builder.runners import connect_ray

    ray = connect_ray("local", num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield ray
    ray.shutdown()
