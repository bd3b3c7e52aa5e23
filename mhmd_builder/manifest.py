"""The work directory seen whole: per-stage status and the manifest, one row per sampled frame.

The manifest is the one read model of the work directory: every command that needs frames of
several stages (sample, labels import, the labeler, shard, report, parsing) asks `manifest()`.
It is built from the tables alone (`tables.py`), never from a stage module, and once per state of
the work directory: asked again in the same process while no table changed, it is not rebuilt.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa

from .errors import DamagedFileError
from .filter import current_counts, current_decisions
from .tables import (DETECT, EXTRACT, FILTER, FUNNEL, LABEL, MANIFEST_COLUMNS, SHARD, decisions_path,
                     human_labels_path, parsing_table_path, read_human_labels)
from .workdir import WorkDir, atomic_write_table, changes



def _kept(summaries) -> dict:
    """frames_out and rejected (by reason, most first) summed over partition summaries."""
    rejected = sum((Counter(s.get("rejected", {})) for s in summaries), Counter())
    return {"frames_out": sum(s.get("frames_out", 0) for s in summaries),
            "rejected": dict(sorted(rejected.items(), key=lambda item: (-item[1], item[0])))}


def stage_status(workdir: WorkDir, stage: str) -> dict:
    planned, done, failed = workdir.planned(stage), workdir.done(stage), workdir.failed(stage)
    return {
        "partitions": {
            "done": len(done),
            "failed": len(failed),
            "pending": len(set(planned) - set(done) - set(failed)),
        },
        "frames_in": sum(s.get("frames_in", 0) for s in done.values()),
        **_kept(list(done.values())),
        "failures": {pid: info.get("reason") for pid, info in failed.items()},
        "damaged": workdir.damaged(stage),
        "running": {pid: {"percent": round(100 * p["done"] / p["total"], 1) if p["total"] else 0.0,
                          "seconds_ago": round(time.time() - p["at"], 1)}
                    for pid, p in workdir.progress(stage).items() if pid not in done and pid not in failed},
    }


def status(workdir: WorkDir) -> dict:
    """Per stage that has started: partitions done / failed / pending, frames in and out, from
    the done markers' counts (no frame table is read)."""
    report = {stage: stage_status(workdir, stage) for stage in FUNNEL if workdir.stage_dir(stage).exists()}
    if EXTRACT in report and workdir.stage_dir(FILTER).exists():
        # `mhmd filter` replaced extract's keep decisions: count what is kept now (of the tables
        # that read: status names the others and never stops for them).
        counts = current_counts(workdir)
        if counts is None:  # a filter of an earlier version: count its decisions
            decisions = current_decisions(workdir, damaged=[])
            counts = {"": {"frames_out": int(decisions.kept.sum()),
                           "rejected": Counter(decisions.reject_reason.dropna())}}
        report[EXTRACT].update(_kept(list(counts.values())))
    return report


def format_status(report: dict) -> str:
    if not report:
        return "nothing here yet: run `mhmd extract` first"
    lines = [f"{'stage':<10}{'done':>6}{'failed':>8}{'pending':>9}{'frames in':>11}{'frames out':>12}"]
    for stage, s in report.items():
        p = s["partitions"]
        lines.append(f"{stage:<10}{p['done']:>6}{p['failed']:>8}{p['pending']:>9}{s['frames_in']:>11}{s['frames_out']:>12}")
    for stage, s in report.items():
        if s["rejected"]:
            lines.append(f"{stage} rejected: " + ", ".join(f"{reason} {n}" for reason, n in s["rejected"].items()))
        lines += [f"failed {stage} {pid}: {reason}" for pid, reason in s["failures"].items()]
        lines += s["damaged"]
        lines += [f"running {stage} {pid}: {r['percent']:.0f}% (reported {r['seconds_ago']:.0f} s ago)"
                  for pid, r in s["running"].items()]
    return "\n".join(lines)


# (the work directory's state, its manifest, per stage the damaged partitions left out of it)
_built: tuple[tuple, pd.DataFrame, dict[str, list[str]]] | None = None


def manifest(workdir: WorkDir, before: str | None = None) -> pd.DataFrame:
    """One row per sampled frame, with the contract's columns first and every recorded score after.
    `kept` and `reject_reason` are the frame's fate so far: the first stage that rejected it says why.
    Each caller gets its own copy (cheap: pandas copies on write).

    A damaged done marker or table of a stage it reads raises DamagedFileError naming the file and
    the command that redoes it: its frames (or their persons, labels) would be missing unnoticed.
    `before` (a stage of FUNNEL): the first stage whose output the caller does not use, its own at
    the latest; only the stages before it must be intact, so that a damaged record of a stage never
    stops the command that redoes it (that stage's columns may then be partial)."""
    global _built
    state = _state(workdir)
    if _built is None or _built[0] != state:
        _built = (state, *_build(workdir))
    _, frames, damaged = _built
    for stage in FUNNEL[:FUNNEL.index(before)] if before else FUNNEL:
        if damaged[stage]:
            raise DamagedFileError(damaged[stage][0])
    return frames.copy(deep=False)


def _state(workdir: WorkDir) -> tuple:
    """Name, size, inode and modification time of every file the manifest is built from (stat only:
    no file is read), and this process's own count of table writes (file times are only as fine as
    the kernel's clock tick). Any commit, redo or rewrite of a table changes it."""
    files = [decisions_path(workdir), human_labels_path(workdir), parsing_table_path(workdir)]
    for stage in (EXTRACT, DETECT, LABEL, SHARD):
        files += sorted(workdir.parts_dir(stage).glob("*.done")) + sorted(workdir.parts_dir(stage).glob("*.parquet"))
    stats = []
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        stats.append((str(path), stat.st_size, stat.st_ino, stat.st_mtime_ns))
    return str(workdir.root), changes(), tuple(stats)


def _build(workdir: WorkDir) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The manifest of the partitions that read, and per stage the damaged ones left out."""
    damaged: dict[str, list[str]] = {stage: [] for stage in FUNNEL}
    frames = workdir.read_table(EXTRACT, damaged[EXTRACT])
    if frames is None:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in MANIFEST_COLUMNS}), damaged
    decisions = current_decisions(workdir, damaged=[]).set_index("frame_id")  # extract's damage: counted above
    frames = frames.set_index("frame_id")
    for column in ("kept", "reject_reason", "flags"):
        frames[column] = decisions[column]
    detections = workdir.read_table(DETECT, damaged[DETECT])
    if detections is not None:
        detections = detections.set_index("frame_id")
        detections = detections[detections.index.isin(frames.index[frames.kept.astype(bool)])]
        frames = frames.join(detections[["persons", "boxes", "confidences", "largest_person_area", "mask"]])
        rejected = detections.index[~detections.kept.astype(bool)]
        frames.loc[rejected, "kept"] = False
        frames.loc[rejected, "reject_reason"] = detections.loc[rejected, "reject_reason"]
    frames = _with_labels(workdir, frames, damaged[LABEL])
    shards = workdir.read_table(SHARD, damaged[SHARD])
    if shards is not None:
        frames = frames.join(shards.set_index("frame_id")[["split"]])
    parsing = parsing_table_path(workdir)
    if parsing.exists():
        frames = frames.join(pd.read_parquet(parsing).set_index("frame_id")[["parsing"]])
    frames = frames.reset_index()
    for name in MANIFEST_COLUMNS:
        if name not in frames:
            frames[name] = None
    extra = [c for c in frames.columns if c not in MANIFEST_COLUMNS]
    return frames[list(MANIFEST_COLUMNS) + extra].sort_values(["movie_id", "timestamp"], ignore_index=True), damaged


def _with_labels(workdir: WorkDir, frames: pd.DataFrame, damaged: list[str]) -> pd.DataFrame:
    """label, label_source, label_confidence: the labeler's output where it ran, else the human
    labels imported so far."""
    human = read_human_labels(workdir)
    if human is not None:
        human = human.set_index("frame_id")
        frames = frames.join(human[["label"]])
        frames["label_source"] = frames.label.notna().map({True: "human", False: None})
        frames["label_confidence"] = frames.label.notna().map({True: 1.0, False: None})
    predicted = workdir.read_table(LABEL, damaged)
    if predicted is not None:
        predicted = predicted.set_index("frame_id")
        predicted = predicted[predicted.index.isin(frames.index)]
        for column in ("label", "label_source", "label_confidence", "top3", "top3_confidence"):
            if column not in frames:
                frames[column] = None
            frames.loc[predicted.index, column] = predicted[column]
    return frames


def export_manifest(workdir: WorkDir, out: str) -> int:
    """Write the manifest as Parquet with the contract's column types; returns the row count."""
    frames = manifest(workdir)
    schema = pa.schema([pa.field(n, t) for n, t in MANIFEST_COLUMNS.items()])
    table = pa.Table.from_pandas(frames[list(MANIFEST_COLUMNS)], schema=schema, preserve_index=False)
    extra = [c for c in frames.columns if c not in MANIFEST_COLUMNS]
    for name in extra:
        table = table.append_column(name, pa.Array.from_pandas(frames[name]))
    atomic_write_table(Path(out), table)
    return table.num_rows
