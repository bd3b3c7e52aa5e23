"""The work directory's tables: every stage's name, the schema of its partition tables, and where
the tables that are not partitions live. Stage modules write them; `manifest.py` reads them all,
so it needs no stage module.

    extract  W/extract/parts/<movie>.parquet   FRAME_SCHEMA plus one float column per quality score
             W/extract/chunks/parts/<movie>@<k>.parquet the same, for chunk k of a film until it is joined
    filter   W/filter/decisions.parquet        the keep decisions of the last `mhmd filter`
    detect   W/detect/parts/<movie>.parquet    DETECT_SCHEMA
    parsing  W/parsing/attached.parquet        frame_id, movie_id, parsing (the PNG's path)
    label    W/label/human.parquet             HUMAN_SCHEMA: every human label imported
             W/label/parts/<movie>.parquet     PREDICTION_SCHEMA: the labeler's labels (human ones kept)
    shard    W/shard/parts/<tar>.parquet       frame_id, split, shard
    relabel  NEWDIR/.relabel/parts/<tar>.parquet CHANGE_SCHEMA
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .workdir import WorkDir

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pandas as pd

EXTRACT, FILTER, DETECT, PARSING, LABEL, SAMPLE, SHARD, RELABEL = (
    "extract", "filter", "detect", "parsing", "label", "sample", "shard", "relabel")
# Where extract keeps the chunks of films it decodes in time ranges (`--chunk-seconds`) until every
# chunk of a film is done and joined into the film's own partition: W/extract/chunks/{parts,tmp,progress,frames}.
EXTRACT_CHUNKS = f"{EXTRACT}/chunks"
FUNNEL = (EXTRACT, DETECT, LABEL, SHARD)  # the partitioned stages of a work directory, in the order frames pass them
# Arrow IPC files a whole-dataset step spills rows to and reads back (shard's shuffle, the manifest's
# buckets of movies): zstd, a third of the bytes for little CPU.
SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")

FRAME_SCHEMA = pa.schema([
    ("frame_id", pa.string()),
    ("movie_id", pa.string()),
    ("timestamp", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("kept", pa.bool_()),
    ("reject_reason", pa.string()),
    ("flags", pa.list_(pa.string())),
    ("jpeg", pa.string()),
    # The JPEG as extract wrote it: its size and the XXH3-64 of its bytes (hex), for a file damaged
    # since (cut short, overwritten) to be refused rather than copied into a shard. XXH3, not
    # zlib.crc32: 4 us a 62 KB frame instead of 22, ~2% of shard's writing time instead of ~12%.
    # Null in work directories of earlier versions (not checked) and for frames without a JPEG.
    ("jpeg_bytes", pa.int64()),
    ("jpeg_xxh3", pa.string()),
])

DETECT_SCHEMA = pa.schema([
    ("frame_id", pa.string()),
    ("movie_id", pa.string()),
    ("persons", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
    ("confidences", pa.list_(pa.float32())),
    ("largest_person_area", pa.float32()),
    ("kept", pa.bool_()),
    ("reject_reason", pa.string()),
    ("mask", pa.string()),
])

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

CHANGE_SCHEMA = pa.schema([("frame_id", pa.string()), ("movie", pa.string()), ("split", pa.string()),
                           ("before", pa.string()), ("after", pa.string())])

# The manifest's promised columns (`mhmd manifest export`), in order; columns of stages not run yet are null.
MANIFEST_COLUMNS = {
    "frame_id": pa.string(),
    "movie_id": pa.string(),
    "timestamp": pa.float64(),
    "width": pa.int32(),
    "height": pa.int32(),
    "kept": pa.bool_(),
    "reject_reason": pa.string(),
    "colorfulness": pa.float64(),
    "sharpness": pa.float64(),
    "persons": pa.int32(),
    "label": pa.string(),
    "label_source": pa.string(),
    "label_confidence": pa.float64(),
    "split": pa.string(),
}


def movie_paths(workdir: WorkDir) -> dict[str, Path]:
    """Where each movie is now: the file the last extract run was given for it (a film renamed or
    moved since it was extracted is found under its new name), else the one it was extracted from."""
    paths = {movie: Path(summary["path"]) for movie, summary in workdir.done(EXTRACT).items()}
    paths.update({movie: Path(plan["path"]) for movie, plan in workdir.planned(EXTRACT).items() if "path" in plan})
    return paths


def rows_by_movie(rows: pa.Table | None) -> dict[str, pa.Table]:
    """A whole-dataset table's rows (it has a movie_id column) cut per movie: slices of one copy
    sorted by movie_id, for a reader that goes movie by movie. Nothing for None."""
    if rows is None or not rows.num_rows:
        return {}
    rows = rows.sort_by("movie_id")
    runs = pc.value_counts(rows["movie_id"])  # in the order met: sorted
    counts = runs.field("counts").to_pylist()
    starts = itertools.accumulate(counts, initial=0)
    return {movie: rows.slice(start, n) for movie, start, n in zip(runs.field("values").to_pylist(), starts, counts)}


def values_digest(table: pa.Table, head: list) -> str:
    """SHA-256 (16 hex digits) of json.dumps(head) and the values of `table`'s columns, nulls included:
    the same values give the same digest however Arrow holds them (chunks, slices, validity buffers),
    so that a plan made again can tell the tables it made before from changed ones."""
    digest = hashlib.sha256(json.dumps(head).encode())
    for name in table.column_names:
        digest.update(f"\0{name}\0".encode())
        for part in _value_bytes(table[name].combine_chunks()):
            digest.update(part)
    return digest.hexdigest()[:16]


def _value_bytes(values: pa.Array):
    """A column's values as bytes: which are valid, then by type, nulls as zero or empty: numbers and
    booleans as numpy holds them; strings their lengths and bytes end to end; lists their lengths and
    their items' bytes. (A column without nulls is read from its buffers: a plan digests a thousand
    tables, and each Arrow call costs more than a small column's bytes.)"""
    kind, whole = values.type, not values.null_count
    yield _all_valid(len(values)) if whole else np.packbits(pc.is_valid(values).to_numpy(zero_copy_only=False)).tobytes()
    if pa.types.is_null(kind):
        return
    if whole and (pa.types.is_string(kind) or pa.types.is_binary(kind)):
        _, offsets, data = values.buffers()
        offsets = np.frombuffer(offsets, np.int32, len(values) + 1, values.offset * 4)
        yield np.diff(offsets).tobytes()
        yield data[offsets[0]:offsets[-1]] if offsets[-1] > offsets[0] else b""
    elif pa.types.is_string(kind) or pa.types.is_binary(kind):
        empty = pa.scalar("" if pa.types.is_string(kind) else b"", kind)
        filled = pc.fill_null(values, empty)
        yield pc.binary_length(filled).to_numpy().tobytes()
        joined = pa.ListArray.from_arrays(pa.array([0, len(filled)], pa.int32()), filled)  # one list of them all
        yield pc.binary_join(joined, empty)[0].as_buffer() or b""
    elif pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        lengths = pc.list_value_length(values)
        yield (lengths if whole else pc.fill_null(lengths, 0)).to_numpy().tobytes()
        yield from _value_bytes(pc.list_flatten(values))
    else:
        zero = pa.scalar(False if pa.types.is_boolean(kind) else 0).cast(kind)
        yield (values if whole else pc.fill_null(values, zero)).to_numpy(zero_copy_only=False).tobytes()


def _all_valid(count: int) -> bytes:
    """np.packbits of `count` Trues."""
    return b"\xff" * (count // 8) + (bytes([0xFF << (8 - count % 8) & 0xFF]) if count % 8 else b"")


def decisions_path(workdir: WorkDir) -> Path:
    return workdir.stage_dir(FILTER) / "decisions.parquet"


def parsing_table_path(workdir: WorkDir) -> Path:
    return workdir.stage_dir(PARSING) / "attached.parquet"


# Earlier work directories kept these files outside the stage's folder: old path -> file name now.
_OLD_LAYOUT = {Path("labels/human.parquet"): "human.parquet",
               **{Path("labeler") / name: name for name in ("labeler.safetensors", "labeler.json",
                                                           "labeler.metrics.json")}}


def label_dir(workdir: WorkDir) -> Path:
    """The label stage's folder, which also holds the human labels and the default checkpoint."""
    folder = workdir.stage_dir(LABEL)
    _move_old_layout(workdir, folder)
    return folder


def _move_old_layout(workdir: WorkDir, folder: Path) -> None:
    """Move an earlier work directory's label files into the stage's folder, once: each file is
    renamed (atomic), and never over a file that is there already."""
    for old, name in _OLD_LAYOUT.items():
        source, target = workdir.root / old, folder / name
        if not source.is_file() or target.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:  # another process moved it first
            continue
        log.info(f"notice: moved {source} to {target} (new layout)")
        with suppress(OSError):  # the old folder goes once empty; rmdir refuses while it holds anything
            source.parent.rmdir()


def human_labels_path(workdir: WorkDir) -> Path:
    return label_dir(workdir) / "human.parquet"


def read_human_labels(workdir: WorkDir) -> "pd.DataFrame | None":
    """Every human label imported so far, or None when there is none."""
    import pandas as pd

    path = human_labels_path(workdir)
    return pd.read_parquet(path) if path.exists() else None
