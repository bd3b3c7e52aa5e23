"""Frame quality: scores taken on the decoded frame inside the extract pass, and keep decisions.

The extract stage feeds every sampled frame to a `QualityFilter` and encodes a JPEG only for the
frames it keeps. A filter may hold frames back (to compare neighbours) and return verdicts later,
always in frame order; `flush()` returns whatever is still held at the end of a movie.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import cv2
import numpy as np

# Fixed order in which failed checks are reported; the first one is the frame's reject_reason.
REASONS = ("grayscale", "blurry")


@dataclass(frozen=True)
class QualityThresholds:
    min_colorfulness: float = 10.0
    min_sharpness: float = 30.0

    @classmethod
    def from_mapping(cls, values: dict | None) -> "QualityThresholds":
        values = values or {}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown quality thresholds: {', '.join(sorted(unknown))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FrameVerdict:
    """One sampled frame after scoring: `frame` is kept only when the frame passed."""

    meta: dict
    scores: dict[str, float]
    flags: list[str] = field(default_factory=list)
    frame: np.ndarray | None = None

    @property
    def kept(self) -> bool:
        return not self.flags

    @property
    def reason(self) -> str | None:
        return self.flags[0] if self.flags else None


def colorfulness(bgr: np.ndarray) -> float:
    """Hasler and Suesstrunk (2003) colourfulness on signed opponent channels."""
    b, g, r = (c.astype(np.float32) for c in cv2.split(bgr))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def sharpness(bgr: np.ndarray, side: int = 512) -> float:
    """Variance of the Laplacian on a grey image of fixed size, so it does not depend on resolution."""
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    h, w = gray.shape
    scale = side / max(h, w)
    gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(gray, cv2.CV_32F).var())


def score_frame(bgr: np.ndarray) -> dict[str, float]:
    return {"colorfulness": colorfulness(bgr), "sharpness": sharpness(bgr)}


def judge(scores: dict[str, float], thresholds: QualityThresholds) -> list[str]:
    """All failed checks, in the fixed order of REASONS."""
    failed = {
        "grayscale": scores["colorfulness"] < thresholds.min_colorfulness,
        "blurry": scores["sharpness"] < thresholds.min_sharpness,
    }
    return [reason for reason in REASONS if failed[reason]]


class QualityFilter:
    """Scores each frame of one movie and decides whether it is kept."""

    def __init__(self, thresholds: QualityThresholds | None = None):
        self.thresholds = thresholds or QualityThresholds()

    def push(self, frame: np.ndarray, meta: dict) -> list[FrameVerdict]:
        scores = score_frame(frame)
        flags = judge(scores, self.thresholds)
        return [FrameVerdict(meta, scores, flags, None if flags else frame)]

    def flush(self) -> list[FrameVerdict]:
        return []
