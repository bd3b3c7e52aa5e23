"""`mhmd historynet colorize`: colorize photos with a HistoryNet checkpoint.

Each photo (any size; grey or colour: only its L is used) takes the evaluation's own path
(`data.lab_input`, `data.rgb_from_lab`): its L resized to the model's input size, ab predicted, that ab
resized back to the photo's size and joined with the photo's full-resolution L. The output,
OUT/<stem>.png, has the input's size, and its L is the input's up to the 8-bit Lab -> RGB -> Lab round
trip (rounding, and the clipping of predicted colours that fall outside the RGB gamut).

Inputs are checked before any work: a missing path, a folder without images, two inputs that would
write the same name or an output that would overwrite its input raise ColorizeError. A file that cannot
be decoded, or is refused before decoding (not a regular file, more pixels than images.MAX_IMAGE_PIXELS
by its header), does not stop the others: nothing is written for it and `Colorized.failures` has a line
naming it (the CLI prints them and exits 1).

`load_colorizer` and `predict_ab` are the inference path that `evaluate` uses too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import torch
from tqdm import tqdm

from ..batching import batched
from ..devices import pick_device
from ..errors import InputError
from ..images import ImageError, open_image
from ..logs import bars_disable
from ..workdir import atomic_write_bytes
from .checkpoint import load_generator
from .data import lab_input, rgb_from_lab, unit_float
from .model import HistoryNetGenerator

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ColorizeError(InputError):
    """The inputs or the output folder cannot be used; the message names the path."""


@dataclass
class Colorized:
    """What `colorize` did: the files written, and why the others were not."""

    written: list[Path] = field(default_factory=list)  # in input order
    failures: list[str] = field(default_factory=list)  # one line per input that could not be read


# -- inference (shared with evaluate) -------------------------------------------------------------
def load_colorizer(checkpoint: str | Path, device: str) -> tuple[HistoryNetGenerator, dict]:
    """The checkpoint's generator in eval mode on `device` (channels_last on CUDA) and its config."""
    generator, config = load_generator(checkpoint, device)
    if device.startswith("cuda"):
        generator = generator.to(memory_format=torch.channels_last)
    return generator, config


def predict_ab(generator: HistoryNetGenerator, small_lightness: torch.Tensor, device: str) -> np.ndarray:
    """ab/255 (B x 2 x S x S float32, on the CPU) for L (B x 1 x S x S uint8); bf16 autocast on CUDA."""
    device_type = torch.device(device).type
    with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        lightness = unit_float(small_lightness, device)
        if device_type == "cuda":
            lightness = lightness.contiguous(memory_format=torch.channels_last)
        return generator(lightness).ab.float().cpu().numpy()


# -- inputs ---------------------------------------------------------------------------------------
def input_images(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files as given; folders as their images (by suffix, any case), sorted by name."""
    images = []
    for given in map(Path, [inputs] if isinstance(inputs, (str, Path)) else inputs):
        if given.is_dir():
            # dot files are skipped: macOS "._x.jpg" companions and our own temporary files are not photos
            found = sorted(p for p in given.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not found:
                raise ColorizeError(f"{given}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif given.is_file():
            images.append(given)
        elif given.exists():
            raise ColorizeError(f"{given}: not a regular file or folder")
        else:
            raise ColorizeError(f"{given}: no such file or folder")
    if not images:
        raise ColorizeError("no images given")
    return images


def output_paths(images: list[Path], out: Path) -> list[Path]:
    """OUT/<stem>.png for each image; refused when two images would write the same file, or when an
    output would replace its own input."""
    first_for: dict[Path, Path] = {}
    for image in images:
        target = out / f"{image.stem}.png"
        if target in first_for:
            raise ColorizeError(f"{first_for[target]} and {image} would both be written to {target}: rename one")
        if target.resolve() == image.resolve():
            raise ColorizeError(f"{image}: its output would overwrite it (choose another output folder)")
        first_for[target] = image
    return list(first_for)


# -- colorize -------------------------------------------------------------------------------------
def _readable(images: list[Path], targets: list[Path], failures: list[str]) -> Iterator[tuple[np.ndarray, Path]]:
    """(BGR, target) of each readable image; a line in `failures` for the others."""
    for image, target in zip(images, targets):
        try:
            bgr = open_image(image).decode(cv2.IMREAD_COLOR)
        except ImageError as e:
            failures.append(str(e))
            continue
        yield bgr, target


def _colorize_batch(generator: HistoryNetGenerator, image_size: int, device: str,
                    batch: list[tuple[np.ndarray, Path]]) -> list[Path]:
    prepared = [lab_input(bgr, image_size) for bgr, _ in batch]  # (L uint8 1xSxS, full-size L)
    ab = predict_ab(generator, torch.stack([small for small, _ in prepared]), device)
    for (_, lightness_full), ab_one, (_, target) in zip(prepared, ab, batch):
        rgb = rgb_from_lab(lightness_full, ab_one)
        atomic_write_bytes(target, cv2.imencode(".png", rgb[..., ::-1])[1].tobytes())
    return [target for _, target in batch]


def colorize(inputs: str | Path | Iterable[str | Path], checkpoint: str | Path, out: str | Path, device: str = "auto",
             batch_size: int = 8) -> Colorized:
    """Colorize IMAGE_OR_DIR... into OUT/<stem>.png, `batch_size` photos per forward pass."""
    out = Path(out)
    images = input_images(inputs)
    targets = output_paths(images, out)
    device = pick_device(device)
    generator, config = load_colorizer(checkpoint, device)
    result = Colorized()
    with tqdm(total=len(images), desc="colorize", unit="img", disable=bars_disable()) as bar:
        for batch in batched(_readable(images, targets, result.failures), batch_size):
            result.written += _colorize_batch(generator, config["image_size"], device, batch)
            bar.update(len(result.written) + len(result.failures) - bar.n)
        bar.update(len(images) - bar.n)  # unreadable files after the last batch
    return result
