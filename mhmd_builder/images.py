"""Images on disk: the extracted JPEGs read back as pixels (`load_frame`, or `decode_jpegs` in batches on
a model's device), and images that come from
outside (parsing maps, photos to colorize) checked before they are decoded (`open_image`), read
with `read_regular_file`, which reads other outside files (label files) the same way.

An outside image is read only when it is a regular file (a FIFO or a device is refused without
reading from it) of at most MAX_IMAGE_BYTES, and decoded only when its header says it has at most
MAX_IMAGE_PIXELS pixels: a small file that claims 30000x30000 pixels is refused from its header,
never decoded.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from .errors import InputError

# 8192 x 8192: far above any film frame, parsing map or photo to colorize.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_BYTES = 512 << 20


class ImageError(InputError):
    """An outside image that is refused or cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class ImageFile:
    """An outside image's bytes and the size its header gives, not decoded yet."""

    path: Path
    data: np.ndarray  # the file's bytes (uint8)
    width: int
    height: int

    def decode(self, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
        image = cv2.imdecode(self.data, flags)
        if image is None:
            raise ImageError(f"{self.path}: cannot be read as an image (corrupt image data)")
        return image


def read_frame(path: Path) -> np.ndarray | None:
    """The bytes of an extracted JPEG, or None when it is missing or empty."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None
    return data if data.size else None


def load_frame(path: Path) -> np.ndarray | None:
    """The BGR pixels of a JPEG, or None when it is missing or corrupt."""
    data = read_frame(path)
    return None if data is None else cv2.imdecode(data, cv2.IMREAD_COLOR)


def decode_jpegs(datas: list[np.ndarray], device) -> list:
    """RGB uint8 CHW tensors on `device` for JPEG bytes (`read_frame`), decoded there in one batch by
    torchvision (nvjpeg on CUDA), None for each that is corrupt. A JPEG torchvision refuses is tried
    alone, then with OpenCV, so a frame is unreadable only when `load_frame` finds it so too."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.from_numpy(data) for data in datas]
    if torch.device(device).type == "cuda":
        # nvJPEG writes on its own stream into memory allocated on ours without waiting for it: work still
        # queued on ours (letterboxing the last batch) could read a freed block it reuses (pytorch/vision#9606).
        torch.cuda.current_stream(device).synchronize()
    try:
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device) if tensors else []
    except RuntimeError:  # one bad JPEG fails the batch: find it
        pass
    images = []
    for tensor, data in zip(tensors, datas):
        try:
            images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
            images.append(None if bgr is None else torch.from_numpy(bgr[:, :, ::-1].transpose(2, 0, 1).copy()).to(device))
    return images


def open_image(path: str | Path) -> ImageFile:
    """Read an outside image's bytes and its header's size; ImageError when it is not a regular
    file, is larger than MAX_IMAGE_BYTES, has no image header, or has more than MAX_IMAGE_PIXELS."""
    path = Path(path)
    data = read_regular_file(path, MAX_IMAGE_BYTES)
    try:
        with warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning), \
                Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Image.DecompressionBombError:  # Pillow's own limit, twice its warning's, is above ours
        raise ImageError(f"{path}: more pixels than the {MAX_IMAGE_PIXELS:,} an image may have") from None
    except Exception:  # Pillow's header parsers raise many kinds on hostile bytes
        raise ImageError(f"{path}: cannot be read as an image") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{path}: {width}x{height}, more pixels than the {MAX_IMAGE_PIXELS:,} an image may have")
    return ImageFile(path, np.frombuffer(data, np.uint8), width, height)


def read_regular_file(path: Path, limit: int, kind: str = "an image",
                      error: Callable[[str], Exception] = ImageError) -> bytes:
    """The bytes of an outside file (an image, a label file) of at most `limit` bytes; `error(message)`
    is raised when it is not a regular file (a FIFO or device is never read from), larger, or unreadable."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # checked before opening: opening a FIFO blocks
            raise error(f"{path}: not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even if it became a FIFO since
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise error(f"{path}: not a regular file")
            if info.st_size > limit:
                raise error(f"{path}: {info.st_size:,} bytes, more than the {limit:,} {kind} may have")
            return file.read(limit)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
