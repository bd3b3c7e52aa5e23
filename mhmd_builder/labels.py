"""Human labels in the work directory, and the label stage's prediction tables.

    WORKDIR/labels/human.parquet        every human label imported so far: frame_id, label (taxonomy
                                        name), label_id, source (file), line
    WORKDIR/label/parts/<movie>.parquet the labeler's output per movie (a stage with partitions):
                                        frame_id, movie_id, label, label_id, label_source
                                        ("human" | "model"), label_confidence, top3, top3_confidence
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from .workdir import WorkDir, atomic_write_table

if TYPE_CHECKING:
    import pandas as pd

LABEL_STAGE = "label"

HUMAN_SCHEMA = pa.schema([
    ("frame_id", pa.string()),
    ("label", pa.string()),
    ("label_id", pa.int32()),
    ("source", pa.string()),
    ("line", pa.int32()),
])

PREDICTION_SCHEMA = pa.schema([
    ("frame_id", pa.string()),
    ("movie_id", pa.string()),
    ("label", pa.string()),
    ("label_id", pa.int32()),
    ("label_source", pa.string()),
    ("label_confidence", pa.float32()),
    ("top3", pa.list_(pa.string())),
    ("top3_confidence", pa.list_(pa.float32())),
])


def human_labels_path(workdir: WorkDir):
    return workdir.root / "labels" / "human.parquet"


def read_human_labels(workdir: WorkDir) -> "pd.DataFrame | None":
    """Every human label imported so far, or None when there is none."""
    import pandas as pd

    path = human_labels_path(workdir)
    return pd.read_parquet(path) if path.exists() else None


def write_human_labels(workdir: WorkDir, labels: "pd.DataFrame") -> None:
    """Replace the human labels table (atomically) with `labels` (HUMAN_SCHEMA columns)."""
    table = pa.Table.from_pandas(labels[HUMAN_SCHEMA.names], schema=HUMAN_SCHEMA, preserve_index=False)
    atomic_write_table(human_labels_path(workdir), table)
