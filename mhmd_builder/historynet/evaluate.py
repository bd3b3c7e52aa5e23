"""`mhmd historynet evaluate`: HistoryNet's official evaluation protocol over test shards.

For every frame the generator predicts ab at its input size (the checkpoint's image_size) from the
frame's L; a protocol (PROTOCOLS) turns that prediction into a colorized image of the frame's size,
which is compared with the original RGB frame: PSNR, SSIM, LPIPS (AlexNet), and the colourfulness of
both. Means over all frames and per label (`cls`; unlabelled frames apart).

- `official` (the default), as the official code's colorization script writes its images and its
  metric scripts read them back (cv2.imread): ab x 255 clipped and cast to uint8 (truncated), resized
  bilinearly to the frame, joined with the frame's own L, Lab -> BGR, saved as JPEG at OpenCV's default
  quality 95 and decoded again; the metrics compare the original frame with that decoded image. (The official code also scales L to /255 and back before its cast: lossless for
  every level, so the frame's own L is used as is.)
- `rounded`: ab rounded to the nearest level and no JPEG: the image `colorize` writes (PNG).

Every evaluation also scores the grey baseline on the same frames through the same protocol: ab = 0
(8-bit level 128), i.e. the frame's own L and no colour. A model has learnt colour only where it beats it.

Inference runs on the device (bf16 autocast and channels_last on CUDA, as `colorize` does), and LPIPS
too, both from this thread: torch called from several threads would start an OpenMP team of intra-op
threads per thread on the CPU. PSNR, SSIM and colourfulness run on the CPU in a small thread pool while
the next frames are predicted. SSIM on the full-size frame is the slow part (measured on one core:
70-90 ms for a 360x640 frame, 170 ms for 576x720, 300 ms for 720x1280, 650 ms for 1080x1920; PSNR and
colourfulness together 30-60 ms; twice that per frame with the grey baseline), and it mostly releases
the GIL (scipy.ndimage's filters): a Python loop kept 73% of its speed while SSIM ran in another thread.
At most two batches of frames wait for their metrics, so memory stays bounded however slow the CPU is.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from tqdm import tqdm

from ..devices import pick_device
from ..errors import InputError
from ..logs import bars_disable
from ..shards import shard_urls
from .colorize import load_colorizer, predict_ab
from .data import ab_levels, eval_loader, lightness, rgb_from_ab_levels
from .metrics import (LpipsUnavailable, MetricsAccumulator, colorfulness_rgb, image_metrics, lpips_distance,
                      lpips_model)

METRIC_THREADS = min(4, os.cpu_count() or 1)
METRIC_COLUMNS = (("lpips", "LPIPS", "{:.4f}"), ("psnr", "PSNR", "{:.3f}"), ("ssim", "SSIM", "{:.4f}"),
                  ("colorfulness", "colourful", "{:.1f}"), ("colorfulness_original", "orig colour", "{:.1f}"))
GREY_AB = np.full((1, 1, 2), 128, np.uint8)  # ab = 0 in OpenCV's 8-bit Lab: no colour


@dataclass(frozen=True)
class Protocol:
    """How predicted ab becomes the colorized image that is scored."""
    truncate: bool  # ab cut down to 8 bits (the official astype(np.uint8)) rather than rounded
    jpeg_quality: int | None  # the image saved as JPEG at this quality and read back; None: scored as is


PROTOCOLS = {"official": Protocol(truncate=True, jpeg_quality=95),
             "rounded": Protocol(truncate=False, jpeg_quality=None)}


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """`rgb` written as a JPEG by OpenCV (from BGR, as cv2.imwrite writes the official images) and decoded."""
    _, encoded = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1])


def reconstructed(lightness_full: np.ndarray, ab8: np.ndarray, protocol: Protocol) -> np.ndarray:
    """The scored RGB image: 8-bit ab joined with the frame's full-resolution L, then the JPEG round trip."""
    rgb = rgb_from_ab_levels(lightness_full, ab8)
    return rgb if protocol.jpeg_quality is None else jpeg_round_trip(rgb, protocol.jpeg_quality)


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


def _completed(row: dict, reference: np.ndarray, colorized: np.ndarray, grey: np.ndarray) -> dict:
    """`row` (key, label and LPIPS so far) with the CPU metrics of the model's image and of grey's."""
    return {**row, **cpu_metrics(reference, colorized), "grey": {**row["grey"], **cpu_metrics(reference, grey)}}


def _jobs(frames: Iterator[tuple], pool: ThreadPoolExecutor, lpips_net, protocol: Protocol) -> Iterator[Future]:
    """Per frame, the future of its completed row: the model's image and the grey baseline's, both made
    by `protocol` and scored against the original; LPIPS here, the rest in the pool."""
    for key, label, original, ab in frames:
        reference, full_l = np.ascontiguousarray(original[..., ::-1]), lightness(original)
        colorized = reconstructed(full_l, ab_levels(ab, protocol.truncate), protocol)
        grey = reconstructed(full_l, GREY_AB, protocol)
        row = {"key": key, "label": label, "grey": {}}
        if lpips_net is not None:
            row["lpips"] = lpips_distance(lpips_net, reference, colorized)
            row["grey"]["lpips"] = lpips_distance(lpips_net, reference, grey)
        yield pool.submit(_completed, row, reference, colorized, grey)


def _in_order(jobs: Iterator[Future], ahead: int) -> Iterator[dict]:
    """Each job's result, in order, `ahead` jobs at most in flight."""
    pending: deque[Future] = deque()
    for job in jobs:
        pending.append(job)
        if len(pending) > ahead:
            yield pending.popleft().result()
    for job in pending:
        yield job.result()


def _summary(metrics: list[dict], labels: list[int | None]) -> dict:
    """Means overall and per label (MetricsAccumulator.summary) of each frame's metrics."""
    accumulator = MetricsAccumulator()
    for one, label in zip(metrics, labels):
        accumulator.add(one, label)
    return accumulator.summary()


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
             per_image: bool = False, protocol: str = "official") -> dict:
    """`protocol` (PROTOCOLS) over `shards` (a pattern, folder or list: shards.shard_urls), the first
    `limit` samples only when given (in the loader's order: shard order, batches taken from the
    workers in turn), the grey baseline beside the model. A JSON-ready dict; `per_image` adds each
    frame's key, label and metrics (grey's under `grey`)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"--protocol {protocol}: unknown (available: {', '.join(PROTOCOLS)})")
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
        rows = list(tqdm(_in_order(_jobs(frames, pool, lpips_net, PROTOCOLS[protocol]), ahead=2 * batch_size),
                         total=limit, desc="evaluate", unit="img", disable=bars_disable()))
    seconds = time.perf_counter() - start
    if not rows:
        raise InputError(f"{shards}: no {split} samples to evaluate")

    labels = [row["label"] for row in rows]
    model = _summary([{k: v for k, v in row.items() if k not in ("key", "label", "grey")} for row in rows], labels)
    grey = _summary([row["grey"] for row in rows], labels)
    label_names = config.get("label_names") or []
    result = {
        "checkpoint": str(checkpoint), "variant": config["variant"], "image_size": config["image_size"],
        "shards": urls, "split": split, "protocol": protocol,
        "images": model["images"], "mean": model["mean"], "per_label": _named(model, label_names),
        "grey": {"mean": grey["mean"], "per_label": _named(grey, label_names)},
        "lpips_unavailable": lpips_unavailable,
        "settings": {"device": device, "batch_size": batch_size, "workers": workers, "limit": limit,
                     "lpips_backbone": None if lpips_backbone is None else str(lpips_backbone),
                     "metric_threads": METRIC_THREADS},
        "seconds": round(seconds, 3), "images_per_second": round(model["images"] / seconds, 3),
    }
    if per_image:
        result["per_image"] = rows
    return result


# -- the CLI's table ------------------------------------------------------------------------------
def _table_row(title: str, images: int, mean: dict) -> str:
    cells = [fmt.format(mean[name]) if name in mean else "-" for name, _, fmt in METRIC_COLUMNS]
    return f"{title[:44]:<44} {images:>7} " + " ".join(f"{cell:>11}" for cell in cells)


def _rows_with_grey(title: str, entry: dict, grey: dict) -> list[str]:
    """The model's row, and under it grey's on the same frames."""
    return [_table_row(title, entry["images"], entry["mean"]), _table_row("  grey", entry["images"], grey["mean"])]


def format_evaluation(result: dict) -> str:
    """A human-readable report: what was evaluated, then a table of the means overall and per label,
    each with the grey baseline's on the same frames beneath it."""
    lines = [
        f"checkpoint {result['checkpoint']} ({result['variant']}, {result['image_size']} px), "
        f"{result['protocol']} protocol",
        f"{len(result['shards'])} {result['split']} shards, {result['images']} images in {result['seconds']:.1f} s "
        f"({result['images_per_second']:.2f} images/s) on {result['settings']['device']}",
    ]
    if result["lpips_unavailable"]:
        lines.append(f"no LPIPS: {result['lpips_unavailable']}")
    header = f"{'label':<44} {'images':>7} " + " ".join(f"{title:>11}" for _, title, _ in METRIC_COLUMNS)
    lines += ["", header, *_rows_with_grey("all", result, result["grey"])]
    for label, entry in result["per_label"].items():
        title = label if entry["name"] is None else f"{label} {entry['name']}"
        lines += _rows_with_grey(title, entry, result["grey"]["per_label"][label])
    return "\n".join(lines)
