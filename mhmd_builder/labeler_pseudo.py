"""Self-training: pseudo labels for the kept frames nobody labelled, from the labeler's own
confident predictions, to train it again on the human labels and them.

    unlabelled_pool(workdir, labeled, val) -> the frames pseudo labels may come from
    confident_per_class(pool, label_ids, confidences, per_class, threshold) -> the pseudo-labelled rows

A pool frame is never a human-labelled one (a human label is never replaced) and never of a film
that validates (so validation still scores films the labeler never trained on). The frames of
films nobody labelled are in the pool: `labeler predict` labels them anyway.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .labels import labelable_frames
from .workdir import WorkDir

if TYPE_CHECKING:
    import pandas as pd

UNLABELLED = -1  # the pool's label_id before it is predicted


def unlabelled_pool(workdir: WorkDir, labeled: "pd.DataFrame", val: np.ndarray) -> "pd.DataFrame":
    """The kept frames that are not human-labelled and not of a film any validation frame is from."""
    frames = labelable_frames(workdir)[["frame_id", "movie_id", "timestamp", "jpeg", "boxes"]]
    validating = set(labeled.movie_id[val])
    pool = frames[~frames.frame_id.isin(labeled.frame_id) & ~frames.movie_id.isin(validating)]
    return pool.assign(label_id=UNLABELLED).sort_values("frame_id", ignore_index=True)


def confident_per_class(pool: "pd.DataFrame", label_ids: np.ndarray, confidences: np.ndarray, per_class: int,
                        threshold: float) -> "pd.DataFrame":
    """Each predicted class's `per_class` most confident frames of `pool` (ties: frame order) whose
    confidence is at least `threshold`, labelled with that class. A cap per class, not one
    threshold for all: the big classes' many confident frames would otherwise swamp the rare ones."""
    chosen = pool.assign(label_id=label_ids, confidence=confidences)
    chosen = chosen[chosen.confidence >= threshold].sort_values(["confidence", "frame_id"], ascending=[False, True])
    return chosen.groupby("label_id", sort=True).head(per_class).sort_values("frame_id", ignore_index=True)
