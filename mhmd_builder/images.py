"""Frames on disk: the extracted JPEGs read back as pixels, by every stage that looks at them."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def load_frame(path: Path) -> np.ndarray | None:
    """The BGR pixels of a JPEG, or None when it is missing or corrupt."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
