"""Person detection throughput: `mhmd detect` against ultralytics' own `model.predict(list_of_paths,
batch=B)` on the same frames, same model, same device, in one run.

    uv run python benchmarks/detect.py [--frames 256] [--batch 32] [--device cpu|cuda] [--model yolo11n.yaml]

Frames are extracted (by the project itself) from a film made of ultralytics' sample photos of
persons, so both sides read the same 640x360 JPEGs. Random weights (`yolo11n.yaml`) cost the
same compute as trained ones. Both timings include building the model; the frames are many
enough for that to be small. On CUDA the GPU's utilisation is sampled with nvidia-smi.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from mhmd_builder.demo import Segment, make_film
from mhmd_builder.detect import DetectSettings, detect
from mhmd_builder.extract import ExtractSettings, extract
from mhmd_builder.media import Sampling
from mhmd_builder.quality import QualityThresholds
from mhmd_builder.runners import LocalRunner
from mhmd_builder.workdir import WorkDir


def make_frames(root: Path, frames: int) -> WorkDir:
    """A film of zooms over the sample photos, extracted at 24 fps with duplicates kept."""
    seconds = frames / 24 / 2
    film = make_film(root / "film.mp4", [Segment("photo:zidane.jpg", seconds), Segment("photo:bus.jpg", seconds)])
    work = WorkDir(root / "work")
    settings = ExtractSettings(sampling=Sampling("fps", 24.0), quality=QualityThresholds(max_hash_distance=-1))
    extract([film], work, settings, LocalRunner(1))
    return work


class GpuSampler:
    """Mean GPU utilisation (%) and peak memory (MiB) from nvidia-smi while the block runs."""

    def __init__(self, device: str):
        self.active = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, float]] = []

    def __enter__(self):
        self.stop = threading.Event()
        if self.active:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True).stdout.split(",")
            self.samples.append((float(out[0]), float(out[1])))

    def __exit__(self, *exc):
        self.stop.set()
        if self.active:
            self.thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "-"
        return f"util {sum(u for u, _ in self.samples) / len(self.samples):.0f}%, mem {max(m for _, m in self.samples):.0f} MiB"


def time_ultralytics(paths: list[str], args) -> float:
    from ultralytics import YOLO

    started = time.perf_counter()
    model = YOLO(args.model)
    precision = {"quantize": 16} if args.device.startswith("cuda") else {}  # fp16 on GPU, as mhmd detect
    for _ in model.predict(paths, batch=args.batch, imgsz=args.imgsz, device=args.device, classes=[0],
                           stream=True, verbose=False, **precision):
        pass
    return time.perf_counter() - started


def time_mhmd(work: WorkDir, args) -> float:
    shutil.rmtree(work.stage_dir("detect"), ignore_errors=True)
    settings = DetectSettings(model=args.model, device=args.device, batch=args.batch, imgsz=args.imgsz)
    started = time.perf_counter()
    (result,) = detect(work, settings, LocalRunner(1))
    assert result.ok, result.reason
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="yolo11n.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = make_frames(Path(tmp), args.frames)
        paths = sorted(str(p) for p in work.root.glob("frames/*/*.jpg"))
        print(f"{len(paths)} frames of 640x360, model {args.model}, imgsz {args.imgsz}, batch {args.batch}, "
              f"device {args.device}")
        time_ultralytics(paths[: args.batch], args)  # warm-up: imports, kernels
        rows = []
        for _ in range(args.repeats):
            with GpuSampler(args.device) as theirs_gpu:
                theirs = time_ultralytics(paths, args)
            with GpuSampler(args.device) as ours_gpu:
                ours = time_mhmd(work, args)
            rows.append((theirs, ours))
            print(f"ultralytics predict {len(paths) / theirs:7.1f} img/s ({theirs_gpu.summary()})   "
                  f"mhmd detect {len(paths) / ours:7.1f} img/s ({ours_gpu.summary()})")
        theirs, ours = (sorted(column)[len(column) // 2] for column in zip(*rows))
        print(f"median: ultralytics {len(paths) / theirs:.1f} img/s, mhmd detect {len(paths) / ours:.1f} img/s, "
              f"ratio (mhmd / ultralytics throughput) {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
