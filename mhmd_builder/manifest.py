"""The work directory seen whole: per-stage status and the one-row-per-frame manifest."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa

from .filter import current_decisions
from .label import STAGE as LABEL_STAGE
from .labels import read_human_labels
from .workdir import WorkDir, atomic_write_table

STAGES = ("extract", "detect", "label", "shard")

# DESIGN §4: the contract's columns, in order; columns of stages not run yet are null.
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


def stage_status(workdir: WorkDir, stage: str) -> dict:
    planned, done, failed = workdir.planned(stage), workdir.done(stage), workdir.failed(stage)
    return {
        "partitions": {
            "done": len(done),
            "failed": len(failed),
            "pending": len(set(planned) - set(done) - set(failed)),
        },
        "frames_in": sum(s.get("frames_in", 0) for s in done.values()),
        "frames_out": sum(s.get("frames_out", 0) for s in done.values()),
        "rejected": dict(sum((Counter(s.get("rejected", {})) for s in done.values()), Counter()).most_common()),
        "failures": {pid: info.get("reason") for pid, info in failed.items()},
        "running": {pid: {"percent": round(100 * p["done"] / p["total"], 1) if p["total"] else 0.0,
                          "seconds_ago": round(time.time() - p["at"], 1)}
                    for pid, p in workdir.progress(stage).items() if pid not in done and pid not in failed},
    }


def status(workdir: WorkDir) -> dict:
    """Per stage that has started: partitions done / failed / pending, frames in and out."""
    report = {stage: stage_status(workdir, stage) for stage in STAGES if workdir.stage_dir(stage).exists()}
    if "extract" in report and workdir.stage_dir("filter").exists():
        # `mhmd filter` replaced extract's keep decisions: count what is kept now.
        decisions = current_decisions(workdir)
        report["extract"]["frames_out"] = int(decisions.kept.sum())
        report["extract"]["rejected"] = dict(Counter(decisions.reject_reason.dropna()).most_common())
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
        lines += [f"running {stage} {pid}: {r['percent']:.0f}% (reported {r['seconds_ago']:.0f} s ago)"
                  for pid, r in s["running"].items()]
    return "\n".join(lines)


def manifest(workdir: WorkDir) -> pd.DataFrame:
    """One row per sampled frame, with the contract's columns first and every recorded score after.
    `kept` and `reject_reason` are the frame's fate so far: the first stage that rejected it says why."""
    frames = workdir.read_table("extract")
    if frames is None:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in MANIFEST_COLUMNS})
    decisions = current_decisions(workdir).set_index("frame_id")
    frames = frames.set_index("frame_id")
    for column in ("kept", "reject_reason", "flags"):
        frames[column] = decisions[column]
    detections = workdir.read_table("detect")
    if detections is not None:
        detections = detections.set_index("frame_id")
        detections = detections[detections.index.isin(frames.index[frames.kept.astype(bool)])]
        frames = frames.join(detections[["persons", "boxes", "confidences", "largest_person_area", "mask"]])
        rejected = detections.index[~detections.kept.astype(bool)]
        frames.loc[rejected, "kept"] = False
        frames.loc[rejected, "reject_reason"] = detections.loc[rejected, "reject_reason"]
    frames = _with_labels(workdir, frames)
    shards = workdir.read_table("shard")
    if shards is not None:
        frames = frames.join(shards.set_index("frame_id")[["split"]])
    parsing = workdir.stage_dir("parsing") / "attached.parquet"
    if parsing.exists():
        frames = frames.join(pd.read_parquet(parsing).set_index("frame_id")[["parsing"]])
    frames = frames.reset_index()
    for name in MANIFEST_COLUMNS:
        if name not in frames:
            frames[name] = None
    extra = [c for c in frames.columns if c not in MANIFEST_COLUMNS]
    return frames[list(MANIFEST_COLUMNS) + extra].sort_values(["movie_id", "timestamp"], ignore_index=True)


def _with_labels(workdir: WorkDir, frames: pd.DataFrame) -> pd.DataFrame:
    """label, label_source, label_confidence: the labeler's output where it ran, else the human
    labels imported so far."""
    human = read_human_labels(workdir)
    if human is not None:
        human = human.set_index("frame_id")
        frames = frames.join(human[["label"]])
        frames["label_source"] = frames.label.notna().map({True: "human", False: None})
        frames["label_confidence"] = frames.label.notna().map({True: 1.0, False: None})
    predicted = workdir.read_table(LABEL_STAGE)
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
