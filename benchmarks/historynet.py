"""HistoryNet's input pipeline against a plain webdataset decode pipeline on the same shards, in one run.

    uv run python benchmarks/historynet.py [--frames 2000] [--workers 1 2] [--batch 16] [--repeats 3]
                                           [--train-steps N --device cuda --train-batch 16]

The shards are written by the project (`mhmd shard`) from frames it extracted from a film of zooms
over ultralytics' sample photos (640x360 JPEGs). Both loaders read every training sample once per
epoch in DataLoader workers and yield batches of 16 at 224x224:
- plain: `wds.WebDataset(...).decode("rgb8")`, resized to 224 with OpenCV, batched (what any
  training job must do at least);
- ours: `historynet.data.train_loader` (resampled shards, shuffle buffer, OpenCV decode and resize,
  8-bit Lab, L/255 to 3 channels, ab targets, one-hot labels, parsing targets).
Samples/s per worker and the ratio (goal >= 0.9x). Training images/s: `--train-steps N` runs N steps
of HistoryNet training (the full model at 224, random VGG start, paper loss) on --device after the
loader comparison and prints the median images/s of the logged steps after the first two (warm-up),
with the GPU's peak memory on CUDA.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds
from detect import make_frames  # benchmarks/detect.py: the same frames

from mhmd_builder.historynet.data import train_loader
from mhmd_builder.historynet.train import TrainSettings, train
from mhmd_builder.shard import ShardSettings, shard
from mhmd_builder.shards import JPG, KEY, shard_urls


def plain_loader(urls: list[str], batch: int, workers: int, epoch_samples: int) -> wds.WebLoader:
    def resized(sample):
        image, key = sample
        return cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA), key

    dataset = (wds.WebDataset(urls, resampled=True, shardshuffle=False).decode("rgb8")
               .to_tuple(JPG, KEY).map(resized).batched(batch)
               .with_epoch(max(1, epoch_samples // (batch * max(workers, 1)))))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def samples_per_second(loader, batch: int) -> float:
    started, samples = time.perf_counter(), 0
    for _ in loader:
        samples += batch
    return samples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-workers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        work = make_frames(root, args.frames)
        shard(work, root / "shards", ShardSettings(maxcount=250, test_fraction=0))
        urls = shard_urls(root / "shards")
        print(f"{args.frames} frames of 640x360 in {len(urls)} shards, batch {args.batch}")
        for workers in args.workers:
            rows = []
            for _ in range(args.repeats):
                plain = samples_per_second(plain_loader(urls, args.batch, workers, args.frames), args.batch)
                ours = samples_per_second(train_loader(urls, 42, args.frames, args.batch, workers, seed=0), args.batch)
                rows.append((plain, ours))
                print(f"{workers} workers: plain webdataset {plain / workers:7.1f} samples/s/worker   "
                      f"historynet loader {ours / workers:7.1f} samples/s/worker")
            plain, ours = (float(np.median(column)) for column in zip(*rows))
            print(f"median, {workers} workers: plain {plain / workers:.1f}, ours {ours / workers:.1f} samples/s/worker, "
                  f"ratio {ours / plain:.2f}x (goal >= 0.9x)")
        if args.train_steps:
            training_speed(root, urls, args)


def training_speed(root: Path, urls: list[str], args) -> None:
    import torch

    settings = TrainSettings(shards=urls, out=str(root / "run"), steps=args.train_steps, batch_size=args.train_batch,
                             device=args.device, workers=args.train_workers, vgg_weights="none", log_every=1,
                             save_every=10 ** 9, val_images=2)
    train(settings)
    logged = [json.loads(line) for line in (root / "run" / "train.log.jsonl").read_text().splitlines()]
    speeds = [line["images_per_second"] for line in logged[2:]] or [logged[-1]["images_per_second"]]
    memory = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
              if args.device.startswith("cuda") else "")
    print(f"training: {float(np.median(speeds)):.1f} images/s (batch {args.train_batch}, {args.device}, "
          f"{args.train_workers} loader workers){memory}")


if __name__ == "__main__":
    main()
