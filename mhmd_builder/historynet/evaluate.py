"""`mhmd historynet evaluate`: HistoryNet's official evaluation protocol over test shards.

For every frame: the generator predicts ab at its input size (the checkpoint's image_size) from the
frame's L; `data.compose_rgb` resizes that ab to the frame's size and joins it with the frame's own
full-resolution L; the result is compared with the original RGB frame: PSNR, SSIM, LPIPS (AlexNet),
and the colourfulness of both. Means over all frames and per label (`cls`; unlabelled frames apart).

Inference runs on the device (bf16 autocast and channels_last on CUDA, as `colorize` does), and LPIPS
too, both from this thread: torch called from several threads would start an OpenMP team of intra-op
threads per thread on the CPU. PSNR, SSIM and colourfulness run on the CPU in a small thread pool while
the next frames are predicted. SSIM on the full-size frame is the slow part (measured on one core:
70-90 ms for a 360x640 frame, 170 ms for 576x720, 300 ms for 720x1280, 650 ms for 1080x1920; PSNR and
colourfulness together 30-60 ms), and it mostly releases the GIL (scipy.ndimage's filters): a Python
loop kept 73% of its speed while SSIM ran in another thread. At most two batches of frames wait for
their metrics, so memory stays bounded however slow the CPU is.

When LPIPS cannot be computed (no AlexNet backbone offline), the result says why in
`lpips_unavailable` and has PSNR, SSIM and colourfulness still.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..devices import pick_device
from ..errors import InputError
from ..shards import shard_urls
from .colorize import load_colorizer, predict_ab
from .data import compose_rgb, eval_loader
from .metrics import (LpipsUnavailable, MetricsAccumulator, colorfulness_rgb, image_metrics, lpips_distance,
                      lpips_model)

METRIC_THREADS = min(4, os.cpu_count() or 1)
METRIC_COLUMNS = (("lpips", "LPIPS", "{:.4f}"), ("psnr", "PSNR", "{:.3f}"), ("ssim", "SSIM", "{:.4f}"),
                  ("colorfulness", "colourful", "{:.1f}"), ("colorfulness_original", "orig colour", "{:.1f}"))


def cpu_metrics(reference: np.ndarray, colorized: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and colourfulness of a colorized frame (metrics.image_metrics), and the colourfulness
    of the original for comparison."""
    return {**image_metrics(reference, colorized), "colorfulness_original": colorfulness_rgb(reference)}


def _lpips_or_reason(backbone: str | Path | None, device: str):
    """(the LPIPS model, None) or (None, why it cannot be computed)."""
    try:
        # torch.hub prints "Downloading: ..." on stdout, where `evaluate --json` writes its JSON
        with contextlib.redirect_stdout(sys.stderr):
            return lpips_model(backbone, device), None
    except LpipsUnavailable as e:
        return None, str(e)


def _first_samples(loader, limit: int | None) -> Iterator[dict]:
    """The loader's batches up to `limit` samples in all (the last one cut short)."""
    left = math.inf if limit is None else limit
    for batch in loader:
        if left <= 0:
            return
        count = min(len(batch["key"]), left)
        yield {name: value[:count] for name, value in batch.items()}
        left -= count


def _labels(batch: dict) -> list[int | None]:
    return [int(onehot.argmax()) if has else None for onehot, has in zip(batch["onehot"], batch["has_label"])]


def _predicted(batches: Iterator[dict], generator, device: str) -> Iterator[tuple]:
    """(key, label, original BGR, predicted ab) per frame."""
    for batch in batches:
        ab = predict_ab(generator, batch["lightness"], device)
        # the DataLoader's default_convert has turned the numpy frames into tensors: back to numpy
        originals = [np.asarray(frame) for frame in batch["original"]]
        yield from zip(batch["key"], _labels(batch), originals, ab)


def _jobs(frames: Iterator[tuple], pool: ThreadPoolExecutor, lpips_net) -> Iterator[tuple[dict, Future]]:
    """Per frame: its row so far (key, label, LPIPS) and the future of its CPU metrics. The official
    reconstruction: predicted ab resized to the frame and joined with the frame's own L."""
    for key, label, original, ab in frames:
        reference, colorized = np.ascontiguousarray(original[..., ::-1]), compose_rgb(original, ab)
        row = {"key": key, "label": label}
        if lpips_net is not None:
            row["lpips"] = lpips_distance(lpips_net, reference, colorized)
        yield row, pool.submit(cpu_metrics, reference, colorized)


def _in_order(jobs: Iterator[tuple[dict, Future]], ahead: int) -> Iterator[dict]:
    """Each job's row completed with its future's metrics, in order, `ahead` jobs at most in flight."""
    pending: deque[tuple[dict, Future]] = deque()
    for job in jobs:
        pending.append(job)
        if len(pending) > ahead:
            row, future = pending.popleft()
            yield {**row, **future.result()}
    for row, future in pending:
        yield {**row, **future.result()}


def _named(summary: dict, label_names: list[str]) -> dict:
    """summary['per_label'] with each label's name (None for the unlabelled frames)."""
    named = {}
    for label, entry in summary["per_label"].items():
        index = None if label == "unlabeled" else int(label)
        name = label_names[index] if index is not None and index < len(label_names) else None
        named[label] = {"name": name, **entry}
    return named


def evaluate(shards, checkpoint: str | Path, device: str = "auto", batch_size: int = 16, workers: int = 2,
             lpips_backbone: str | Path | None = None, limit: int | None = None, split: str = "test",
             per_image: bool = False) -> dict:
    """The official protocol over `shards` (a pattern, folder or list: shards.shard_urls), the first
    `limit` samples only when given (in the loader's order: shard order, batches taken from the
    workers in turn). A JSON-ready dict; `per_image` adds each frame's key, label and metrics."""
    device = pick_device(device)
    urls = shard_urls(shards, split)
    generator, config = load_colorizer(checkpoint, device)
    lpips_net, lpips_unavailable = _lpips_or_reason(lpips_backbone, device)
    workers = min(workers, len(urls))  # a worker without a shard would yield nothing
    loader = eval_loader(urls, config["num_classes"], batch_size, workers, keep_original=True, split=split,
                         image_size=config["image_size"])
    start = time.perf_counter()
    with ThreadPoolExecutor(METRIC_THREADS) as pool:
        frames = _predicted(_first_samples(loader, limit), generator, device)
        rows = list(tqdm(_in_order(_jobs(frames, pool, lpips_net), ahead=2 * batch_size), total=limit,
                         desc="evaluate", unit="img", disable=None))
    seconds = time.perf_counter() - start

    accumulator = MetricsAccumulator()
    for row in rows:
        accumulator.add({name: value for name, value in row.items() if name not in ("key", "label")}, row["label"])
    summary = accumulator.summary()
    if summary["images"] == 0:
        raise InputError(f"{shards}: no {split} samples to evaluate")
    result = {
        "checkpoint": str(checkpoint), "variant": config["variant"], "image_size": config["image_size"],
        "shards": urls, "split": split,
        "images": summary["images"], "mean": summary["mean"],
        "per_label": _named(summary, config.get("label_names") or []),
        "lpips_unavailable": lpips_unavailable,
        "settings": {"device": device, "batch_size": batch_size, "workers": workers, "limit": limit,
                     "lpips_backbone": None if lpips_backbone is None else str(lpips_backbone),
                     "metric_threads": METRIC_THREADS},
        "seconds": round(seconds, 3), "images_per_second": round(summary["images"] / seconds, 3),
    }
    if per_image:
        result["per_image"] = rows
    return result


# -- the CLI's table ------------------------------------------------------------------------------
def _table_row(title: str, entry: dict) -> str:
    cells = [fmt.format(entry["mean"][name]) if name in entry["mean"] else "-" for name, _, fmt in METRIC_COLUMNS]
    return f"{title[:44]:<44} {entry['images']:>7} " + " ".join(f"{cell:>11}" for cell in cells)


def format_evaluation(result: dict) -> str:
    """A human-readable report: what was evaluated, then a table of the means overall and per label."""
    lines = [
        f"checkpoint {result['checkpoint']} ({result['variant']}, {result['image_size']} px)",
        f"{len(result['shards'])} {result['split']} shards, {result['images']} images in {result['seconds']:.1f} s "
        f"({result['images_per_second']:.2f} images/s) on {result['settings']['device']}",
    ]
    if result["lpips_unavailable"]:
        lines.append(f"no LPIPS: {result['lpips_unavailable']}")
    header = f"{'label':<44} {'images':>7} " + " ".join(f"{title:>11}" for _, title, _ in METRIC_COLUMNS)
    lines += ["", header, _table_row("all", result)]
    for label, entry in result["per_label"].items():
        lines.append(_table_row(label if entry["name"] is None else f"{label} {entry['name']}", entry))
    return "\n".join(lines)
