"""Labeler prediction throughput: `label.predict` (the label stage) against a plain torchvision
loop over the same JPEGs, same model, same device, in one run.

    uv run python benchmarks/labeler.py [--frames 512] [--arch resnet18] [--batch 64] [--device cpu|cuda]

The frames are 640x360 JPEGs (the size `mhmd extract` writes) recorded as kept by extract and
detect; the model is a randomly initialised ResNet saved as a labeler checkpoint (same compute as a
trained one). The plain loop: PIL open, torchvision Resize + ToTensor + Normalize, batches of the
same size through the same model under torch.inference_mode. Each side runs twice; the faster run counts.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import torch

from mhmd_builder.label import PredictSettings, predict
from mhmd_builder.labeler import MEAN, STD, build_model, load_checkpoint, save_checkpoint
from mhmd_builder.devices import pick_device
from mhmd_builder.tables import DETECT_SCHEMA, FRAME_SCHEMA
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.workdir import WorkDir


def make_frames(root: Path, count: int, movies: int = 4) -> WorkDir:
    """Smooth colour fields with a few rectangles (JPEG-sized like film frames, not like noise)."""
    work, rng = WorkDir(root), np.random.default_rng(0)
    gradient = np.linspace(0, 1, 640)[None, :, None]
    for m in range(movies):
        movie, frames, detections = f"movie{m}", [], []
        for k in range(count // movies):
            frame_id = f"{movie}-{k:05d}"
            jpeg = f"frames/{movie}/{frame_id}.jpg"
            image = (rng.integers(0, 256, 3) * gradient + rng.integers(0, 256, 3) * (1 - gradient))
            image = np.broadcast_to(image, (360, 640, 3)).astype(np.uint8).copy()
            for _ in range(4):
                x, y = rng.integers(0, 560), rng.integers(0, 250)
                image[y:y + 110, x:x + 80] = rng.integers(0, 256, 3)
            (work.root / jpeg).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(work.root / jpeg), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            frames.append({"frame_id": frame_id, "movie_id": movie, "timestamp": float(k), "width": 640,
                           "height": 360, "kept": True, "reject_reason": None, "flags": [], "jpeg": jpeg})
            detections.append({"frame_id": frame_id, "movie_id": movie, "persons": 1, "boxes": [], "confidences": [],
                               "largest_person_area": 0.3, "kept": True, "reject_reason": None, "mask": None})
        for stage, rows, schema in (("extract", frames, FRAME_SCHEMA), ("detect", detections, DETECT_SCHEMA)):
            work.begin(stage, movie)
            work.commit(stage, movie, pa.Table.from_pylist(rows, schema), {"frames_in": len(rows)})
    return work


def time_stage(work: WorkDir, checkpoint: Path, args) -> float:
    shutil.rmtree(work.stage_dir("label"), ignore_errors=True)
    started = time.perf_counter()
    results = predict(work, checkpoint, PredictSettings(device=args.device, batch_size=args.batch))
    assert all(r.ok for r in results)
    return time.perf_counter() - started


def time_plain(paths: list[Path], checkpoint: Path, args, taxonomy) -> float:
    from PIL import Image
    from torchvision import transforms

    started = time.perf_counter()
    model, config = load_checkpoint(checkpoint, taxonomy)
    model = model.to(args.device)
    size = config["image_size"]
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize(MEAN, STD)])
    with torch.inference_mode():
        for i in range(0, len(paths), args.batch):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + args.batch]])
            model(batch.to(args.device)).softmax(1).topk(3, 1)[0].cpu()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    args.device = pick_device(args.device)
    taxonomy = load_taxonomy()
    with tempfile.TemporaryDirectory() as tmp:
        work = make_frames(Path(tmp) / "work", args.frames)
        checkpoint = Path(tmp) / "labeler.safetensors"
        torch.manual_seed(0)
        save_checkpoint(build_model(args.arch, len(taxonomy)), {
            "arch": args.arch, "image_size": args.image_size, "taxonomy_sha256": taxonomy.sha256,
            "label_names": taxonomy.names}, checkpoint)
        paths = sorted(work.root.glob("frames/*/*.jpg"))
        plain = min(time_plain(paths, checkpoint, args, taxonomy) for _ in range(2))
        stage = min(time_stage(work, checkpoint, args) for _ in range(2))
    n = len(paths)
    print(f"{args.arch}, {n} frames 640x360 -> {args.image_size}, batch {args.batch}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"plain torchvision loop: {n / plain:8.1f} images/s ({plain:.2f} s)")
    print(f"label.predict:          {n / stage:8.1f} images/s ({stage:.2f} s)")
    print(f"ratio: {plain / stage:.2f}x")


if __name__ == "__main__":
    main()
