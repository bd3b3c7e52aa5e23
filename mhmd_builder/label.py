"""The label stage: the labeler's label, confidence and top 3 for every kept frame, film by film.

    predict(workdir, CKPT, PredictSettings()) -> WORKDIR/label/parts/<movie>.parquet (PREDICTION_SCHEMA)

Human labels are kept as they are (source "human", confidence 1); a film whose era or nationality
is known gets only labels consistent with it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .batching import prefetched
from .labeler import LabelerError, LabelerWorker, boxes_listed, check_checkpoint, input_of, load_rgb
from .labels import labelable_frames
from .runners import LocalRunner
from .stages import Partition, PartitionResult, Resources, inputs_digest
from .taxonomy import Taxonomy, load_taxonomy
from .tables import LABEL, PREDICTION_SCHEMA, read_human_labels
from .weights import sha256_of
from .workdir import WorkDir, writes

STAGE = LABEL


@dataclass(frozen=True)
class PredictSettings:
    device: str = "auto"
    batch_size: int = 64
    loader_threads: int = 4


@dataclass
class LabelStage(LabelerWorker):
    workdir: WorkDir
    checkpoint: str
    taxonomy: Taxonomy
    settings: PredictSettings = field(default_factory=PredictSettings)
    name: str = STAGE
    resources: Resources = field(default_factory=Resources)  # set from the device (LabelerWorker)
    unit: str = "frames"

    def process(self, partition: Partition, progress) -> dict:
        started = time.monotonic()
        movie, frames = partition.id, partition.info["frames"]
        human: dict[str, int] = partition.info["human"]
        allowed = partition.info["allowed"]
        self.workdir.begin(STAGE, movie)
        rows = [self._human_row(f, human[f["frame_id"]]) for f in frames if f["frame_id"] in human]
        todo = [f for f in frames if f["frame_id"] not in human]
        batch: list[tuple[dict, np.ndarray]] = []

        def run_batch() -> None:
            rows.extend(self.labeler.predict_batch(batch, allowed))
            batch.clear()
            progress(len(rows), len(frames))

        size, mode = self.labeler.image_size, self.labeler.input
        loaded = prefetched(todo, lambda f: load_rgb(self.workdir.root / f["jpeg"], size, mode, f["boxes"]),
                            self.loader_threads(self.settings.loader_threads), 2 * self.settings.batch_size)
        unreadable = 0
        for frame, image in loaded:
            if image is None:
                unreadable += 1
                rows.append({"frame_id": frame["frame_id"], "movie_id": movie, "label": None, "label_id": None,
                             "label_source": None, "label_confidence": None, "top3": None, "top3_confidence": None})
                continue
            batch.append((frame, image))
            if len(batch) >= self.settings.batch_size:
                run_batch()
        if batch:
            run_batch()
        order = {f["frame_id"]: i for i, f in enumerate(frames)}
        rows.sort(key=lambda r: order[r["frame_id"]])
        summary = {
            "movie_id": movie, "inputs_digest": partition.info["inputs_digest"],
            "checkpoint_sha256": partition.info["checkpoint_sha256"],
            "frames_in": len(frames), "frames_out": len(frames) - unreadable,
            "human": len(frames) - len(todo), "model": len(todo) - unreadable,
            "rejected": {"unreadable_frame": unreadable} if unreadable else {},
            "seconds": round(time.monotonic() - started, 3),
        }
        self.workdir.commit(STAGE, movie, pa.Table.from_pylist(rows, PREDICTION_SCHEMA), summary)
        return summary

    def _human_row(self, frame: dict, label_id: int) -> dict:
        name = self.taxonomy.names[label_id]
        return {"frame_id": frame["frame_id"], "movie_id": frame["movie_id"], "label": name, "label_id": label_id,
                "label_source": "human", "label_confidence": 1.0, "top3": [name], "top3_confidence": [1.0]}


def allowed_labels(taxonomy: Taxonomy, metadata: dict | None) -> list[int] | None:
    """Label ids consistent with a film's known era / nationality; None when nothing is known."""
    era, nationality = (metadata or {}).get("era") or None, (metadata or {}).get("nationality") or None
    if era is None and nationality is None:
        return None
    allowed = taxonomy.consistent_with(era, nationality)
    if not allowed:
        raise LabelerError(f"no label of {taxonomy.source} has era {era!r} and nationality {nationality!r}")
    return allowed


def plan_labeling(workdir: WorkDir, checkpoint: Path, taxonomy: Taxonomy,
                  movie_metadata: dict[str, dict] | None = None, mode: str = "frame") -> list[Partition]:
    """One partition per film with kept frames. A done film is redone when its frames, its human
    labels, its metadata or the checkpoint changed since, and, for a labeler that sees the persons
    (`mode`), their boxes."""
    frames = labelable_frames(workdir)[["frame_id", "movie_id", "jpeg", "boxes"]]
    if frames.empty:
        raise LabelerError(f"{workdir.root}: no frames kept after detection: run `mhmd detect` first")
    human = read_human_labels(workdir)
    human = {} if human is None else dict(zip(human.frame_id, human.label_id.astype(int)))
    weights = sha256_of(checkpoint)
    done = workdir.done(STAGE)
    partitions = []
    for movie, group in frames.groupby("movie_id", sort=True):
        listing = [{**f, "boxes": boxes_listed(f["boxes"])} for f in group.to_dict("records")]
        labels = {f["frame_id"]: int(human[f["frame_id"]]) for f in listing if f["frame_id"] in human}
        allowed = allowed_labels(taxonomy, (movie_metadata or {}).get(movie))
        seen = [[f["boxes"] for f in listing]] if mode == "persons" else []  # a frame labeler never reads them
        digest = hashlib.sha256(json.dumps([inputs_digest(group.frame_id.tolist()), sorted(labels.items()), allowed]
                                           + seen).encode()).hexdigest()[:16]
        workdir.plan(STAGE, movie, {"frames": len(listing), "inputs_digest": digest})
        summary = done.get(movie)
        if summary and summary.get("inputs_digest") == digest and summary.get("checkpoint_sha256") == weights:
            continue
        partitions.append(Partition(movie, {"frames": listing, "human": labels, "allowed": allowed,
                                            "inputs_digest": digest, "checkpoint_sha256": weights}))
    return partitions


@writes("workdir")
def predict(workdir: WorkDir | str | Path, checkpoint: str | Path, settings: PredictSettings | None = None,
            taxonomy: Taxonomy | None = None, movie_metadata: dict[str, dict] | None = None,
            runner=None) -> list[PartitionResult]:
    """Label every kept frame, film by film, resumably; human labels are kept as they are.
    movie_metadata: movie_id -> {"era": ..., "nationality": ...} (either may be missing)."""
    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    taxonomy = taxonomy or load_taxonomy()
    config = check_checkpoint(checkpoint, taxonomy)
    partitions = plan_labeling(workdir, Path(checkpoint), taxonomy, movie_metadata, input_of(config))
    stage = LabelStage(workdir, str(checkpoint), taxonomy, settings or PredictSettings())
    return (runner or LocalRunner()).run(stage, partitions)
