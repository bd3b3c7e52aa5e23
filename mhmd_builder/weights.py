"""Pretrained weights: where downloads are kept, and the published SHA-256 they must have.

The published hashes are data (`pinned_weights.csv` beside this module: file name, size in bytes,
SHA-256, as ultralytics and torchvision publish them). A file whose name is pinned and whose bytes
differ is refused; any other local file is taken as it is (the user's own fine-tuned weights).
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

from .errors import MhmdError

PINNED_FILE = Path(__file__).with_name("pinned_weights.csv")


class WeightsError(MhmdError):
    """Weights that cannot be had or are not the published file."""


def _read_pinned() -> dict[str, str]:
    with open(PINNED_FILE, newline="") as f:
        return {row["file"]: row["sha256"] for row in csv.DictReader(f)}


PINNED_SHA256 = _read_pinned()


def weights_cache() -> Path:
    """Where downloaded weights are kept: $MHMD_WEIGHTS_DIR, else ~/.cache/mhmd_builder/weights."""
    return Path(os.environ.get("MHMD_WEIGHTS_DIR") or Path.home() / ".cache" / "mhmd_builder" / "weights")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> Path:
    """`path` when its SHA-256 is the published one; else a WeightsError saying it is refused."""
    digest = sha256_of(path)
    if digest != expected:
        raise WeightsError(f"{path}: SHA-256 {digest[:16]}... does not match the published {expected[:16]}... "
                           f"for {path.name}: refusing it (delete the file to download again)")
    return path


def check_pinned(path: Path) -> Path:
    """A file with a pinned name must have its published hash; other files are taken as they are."""
    pinned = PINNED_SHA256.get(path.name)
    return verify_sha256(path, pinned) if pinned else path
