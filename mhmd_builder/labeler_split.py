"""Which human-labelled frames validate the labeler, chosen so that every class stays trainable.

    split_for_validation(labeled, names, val_fraction, seed, by="films") -> Split

By films (the default, the honest measure): whole films are held out, since frames of one film are
near-duplicates and a frame split measures memory, not labeling. A film is held out only when every
class it holds keeps a film in training, rarest classes first, so that validation covers as many
classes as it can. A class that no held-out film covers (seen in one film only, say) is split by
time instead: its latest frames, in the film that has most of them, validate; the earlier ones
train. By frames (the paper's way): a seeded random share of the frames, which flatters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .ranges import CHOICES

if TYPE_CHECKING:
    import pandas as pd

SPLITS = CHOICES["labeler.split"]


@dataclass(frozen=True)
class Split:
    val: np.ndarray  # one bool per labelled frame: True where it validates
    how: str  # one line for the log
    per_class: list[dict]  # one row per labelled class: frames and films on each side, and how

    def table(self) -> str:
        lines = [f"{'label':<40}{'train':>7}{'films':>7}{'val':>6}{'films':>7}  validated by"]
        lines += [f"{r['label']:<40}{r['train_frames']:>7}{r['train_films']:>7}{r['val_frames']:>6}{r['val_films']:>7}"
                  f"  {r['validated_by']}" for r in self.per_class]
        return "\n".join(lines)


def split_for_validation(labeled: "pd.DataFrame", names: list[str], val_fraction: float, seed: int,
                         by: str = "films") -> Split:
    """`labeled`: one row per human-labelled frame with movie_id, label_id and timestamp."""
    if by not in SPLITS:
        raise InputError(f"unknown validation split {by!r} (available: {', '.join(SPLITS)})")
    rng = np.random.default_rng(seed)
    if by == "frames":
        val = np.zeros(len(labeled), bool)
        val[rng.permutation(len(labeled))[:max(1, round(val_fraction * len(labeled)))]] = True
        return _described(labeled, names, val, {}, "random frames (the paper's way; near-duplicates flatter it)",
                          "frames")
    held_out = held_out_films(labeled, val_fraction, rng)
    val = np.array(labeled.movie_id.isin(held_out), bool)  # a copy: the time split below writes into it
    time_split = split_uncovered_classes_by_time(labeled, val, val_fraction)
    films = labeled.movie_id.nunique()
    how = f"{len(held_out)} of {films} films held out"
    if time_split:
        how += f", {len(time_split)} classes split by time within a film"
    return _described(labeled, names, val, time_split, how, "held-out films")


def held_out_films(labeled: "pd.DataFrame", val_fraction: float, rng: np.random.Generator) -> set[str]:
    """Films to hold out: first one per class (rarest first) where the class has another film to train
    on, then more until they hold val_fraction of the frames; never the last training film of a class."""
    films_of = labeled.groupby("label_id").movie_id.agg(set).to_dict()
    classes_of = labeled.groupby("movie_id").label_id.agg(set).to_dict()
    frames_of = labeled.movie_id.value_counts().to_dict()
    order = [str(f) for f in rng.permutation(sorted(classes_of))]
    held: set[str] = set()

    def can_hold_out(film: str) -> bool:
        return film not in held and all(films_of[c] - held - {film} for c in classes_of[film])

    for label in labeled.label_id.value_counts(ascending=True).index:  # rarest first
        if not films_of[label] & held:
            held.update(next(([f] for f in order if f in films_of[label] and can_hold_out(f)), []))
    for film in order:
        if sum(frames_of[f] for f in held) >= val_fraction * len(labeled):
            break
        if can_hold_out(film):
            held.add(film)
    return held


def split_uncovered_classes_by_time(labeled: "pd.DataFrame", val: np.ndarray, val_fraction: float) -> dict[int, str]:
    """Sets `val` for the latest frames of each class that has no validation frame yet, in the
    training film with most of its frames (at least one frame stays in training); returns
    {class: that film}."""
    films = {}
    for label, rows in labeled[~val].groupby("label_id"):
        if val[labeled.label_id.to_numpy() == label].any() or len(rows) < 2:
            continue
        film = rows.movie_id.value_counts().sort_index().idxmax()
        in_film = rows[rows.movie_id == film].sort_values(["timestamp", "frame_id"])
        if len(in_film) < 2:
            continue
        latest = in_film.index[-max(1, min(len(in_film) - 1, math.ceil(val_fraction * len(in_film)))):]
        val[labeled.index.get_indexer(latest)] = True
        films[int(label)] = str(film)
    return films


def _described(labeled: "pd.DataFrame", names: list[str], val: np.ndarray, time_split: dict[int, str],
               how: str, validated_by: str) -> Split:
    rows = []
    for label, group in labeled.groupby("label_id"):
        in_val = val[labeled.index.get_indexer(group.index)]
        train, held = group[~in_val], group[in_val]
        if label in time_split:
            by = f"its latest frames in {time_split[label]}"
        elif held.empty:
            by = "nothing (training only: too few frames or films)"
        else:
            by = validated_by
        rows.append({"label": names[label], "label_id": int(label), "train_frames": len(train),
                     "train_films": train.movie_id.nunique(), "val_frames": len(held),
                     "val_films": held.movie_id.nunique() if label not in time_split else 0, "validated_by": by})
    return Split(val, how, rows)
