"""`mhmd relabel`: new labels for existing shards from a (better) labeler checkpoint.

Every shard of SHARDDIR is streamed with webdataset and written again to NEWDIR under the same name,
sample for sample in the same order: the image bytes (and any mask) are copied unchanged, `json` and
`cls` carry the new labels. Human labels stay unless `override_human`. Each tar is written atomically
and `index.json` comes last, as `mhmd shard` does. Each tar is one partition of the relabel stage, run
by a runner (local: one process, the model loaded once; ray: GPU actors), with its records in
NEWDIR/.relabel/ until the index is written.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from .batching import batched
from .errors import InputError
from .labeler import LabelerError, LabelerWorker, boxes_listed, check_checkpoint
from .runners import LocalRunner
from .shards import (INDEX, JPG, JSON, KEY, RELABEL_RECORDS, AtomicTar, clear_shard_dir, is_remote, label_fields,
                     open_shard, read_index, split_entry, with_json, write_index)
from .stages import Partition, PartitionError, Resources
from .tables import CHANGE_SCHEMA, RELABEL
from .taxonomy import Taxonomy, load_taxonomy
from .weights import sha256_of
from .workdir import WorkDir, writes


class RelabelError(InputError):
    """Shards that cannot be relabelled; the message names the shard (and sample) and the problem."""


@dataclass(frozen=True)
class RelabelSettings:
    device: str = "auto"
    batch_size: int = 64
    override_human: bool = False
    decode_threads: int = 4


def _decoded(sample: dict, shard: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(sample[JPG], np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RelabelError(f"{shard}: sample {sample[KEY]}: its {JPG} cannot be decoded")
    return image


def _boxes(sample: dict, meta: dict, shard: str) -> list[list[float]]:
    try:
        return boxes_listed(meta.get("boxes"))
    except LabelerError as e:
        raise RelabelError(f"{shard}: sample {sample[KEY]}: {e}") from None


STAGE = RELABEL


@dataclass
class RelabelStage(LabelerWorker):
    """Relabels one tar per partition; the labeler is loaded once per worker, in setup()."""

    workdir: WorkDir
    source: Path
    out: Path
    checkpoint: str
    taxonomy: Taxonomy
    settings: RelabelSettings
    name: str = STAGE
    resources: Resources = field(default_factory=Resources)  # set from the device (LabelerWorker)
    unit: str = "samples"

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "pool": None}

    def setup(self) -> None:
        super().setup()
        # imdecode and resize release the GIL
        self.pool = ThreadPoolExecutor(self.loader_threads(self.settings.decode_threads))

    def process(self, partition: Partition, progress) -> dict:
        name, split, count = partition.id, partition.info["split"], partition.info["count"]
        self.workdir.begin(STAGE, name)
        if not (self.source / name).is_file():
            raise PartitionError(f"{self.source / name}: listed in {INDEX} but missing")
        rows = []
        with AtomicTar(self.out / name) as tar:
            for batch in batched(open_shard(self.source / name), self.settings.batch_size):
                for sample, old, new in self._relabelled(batch, name):
                    tar.write(sample)
                    rows.append({"frame_id": sample[KEY], "movie": new.get("movie"), "split": split,
                                 "before": old.get("label"), "after": new["label"]})
                progress(len(rows), count)
        summary = {"frames_in": len(rows), "frames_out": len(rows),
                   "changed": sum(r["before"] != r["after"] for r in rows)}
        self.workdir.commit(STAGE, name, pa.Table.from_pylist(rows, CHANGE_SCHEMA), summary)
        return summary

    def _relabelled(self, batch: list[dict], shard: str) -> list[tuple[dict, dict, dict]]:
        """(sample to write, old json, new json) for each sample of the batch, labelled in one pass."""
        metas = [json.loads(s[JSON]) for s in batch]
        todo = [i for i, m in enumerate(metas) if self.settings.override_human or m.get("label_source") != "human"]
        # A sample's json carries the frame's person boxes, so a persons labeler crops them as in predict.
        boxes = {i: _boxes(batch[i], metas[i], shard) for i in todo}
        images = list(self.pool.map(lambda i: self.labeler.image(_decoded(batch[i], shard), boxes[i]), todo))
        frames = [{"frame_id": metas[i].get("frame_id"), "movie_id": metas[i].get("movie")} for i in todo]
        predicted = self.labeler.predict_batch(list(zip(frames, images)), None) if todo else []
        new_metas = [dict(m) for m in metas]
        for i, row in zip(todo, predicted):
            label = self.taxonomy.labels[row["label_id"]]
            new_metas[i].update(label_fields(label, "model", row["label_confidence"]))
        return [(with_json(sample, new), old, new) for sample, old, new in zip(batch, metas, new_metas)]


@writes("out")
def relabel(shard_dir: str | Path, checkpoint: str | Path, out: str | Path,
            settings: RelabelSettings | None = None, taxonomy: Taxonomy | None = None, runner=None) -> dict:
    """Write SHARDDIR's shards again into OUT with the checkpoint's labels; returns OUT's index,
    whose "relabel" entry holds the counts of (old label, new label) pairs. `runner`: where the tars
    are relabelled (default: this process)."""
    if is_remote(out):  # its records live in OUT until the index is written
        raise RelabelError(f"{out}: relabel writes a local folder, not object storage: relabel into a folder, "
                           "then upload it")
    shard_dir, out = Path(shard_dir).resolve(), Path(out).resolve()
    settings, taxonomy = settings or RelabelSettings(), taxonomy or load_taxonomy()
    if out == shard_dir:
        raise RelabelError(f"{out}: give a new folder for the relabelled shards, not the source folder")
    index = read_index(shard_dir)
    if index.get("taxonomy_sha256") != taxonomy.sha256:
        raise RelabelError(f"{shard_dir}: its labels are ids of another taxonomy than {taxonomy.source}: "
                           "relabel with the taxonomy the shards were written with (--taxonomy)")
    check_checkpoint(checkpoint, taxonomy)
    clear_shard_dir(out)
    workdir = WorkDir(out / RELABEL_RECORDS)
    partitions = [Partition(e["name"], {"split": e["split"], "count": e["count"]},
                            record={"split": e["split"], "count": e["count"]}) for e in index["shards"]]
    stage = RelabelStage(workdir, shard_dir, out, str(checkpoint), taxonomy, settings)
    failures = [r for r in (runner or LocalRunner()).run(stage, partitions) if not r.ok]
    if failures:
        raise RelabelError(f"{len(failures)} of {len(partitions)} shards could not be relabelled; first: "
                           f"{failures[0].id}: {failures[0].reason}")
    rows = workdir.read_table(STAGE)
    labels = rows[["before", "after"]].astype(object).where(rows[["before", "after"]].notna(), None)  # NaN -> None
    changes = Counter(zip(labels.before, labels.after))
    in_split = {split: rows[rows.split == split] for split in index["splits"]}
    new_index = {**index, "splits": {split: split_entry(Counter(part.movie), Counter(part.after))
                                     for split, part in in_split.items()},
                 "relabel": {"source": str(shard_dir), "checkpoint": str(checkpoint),
                             "checkpoint_sha256": sha256_of(Path(checkpoint)),
                             "override_human": settings.override_human,
                             "changes": [{"from": a, "to": b, "count": n}
                                         for (a, b), n in sorted(changes.items(), key=str)]}}
    write_index(out, new_index)
    shutil.rmtree(out / RELABEL_RECORDS)
    return new_index


def format_changes(changes: list[dict]) -> str:
    """Per label: frames before and after, and how many left it or came to it."""
    before, after, left, came = Counter(), Counter(), Counter(), Counter()
    for c in changes:
        before[c["from"]] += c["count"]
        after[c["to"]] += c["count"]
        if c["from"] != c["to"]:
            left[c["from"]] += c["count"]
            came[c["to"]] += c["count"]
    total, changed = sum(before.values()), sum(left.values())
    lines = [f"{changed} of {total} labels changed",
             f"{'label':<40}{'before':>8}{'after':>8}{'left':>8}{'came':>8}"]
    for label in sorted(set(before) | set(after), key=lambda name: (name is None, name or "")):
        lines.append(f"{label or '(none)':<40}{before[label]:>8}{after[label]:>8}{left[label]:>8}{came[label]:>8}")
    return "\n".join(lines)
