"""Shared test fixtures: movies generated with ffmpeg (as PySceneDetect's tests do), the real
sample media of ../shared when it is there, a YOLO model that finds persons without pretrained
weights, and a suite that runs offline on every machine."""
from __future__ import annotations

import functools
import io
import ipaddress
import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

SHARED_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"


# A child process does not inherit the tests' patches: its HTTP(S) requests go to a proxy port
# nothing listens on, and ultralytics is told it is offline (else it retries for half a minute).
# `python -m mhmd_builder.cli` as a terminal runs it, Ctrl-C delivered as KeyboardInterrupt: a child
# inherits its parent's ignored or blocked signals, and this pytest process's own handling of SIGINT
# is not the user's shell's (the Ctrl-C tests failed in full runs only, the command never interrupted).
INTERRUPTIBLE_MHMD = ["-c", "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                      "runpy.run_module('mhmd_builder.cli', run_name='__main__', alter_sys=True)"]
OFFLINE_ENV = {**{name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
               "NO_PROXY": "", "no_proxy": "", "YOLO_OFFLINE": "true"}

_getaddrinfo = socket.getaddrinfo


def _is_address(name) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:  # a host name
        return False
    return True


def _this_machine_only(host, *args, **kwargs):
    """socket.getaddrinfo for addresses and this machine's own names; any other name fails to
    resolve, as on a machine without network."""
    name = host.decode() if isinstance(host, bytes) else host
    if not (name is None or name in ("localhost", socket.gethostname()) or _is_address(name)):
        raise socket.gaierror(socket.EAI_NONAME, f"{name}: no network in tests")
    return _getaddrinfo(host, *args, **kwargs)


@pytest.fixture(scope="session", autouse=True)
def offline(tmp_path_factory):
    """The suite runs as on a machine without network and without cached weights, wherever it runs:
    every download of pretrained weights (torchvision's through torch.hub, ultralytics' YOLO weights)
    fails as it does offline, so the tests see the same paths (random starts with a notice, the
    OpenCV detector) on every machine."""
    empty = tmp_path_factory.mktemp("no-weights")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", _this_machine_only)
        patch.setenv("MHMD_WEIGHTS_DIR", str(empty))
        patch.setenv("TORCH_HOME", str(empty))
        yield


class Terminal(io.StringIO):
    """stderr as a terminal (tqdm draws its bars only there), keeping what was written."""

    def isatty(self) -> bool:
        return True


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


def pattern_frame(source: str) -> np.ndarray:
    """One 640x360 BGR frame of a lavfi video source (testsrc2, smptebars, color=c=teal)."""
    joiner = ":" if "=" in source else "="
    raw = subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"{source}{joiner}size=640x360", "-frames:v", "1",
                          "-f", "rawvideo", "-pix_fmt", "bgr24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(360, 640, 3)


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


def _calibrate_batch_norm(model) -> None:
    """BatchNorm starts at mean 0, variance 1, under which the activations fade layer after layer:
    statistics of the photos and the test pattern the tests use (one pass in training mode) keep
    them at unit scale on all of them."""
    import cv2
    import torch
    from ultralytics.utils import ASSETS

    images = [cv2.imread(str(ASSETS / name)) for name in ("bus.jpg", "zidane.jpg")] + [pattern_frame("testsrc2")]
    batch = np.stack([cv2.resize(image, (256, 256))[..., ::-1] for image in images])  # RGB
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # the plain mean over the batch
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255)
    model.eval()


def _score_persons(head) -> None:
    """The logits of persons (class 0) and of bicycles (class 1, which the detector must leave out)
    at twice ultralytics' random weights (they vary more from anchor to anchor), with a bias that
    leaves a few boxes per photo above the default conf (0.25); the other classes keep ultralytics'
    prior (about -9), far below. Each box side is an expectation over 16 distance bins: favouring the
    short ones gives boxes of a few strides, not of the whole image."""
    import torch

    for branch in head.cv3:  # class logits, one branch per stride
        branch[-1].weight.data[:2] *= 2
        branch[-1].bias.data[:2] = -1.5
    for branch in head.cv2:  # box sides, 4 x 16 bins
        branch[-1].bias.data[:] = -0.5 * torch.arange(16.0).repeat(4)


@pytest.fixture(scope="session")
def person_yolo(tmp_path_factory):
    """person_yolo(config) -> a YOLO checkpoint (.pt) built from an ultralytics config (yolo11n.yaml,
    yolo11n-seg.yaml), made once per session, that finds persons: boxes and masks that depend on the
    image, a few per sample photo at the default conf. No pretrained weights can be had here, and
    with ultralytics' own initialisation every anchor gives the same output and nothing is found."""
    folder = tmp_path_factory.mktemp("yolo")

    @functools.cache
    def build(config: str) -> Path:
        import torch
        from ultralytics import YOLO

        torch.manual_seed(0)
        yolo = YOLO(config)
        _calibrate_batch_norm(yolo.model)
        _score_persons(yolo.model.model[-1])
        path = folder / Path(config).with_suffix(".pt").name
        yolo.save(path)
        return path

    return build


def assert_same_detections(boxes, scores, result) -> None:
    """Boxes (normalised xyxy) and scores equal to an ultralytics result's, in the same number. Up to
    the last bits: ultralytics runs the model in channels-last memory, whose sums are in another order
    (about 1e-6 apart on photos, 1e-4 on the test pattern, whose activations are larger)."""
    ours = np.c_[np.array([list(box) for box in boxes]).reshape(-1, 4), scores]
    theirs = np.c_[result.boxes.xyxyn.numpy(), result.boxes.conf.numpy()]
    assert len(ours) == len(theirs)
    # Each of ours and the nearest of theirs: scores a few bits apart may come out of NMS in either
    # order. No two boxes NMS keeps are that near, so the pairs are one to one.
    distance = np.abs(ours[:, None] - theirs[None]).max(2)
    nearest = distance.argmin(1)
    assert sorted(nearest) == list(range(len(theirs)))
    assert distance[np.arange(len(ours)), nearest].max(initial=0) <= 5e-4


def ultralytics_person_mask(result) -> np.ndarray:
    """The union of an ultralytics segmentation result's masks at its image's size, scaled there by
    ultralytics itself: 255 where a person is."""
    from ultralytics.utils import ops

    if result.masks is None:
        return np.zeros(result.orig_shape, np.uint8)
    scaled = ops.scale_masks(result.masks.data[None].float(), result.orig_shape)[0]
    return (scaled.amax(0).numpy() > 0.5).astype(np.uint8) * 255


def assert_equal_but_on_edges(mask: np.ndarray, reference: np.ndarray) -> None:
    """`mask` differs from `reference` only within a pixel of the reference's edges, as two bilinear
    scalings of one mask do."""
    import cv2

    kernel = np.ones((3, 3), np.uint8)
    edges = cv2.dilate(reference, kernel) != cv2.erode(reference, kernel)
    assert not ((mask != reference) & ~edges).any()


def _benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synthetic_work(tmp_path_factory):
    """benchmarks/scale.py's work directory of 3,000 frames over 6 films (extracted, detected,
    labelled by the model), made once: copy it before writing (`synthetic_copy`)."""
    return _benchmark("scale").make_workdir(tmp_path_factory.mktemp("synthetic"), 3000, 6)


@pytest.fixture
def synthetic_copy(synthetic_work, tmp_path):
    """A private copy of `synthetic_work` (its JPEGs hard-linked, not copied)."""
    import shutil

    shutil.copytree(synthetic_work.root, tmp_path / "work", copy_function=os.link)
    from mhmd_builder.workdir import WorkDir

    return WorkDir(tmp_path / "work")
