"""`mhmd relabel`: new labels for existing shards from a (better) labeler checkpoint.

Every shard of SHARDDIR is streamed with webdataset and written again to NEWDIR under the same name,
sample for sample in the same order: the image bytes (and any mask) are copied unchanged, `json` and
`cls` carry the new labels. Human labels stay unless `override_human`. Each tar is written atomically
and `index.json` comes last, as `mhmd shard` does.
"""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds
from tqdm import tqdm

from .batching import batched
from .labeler import Labeler, fit_rgb
from .persons import sha256_of
from .shard import AtomicTar, clear_shard_dir, encode_json, label_fields, split_entry
from .taxonomy import Taxonomy, load_taxonomy
from .workdir import atomic_write_json, read_json


class RelabelError(ValueError):
    """Shards that cannot be relabelled; the message names the shard (and sample) and the problem."""


@dataclass(frozen=True)
class RelabelSettings:
    device: str = "auto"
    batch_size: int = 64
    override_human: bool = False
    decode_threads: int = 4


def read_index(shard_dir: Path) -> dict:
    path = shard_dir / "index.json"
    if not path.is_file():
        raise RelabelError(f"{shard_dir}: no index.json (not a folder written by `mhmd shard`)")
    return read_json(path)


def _decoded(sample: dict, shard: str, size: int) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RelabelError(f"{shard}: sample {sample['__key__']}: its jpg cannot be decoded")
    return fit_rgb(image, size)


class _Relabeller:
    """Labels samples in batches and rewrites their json / cls; tallies (old label, new label)."""

    def __init__(self, labeler: Labeler, taxonomy: Taxonomy, settings: RelabelSettings):
        self.labeler, self.taxonomy, self.settings = labeler, taxonomy, settings
        self.pool = ThreadPoolExecutor(settings.decode_threads)  # imdecode and resize release the GIL
        self.changes: Counter = Counter()

    def relabel(self, batch: list[dict], shard: str) -> list[dict]:
        metas = [json.loads(s["json"]) for s in batch]
        todo = [i for i, m in enumerate(metas) if self.settings.override_human or m.get("label_source") != "human"]
        images = list(self.pool.map(lambda i: _decoded(batch[i], shard, self.labeler.image_size), todo))
        frames = [{"frame_id": metas[i].get("frame_id"), "movie_id": metas[i].get("movie")} for i in todo]
        predicted = self.labeler.predict_batch(list(zip(frames, images)), None) if todo else []
        new_metas = [dict(m) for m in metas]
        for i, row in zip(todo, predicted):
            label = self.taxonomy.labels[row["label_id"]]
            new_metas[i].update(label_fields(label, "model", row["label_confidence"]))
        out = []
        for sample, old, new in zip(batch, metas, new_metas):
            self.changes[(old.get("label"), new["label"])] += 1
            rewritten = {k: v for k, v in sample.items() if not k.startswith("__") and k not in ("json", "cls")}
            rewritten.update({"__key__": sample["__key__"], "json": encode_json(new)})
            if new["label_id"] is not None:
                rewritten["cls"] = str(new["label_id"]).encode()
            out.append(rewritten)
        return out


def relabel(shard_dir: str | Path, checkpoint: str | Path, out: str | Path,
            settings: RelabelSettings | None = None, taxonomy: Taxonomy | None = None) -> dict:
    """Write SHARDDIR's shards again into OUT with the checkpoint's labels; returns OUT's index,
    whose "relabel" entry holds the counts of (old label, new label) pairs."""
    shard_dir, out = Path(shard_dir), Path(out)
    settings, taxonomy = settings or RelabelSettings(), taxonomy or load_taxonomy()
    if out.resolve() == shard_dir.resolve():
        raise RelabelError(f"{out}: give a new folder for the relabelled shards, not the source folder")
    index = read_index(shard_dir)
    if index.get("taxonomy_sha256") != taxonomy.sha256:
        raise RelabelError(f"{shard_dir}: its labels are ids of another taxonomy than {taxonomy.source}: "
                           "relabel with the taxonomy the shards were written with (--taxonomy)")
    relabeller = _Relabeller(Labeler(checkpoint, taxonomy, settings.device), taxonomy, settings)
    clear_shard_dir(out)
    metas: dict[str, list[dict]] = {"train": [], "test": []}
    total = sum(s["count"] for s in index["shards"])
    with tqdm(total=total, desc="relabel", unit="frame", disable=None) as bar:
        for entry in index["shards"]:
            source = shard_dir / entry["name"]
            if not source.is_file():
                raise RelabelError(f"{source}: listed in index.json but missing")
            with AtomicTar(out / entry["name"]) as tar:
                for batch in batched(wds.WebDataset(str(source), shardshuffle=False), settings.batch_size):
                    for sample in relabeller.relabel(batch, entry["name"]):
                        tar.write(sample)
                        metas[entry["split"]].append(json.loads(sample["json"]))
                    bar.update(len(batch))
    new_index = {**index, "splits": {split: split_entry([m["movie"] for m in ms], [m["label"] for m in ms])
                                     for split, ms in metas.items() if ms or split in index["splits"]},
                 "relabel": {"source": str(shard_dir), "checkpoint": str(checkpoint),
                             "checkpoint_sha256": sha256_of(Path(checkpoint)),
                             "override_human": settings.override_human,
                             "changes": [{"from": a, "to": b, "count": n}
                                         for (a, b), n in sorted(relabeller.changes.items(), key=str)]}}
    atomic_write_json(out / "index.json", new_index)
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
