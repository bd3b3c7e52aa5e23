"""HistoryNet's input pipeline: shards (as `mhmd shard` writes them: shards.py) to batches of OpenCV
8-bit Lab tensors.

Each sample becomes, in the DataLoader workers: `lightness` (the L of the frame resized to 224x224),
`ab` (the colour target), `onehot` and `has_label` (from `cls`, read by shards.sample_label: -1 or no
`cls` is unlabelled), `parsing` and `has_parsing` (the L channel of `mask.png`) and `key`; batches
are dicts of stacked tensors. Images stay uint8 until `unit_float` scales them to /255 on the
training device: a quarter of the bytes cross from the workers to the trainer and to the GPU
(float32 batches made the loader 0.6x a plain one). The generator copies L/255 to the 3 channels
VGG expects itself.

- `train_loader`: resampled shards (each worker and DDP rank draws its own seeded shard stream), a
  shuffle buffer, and an epoch of a given number of samples.
- `eval_loader`: every sample exactly once, in shard order; shards are split across DDP ranks and
  workers (a rank or worker left without a shard yields nothing), optionally with the original frame.
- `lab_input`, `ab_levels` and `rgb_from_ab_levels` / `rgb_from_lab`: the same conversion for a single
  photo (colorize) and the reconstruction of a full-resolution RGB image from predicted ab that
  evaluate's protocols build on.

A sample whose jpg (or mask.png) cannot be decoded stops the run with an error naming its shard and
key: shards are written by `mhmd shard` from JPEGs it encoded itself, so a bad one means a damaged
file that the user must know about, and skipping it would silently change the test set.
"""
from __future__ import annotations

import math
import random
from functools import partial

import cv2
import numpy as np
import torch
import webdataset as wds

from ..errors import InputError
from ..shards import JPG, KEY, MASK, sample_label, shard_urls

INPUT_SIZE = 224
SAMPLE_TENSORS = ("lightness", "ab", "onehot", "has_label", "parsing", "has_parsing")


# -- one image ------------------------------------------------------------------------------------
def _resized(image: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    """size x size, aspect ratio not kept (as the official code does); INTER_AREA when shrinking (it
    averages instead of aliasing), bilinear when a side grows."""
    if interpolation is None:
        shrinking = min(image.shape[:2]) >= size
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def _lab_resized(bgr: np.ndarray, size: int) -> np.ndarray:
    return cv2.cvtColor(_resized(bgr, size), cv2.COLOR_BGR2LAB)


def _channels_first(image: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC uint8 -> CxHxW uint8 tensor."""
    image = image[..., None] if image.ndim == 2 else image
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def unit_float(tensor: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 on `device`, scaled there (a quarter of the bytes to move)."""
    return tensor.to(device, non_blocking=True).float().div_(255)


def lightness(bgr: np.ndarray) -> np.ndarray:
    """The full-resolution L channel (uint8 HxW) of a BGR uint8 image, OpenCV 8-bit Lab."""
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)[..., 0]


def lab_input(bgr: np.ndarray, image_size: int = INPUT_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """A photo as the network sees it (its L resized, uint8 1x224x224; `unit_float` it) and its
    full-resolution L (uint8 HxW), which `rgb_from_lab` joins with the predicted ab."""
    return _channels_first(_lab_resized(bgr, image_size)[..., 0]), lightness(bgr)


def ab_levels(ab224: np.ndarray, truncate: bool = False) -> np.ndarray:
    """Predicted ab (2xSxS, ab/255) as 8-bit levels, SxSx2 uint8: rounded to the nearest level, or with
    `truncate` cut down as the official code's `astype(np.uint8)` does (float32 x 255, clipped to 0..255,
    then the cast: a bias of half a level)."""
    scaled = np.asarray(ab224, dtype=np.float32) * np.float32(255)
    if not truncate:
        scaled = np.rint(scaled)
    return np.ascontiguousarray(np.clip(scaled, 0, 255).astype(np.uint8).transpose(1, 2, 0))


def rgb_from_ab_levels(lightness_full: np.ndarray, ab8: np.ndarray) -> np.ndarray:
    """8-bit ab (any size x 2) resized bilinearly to the size of `lightness_full` (cv2.resize's default,
    as the official code calls it), joined with that full-resolution L, Lab -> RGB uint8 HxWx3."""
    height, width = lightness_full.shape
    ab = cv2.resize(ab8, (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(np.dstack([lightness_full, ab]), cv2.COLOR_LAB2RGB)


def rgb_from_lab(lightness_full: np.ndarray, ab224: np.ndarray) -> np.ndarray:
    """The reconstruction `colorize` writes: predicted ab (2x224x224, ab/255) rounded to 8 bits, resized
    to the size of `lightness_full` and joined with it (evaluate's official protocol truncates instead)."""
    return rgb_from_ab_levels(lightness_full, ab_levels(ab224))


# -- samples and batches --------------------------------------------------------------------------
def _image(sample: dict, member: str) -> np.ndarray:
    where = f"{sample.get('__url__', '?')}: sample {sample[KEY]}"
    if member not in sample:
        raise InputError(f"{where}: has no {member}")
    image = cv2.imdecode(np.frombuffer(sample[member], np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"{where}: its {member} cannot be decoded")
    return image


def _onehot(label: int | None, sample: dict, num_classes: int) -> torch.Tensor:
    """The one-hot of `label`, all zeros for an unlabelled sample."""
    onehot = torch.zeros(num_classes, dtype=torch.float32)
    if label is not None:
        if not 0 <= label < num_classes:
            raise InputError(f"{sample.get('__url__', '?')}: sample {sample[KEY]}: label {label} is "
                             f"outside 0..{num_classes - 1} ({num_classes} classes)")
        onehot[label] = 1
    return onehot


def _parsing(sample: dict, size: int) -> torch.Tensor:
    """The L channel of the colour-coded parsing image, uint8 1x224x224 (nearest: codes are not blended)."""
    if MASK not in sample:
        return torch.zeros(1, size, size, dtype=torch.uint8)
    return _channels_first(_resized(lightness(_image(sample, MASK)), size, cv2.INTER_NEAREST))


def decode_sample(sample: dict, num_classes: int, keep_original: bool = False, image_size: int = INPUT_SIZE) -> dict:
    """One raw shard sample (member name -> bytes) as the tensors HistoryNet trains on (224 as in the
    paper; tests use small sizes)."""
    bgr = _image(sample, JPG)
    lab = _lab_resized(bgr, image_size)
    label = sample_label(sample)
    decoded = {
        "lightness": _channels_first(lab[..., 0]),
        "ab": _channels_first(lab[..., 1:]),
        "onehot": _onehot(label, sample, num_classes),
        "has_label": torch.tensor(label is not None),
        "parsing": _parsing(sample, image_size),
        "has_parsing": torch.tensor(MASK in sample),
        "key": sample[KEY],
    }
    if keep_original:
        decoded["original"] = bgr
    return decoded


def collate(samples: list[dict]) -> dict:
    """Stacked tensors; `key` (and `original`, frames of any size) as lists."""
    batch = {name: torch.stack([s[name] for s in samples]) for name in SAMPLE_TENSORS}
    batch["key"] = [s["key"] for s in samples]
    if "original" in samples[0]:
        batch["original"] = [s["original"] for s in samples]
    return batch


def _loader(dataset: wds.DataPipeline, num_workers: int, persistent: bool = False) -> wds.WebLoader:
    # Batches are made in the workers (wds.batched), so the DataLoader passes them on as they are.
    # No cv2.setNumThreads in the workers: in a process forked after OpenCV's thread pool started it deadlocks.
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers,
                         persistent_workers=persistent and num_workers > 0)


# -- loaders --------------------------------------------------------------------------------------
def train_loader(shards, num_classes: int, epoch_samples: int, batch_size: int = 16, num_workers: int = 4,
                 shuffle_buffer: int = 1000, seed: int = 0, split: str = "train",
                 image_size: int = INPUT_SIZE) -> wds.WebLoader:
    """Endless seeded resampling of the shards, cut into epochs of about `epoch_samples` samples per
    process (per DDP rank: give each rank its share). Every worker yields whole batches; the epoch is
    rounded up to a whole number of batches per worker, and len(loader) is its number of batches.
    Workers persist across epochs: their shard sampler counts epochs and draws a new stream for each
    (fresh workers would start from the same copy every epoch and replay the first one)."""
    workers = max(num_workers, 1)
    batches_per_worker = math.ceil(epoch_samples / (batch_size * workers))
    dataset = wds.DataPipeline(
        # deterministic: the shard stream depends on (seed, rank, worker, epoch) alone
        wds.ResampledShards(shard_urls(shards, split), seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle_buffer, rng=random.Random(seed)),
        wds.map(partial(decode_sample, num_classes=num_classes, image_size=image_size)),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ).with_epoch(nbatches=batches_per_worker)
    return _loader(dataset, num_workers, persistent=True).with_length(batches_per_worker * workers, silent=True)


def eval_loader(shards, num_classes: int, batch_size: int = 16, num_workers: int = 4, keep_original: bool = False,
                split: str = "test", image_size: int = INPUT_SIZE) -> wds.WebLoader:
    """Every sample once, shards split across DDP ranks then workers (no sample twice), in a fixed
    order. With `keep_original`, batches also carry `original`: the decoded BGR uint8 frames."""
    dataset = wds.DataPipeline(
        wds.SimpleShardList(shard_urls(shards, split)),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(partial(decode_sample, num_classes=num_classes, keep_original=keep_original, image_size=image_size)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return _loader(dataset, num_workers)
