"""The allowed range of every numeric setting that has one, declared once by its recipe key
(`section.field`, as in pipelines/*.yaml): the recipe loader (build.py) checks recipe values with
it and the CLI's options (cli.py) take their click types from it. NaN and infinity are never allowed.
Text settings with a fixed set of values (CHOICES) are declared here the same way.

Kept apart from the stage modules so that the CLI can read it without importing them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import click


@dataclass(frozen=True)
class Range:
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def problem(self, value: float) -> str | None:
        """Why `value` is outside the range, or None."""
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        below = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        above = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        return f"{value} is not in the range {self.describe()}" if below or above else None

    def describe(self) -> str:
        low = f"{self.min:g} {'<' if self.min_open else '<='} " if self.min is not None else ""
        high = f" {'<' if self.max_open else '<='} {self.max:g}" if self.max is not None else ""
        return f"{low}x{high}"

    def click_type(self, kind: type) -> click.ParamType:
        bounds = dict(min=self.min, max=self.max, min_open=self.min_open, max_open=self.max_open)
        return click.IntRange(**bounds) if kind is int else _FiniteFloatRange(**bounds)


class _FiniteFloatRange(click.FloatRange):
    """click's FloatRange lets NaN through (every comparison with it is false) and infinity too."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


POSITIVE, AT_LEAST_0, AT_LEAST_1 = Range(0, min_open=True), Range(0), Range(1)
FRACTION = Range(0, 1)

RANGES: dict[str, Range] = {
    "extract.sampling.fps": POSITIVE,
    "extract.sampling.scene_threshold": FRACTION,
    "extract.sampling.scene_max_gap": POSITIVE,
    "extract.max_side": AT_LEAST_0,
    "extract.skip_head": AT_LEAST_0,
    "extract.skip_tail": AT_LEAST_0,
    "extract.jpeg_quality": Range(1, 100),
    "extract.chunk_seconds": AT_LEAST_0,
    "detect.batch": AT_LEAST_1,
    "detect.imgsz": Range(32),
    "detect.conf": FRACTION,
    "detect.iou": FRACTION,
    "detect.min_persons": AT_LEAST_0,
    "detect.max_persons": AT_LEAST_1,
    "detect.min_person_area": FRACTION,
    "detect.loader_threads": AT_LEAST_1,
    "sample.fraction": Range(0, 1, min_open=True),
    "labeler.epochs": AT_LEAST_1,
    "labeler.batch_size": AT_LEAST_1,
    "labeler.image_size": Range(32),
    "labeler.lr": POSITIVE,
    "labeler.weight_decay": AT_LEAST_0,
    "labeler.val_fraction": Range(0, 1, max_open=True),
    "labeler.workers": AT_LEAST_0,
    "labeler.pseudo_label_rounds": AT_LEAST_0,
    "labeler.pseudo_label_per_class": AT_LEAST_1,
    "labeler.pseudo_label_confidence": FRACTION,
    "predict.batch_size": AT_LEAST_1,
    "predict.loader_threads": AT_LEAST_1,
    "shard.maxcount": AT_LEAST_1,
    "shard.maxsize": AT_LEAST_1,
    "shard.test_fraction": Range(0, 1, max_open=True),
}


# The allowed values of every text setting with a fixed set of them, by recipe key.
CHOICES: dict[str, tuple[str, ...]] = {
    "extract.sampling.mode": ("fps", "keyframes", "scenes"),
    "extract.decoder": ("auto", "cpu", "cuda"),
    "detect.detector": ("yolo", "opencv"),
    "labeler.arch": ("resnet50", "resnet18"),
    "labeler.split": ("films", "frames"),
    "labeler.input": ("frame", "persons"),
}


def choice_problem(key: str, value: str) -> str | None:
    """Why the text `value` is not allowed at the recipe key `key`, or None."""
    allowed = CHOICES.get(key)
    return f"{value!r} is not one of {', '.join(allowed)}" if allowed and value not in allowed else None


def choice_type(key: str) -> click.Choice:
    """The click type of the option for the recipe key `key`."""
    return click.Choice(CHOICES[key])


def option_type(key: str, kind: type = float) -> click.ParamType:
    """The click type of the option for the recipe key `key`."""
    return RANGES[key].click_type(kind)
