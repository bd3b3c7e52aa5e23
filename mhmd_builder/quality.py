"""Frame quality: scores taken on the decoded frame inside the extract pass, and keep decisions.

The extract stage feeds every sampled frame of a movie to one `QualityFilter` and encodes a JPEG
only for the frames it keeps. The filter holds frames back while they may still turn out to be
near-duplicates of a sharper neighbour and returns verdicts later, always in frame order; `flush()`
returns whatever is still held at the end of the movie.

Every score is a float (one float64 column of the extract table), so `mhmd filter` can re-decide
from the recorded scores alone, with the same code (`judge` and `DuplicateRuns`), without decoding.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

import cv2
import numpy as np

from .errors import InputError

# Fixed order in which failed checks are reported; the first one is the frame's reject_reason.
REASONS = ("grayscale", "tinted", "blurry", "dark", "overexposed", "low_resolution", "duplicate")

# Every score a verdict carries, in column order.
SCORE_NAMES = ("colorfulness", "chroma", "chroma_spread", "hue_concentration", "sharpness", "blur_sigma",
               "mean_luma", "black_fraction", "white_fraction", "short_side", "phash_hi", "phash_lo")

GRAY_SIDE = 512   # sharpness, exposure and hash on a grey image of this longer side: resolution-independent
COLOR_SIDE = 64   # colour statistics on a thumbnail: averages away chroma noise and 4:2:0 colour fringes
LUMA_BINS = 64    # lightness bins for the chroma left unexplained by lightness
PRE_SIGMA = 1.5   # smoothing before measuring edges: film grain is finer than this, edges are not
REBLUR_SIGMA = 2.0
MAX_BLUR = 16.0   # blur_sigma of a frame without any edge
BLACK_LEVEL = 16  # luma below this is crushed black
WHITE_LEVEL = 250  # luma at or above this is clipped white


def _threshold(default: float, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class QualityThresholds:
    """Keep decisions, from the recipe's `quality:` section or the command line. Calibrated in
    benchmarks/RESULTS.md ("Quality calibration")."""

    min_colorfulness: float = _threshold(
        10.0, "Hasler-Suesstrunk colourfulness below which a frame is grayscale.")
    min_chroma_spread: float = _threshold(
        3.0, "Lab chroma not explained by lightness below which a colourful frame is tinted monochrome.")
    max_blur_sigma: float = _threshold(
        2.0, "Estimated edge blur (Gaussian sigma, px at 512 px) above which a frame is blurry.")
    min_sharpness: float = _threshold(
        1.0, "Laplacian variance (grey, 512 px) below which a frame has no detail: blurry.")
    min_mean_luma: float = _threshold(25.0, "Mean luma (0-255) below which a frame is dark.")
    max_black_fraction: float = _threshold(0.8, "Fraction of crushed-black pixels above which a frame is dark.")
    max_mean_luma: float = _threshold(220.0, "Mean luma (0-255) above which a frame is overexposed.")
    max_white_fraction: float = _threshold(
        0.5, "Fraction of clipped-white pixels above which a frame is overexposed.")
    min_short_side: float = _threshold(
        224.0, "Shorter side (px) of the letterbox-cropped source picture below which it is low_resolution.")
    max_hash_distance: int = _threshold(
        4, "Perceptual-hash Hamming distance within which consecutive frames are duplicates (-1: off).")

    @classmethod
    def from_mapping(cls, values: dict | None) -> "QualityThresholds":
        values = values or {}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown quality thresholds: {', '.join(sorted(unknown))}")
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


# -- scores ---------------------------------------------------------------------------------------
def _fit(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = side / max(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def colorfulness(bgr: np.ndarray) -> float:
    """Hasler and Suesstrunk (2003) colourfulness on signed opponent channels."""
    b, g, r = (c.astype(np.float32) for c in cv2.split(bgr))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def chroma_scores(bgr: np.ndarray) -> dict[str, float]:
    """Mean Lab chroma; `chroma_spread`, the standard deviation of (a, b) left once lightness is
    known (a tint of any tone curve makes colour a function of lightness: spread ~0, while real
    colour has different hues at the same lightness); `hue_concentration`, the length of the
    chroma-weighted mean hue vector (1: one hue)."""
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab).reshape(-1, 3)
    bins = lab[:, 0] // (256 // LUMA_BINS)
    ab = lab[:, 1:].astype(np.float64) - 128.0
    count = np.bincount(bins, minlength=LUMA_BINS)
    filled = count > 0
    # Within-bin sum of squares = total sum of squares minus what the bin means explain.
    residual = float(np.sum(ab * ab))
    for channel in ab.T:
        sums = np.bincount(bins, channel, LUMA_BINS)
        residual -= float(np.sum(sums[filled] ** 2 / count[filled]))
    chroma = np.hypot(ab[:, 0], ab[:, 1]).mean()
    return {
        "chroma": float(chroma),
        "chroma_spread": float(np.sqrt(max(residual, 0.0) / len(ab))),
        "hue_concentration": float(np.hypot(*ab.mean(axis=0)) / chroma) if chroma > 0 else 0.0,
    }


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian (on the fixed-size grey image): detail, grain included."""
    return float(cv2.Laplacian(gray, cv2.CV_32F).var())


def _gradient(image: np.ndarray) -> np.ndarray:
    """The Sobel gradient's magnitude. Not cv2.magnitude: its last bit depends on where numpy
    happened to place its output (SIMD for aligned elements, scalar code for the rest), so the same
    frame's blur_sigma differed from one call to the next."""
    dx, dy = cv2.Sobel(image, cv2.CV_32F, 1, 0), cv2.Sobel(image, cv2.CV_32F, 0, 1)
    dx *= dx
    dx += np.square(dy, out=dy)
    return np.sqrt(dx, out=dx)  # in place: a new array per step cost as much as the Sobel filters


def weighted_sum(weight: np.ndarray, values: np.ndarray) -> float:
    return float(np.sum(weight * values, dtype=np.float64))


def blur_sigma(gray: np.ndarray) -> float:
    """Gaussian blur of the frame's edges, in pixels of the fixed-size grey image, by re-blurring
    (Hu and de Haan 2006): a step blurred by s has gradient peak ~1/s, so blurring it again by s0
    lowers the peak by a factor sqrt(s^2 + s0^2) / s. The gradients are weighted by their 4th
    power, so the strongest edges decide (a sharp subject before a soft background is sharp), and
    measured after a pre-smoothing that removes film grain (whose gradients would pass for sharp
    edges); the pre-smoothing is then taken back out."""
    smooth = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), PRE_SIGMA)
    grad = _gradient(smooth).ravel()
    reblurred = _gradient(cv2.GaussianBlur(smooth, (0, 0), REBLUR_SIGMA)).ravel()
    weight = grad * grad
    weight *= weight
    # numpy's own float64 sums, not a BLAS dot: OpenBLAS splits a long float32 dot across threads as the
    # machine's load allows, and the rounding then differed between two runs of the same frames
    ratio_sq = (weighted_sum(weight, grad) / max(weighted_sum(weight, reblurred), 1e-12)) ** 2
    if ratio_sq <= 1.0 + 1e-6:  # no edge at all
        return MAX_BLUR
    total_sq = REBLUR_SIGMA ** 2 / (ratio_sq - 1.0)
    return float(min(np.sqrt(max(total_sq - PRE_SIGMA ** 2, 0.0)), MAX_BLUR))


def exposure(gray: np.ndarray) -> dict[str, float]:
    hist = np.bincount(gray.ravel(), minlength=256)
    n = gray.size
    return {
        "mean_luma": float(hist @ np.arange(256) / n),
        "black_fraction": float(hist[:BLACK_LEVEL].sum() / n),
        "white_fraction": float(hist[WHITE_LEVEL:].sum() / n),
    }


def phash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash: the 8x8 lowest frequencies of a 32x32 image against their median."""
    low = cv2.dct(cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32))[:8, :8]
    return int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big")


def frame_hash(scores: dict[str, float]) -> int:
    """The hash back from its two exact float halves."""
    return (int(scores["phash_hi"]) << 32) | int(scores["phash_lo"])


def score_frame(bgr: np.ndarray, source_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Every score of one decoded frame. `source_size` is the (w, h) of the letterbox-cropped
    picture before it was scaled down to this frame; the frame's own size when not given."""
    gray = _fit(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), GRAY_SIDE)
    thumb = _fit(bgr, COLOR_SIDE)
    h = phash(gray)
    return {
        "colorfulness": colorfulness(thumb),
        **chroma_scores(thumb),
        "sharpness": sharpness(gray),
        "blur_sigma": blur_sigma(gray),
        **exposure(gray),
        "short_side": float(min(source_size) if source_size else min(bgr.shape[:2])),
        "phash_hi": float(h >> 32),
        "phash_lo": float(h & 0xFFFFFFFF),
    }


# -- decisions ------------------------------------------------------------------------------------
_CHECKED = ("colorfulness", "chroma_spread", "sharpness", "blur_sigma", "mean_luma", "black_fraction",
            "white_fraction", "short_side")  # the scores a check reads


def failed_checks(scores: dict, t: QualityThresholds) -> dict[str, np.ndarray]:
    """Per check but `duplicate` (which needs the neighbours), which frames fail it: each score a
    float (one frame) or an array (a column of recorded scores, `judge_columns`)."""
    score = {name: np.asarray(scores[name]) for name in _CHECKED}
    colourless = score["colorfulness"] < t.min_colorfulness
    return {
        "grayscale": colourless,
        # Colour present, but all of one hue per lightness: sepia, cyan or amber monochrome.
        "tinted": ~colourless & (score["chroma_spread"] < t.min_chroma_spread),
        "blurry": (score["blur_sigma"] > t.max_blur_sigma) | (score["sharpness"] < t.min_sharpness),
        "dark": (score["mean_luma"] < t.min_mean_luma) | (score["black_fraction"] > t.max_black_fraction),
        "overexposed": (score["mean_luma"] > t.max_mean_luma) | (score["white_fraction"] > t.max_white_fraction),
        "low_resolution": score["short_side"] < t.min_short_side,
    }


def judge(scores: dict[str, float], t: QualityThresholds) -> list[str]:
    """Every failed check but `duplicate` (which needs the neighbours), in the fixed order of REASONS."""
    failed = failed_checks(scores, t)
    return [reason for reason in REASONS[:-1] if failed[reason]]


def judge_columns(scores: dict[str, np.ndarray], t: QualityThresholds) -> list[list[str]]:
    """`judge` of many frames at once, from their scores as columns: `mhmd filter` decides every
    recorded frame, and the checks of one frame at a time cost it a third of its time."""
    failed = failed_checks(scores, t)
    rows = np.stack([failed[reason] for reason in REASONS[:-1]], axis=1).tolist()
    return [[reason for reason, fails in zip(REASONS[:-1], row) if fails] if any(row) else [] for row in rows]


def _rank(v: FrameVerdict) -> tuple[bool, float]:
    """Which frame of a run to keep: one that passes every other check, then the sharpest."""
    return not v.flags, v.scores["sharpness"]


def _mark_duplicate(v: FrameVerdict) -> None:
    v.flags.append("duplicate")  # last in REASONS, so the order stays fixed
    v.frame = None


class DuplicateRuns:
    """Groups consecutive frames whose hash is within `max_distance` of the run's first frame
    (measured from the first, so a slow pan cannot drift into one endless run) and flags all but
    the best of each run as `duplicate`. Holds the best frame so far (the only pixels held) and
    the verdicts after it, which cannot be returned before it without breaking frame order."""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        self.anchor: int | None = None
        self.held: list[FrameVerdict] = []  # held[0]: the run's best so far

    def push(self, v: FrameVerdict) -> list[FrameVerdict]:
        if self.max_distance < 0:
            return [v]
        h = frame_hash(v.scores)
        if self.anchor is None or (h ^ self.anchor).bit_count() > self.max_distance:
            done = self.flush()
            self.anchor, self.held = h, [v]
            return done
        if _rank(v) > _rank(self.held[0]):
            _mark_duplicate(self.held[0])
            done, self.held = self.held, [v]
            return done
        _mark_duplicate(v)
        self.held.append(v)
        return []

    def flush(self) -> list[FrameVerdict]:
        done, self.held, self.anchor = self.held, [], None
        return done


class QualityFilter:
    """Scores each frame of one movie and decides whether it is kept."""

    def __init__(self, thresholds: QualityThresholds | None = None):
        self.thresholds = thresholds or QualityThresholds()
        self.runs = DuplicateRuns(self.thresholds.max_hash_distance)

    def push(self, frame: np.ndarray, meta: dict) -> list[FrameVerdict]:
        scores = score_frame(frame, meta.get("source_size"))
        flags = judge(scores, self.thresholds)
        return self.runs.push(FrameVerdict(meta, scores, flags, None if flags else frame))

    def flush(self) -> list[FrameVerdict]:
        return self.runs.flush()


def with_overrides(base: QualityThresholds, given: dict) -> QualityThresholds:
    """`base` with the values given on the command line (None: not given)."""
    return replace(base, **{k: v for k, v in given.items() if v is not None})
