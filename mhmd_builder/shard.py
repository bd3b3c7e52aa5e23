"""Stage 5: the kept frames as WebDataset shards (`train-000000.tar`, `test-000000.tar`).

Split by film (no film in both splits), samples shuffled across films within a split, written with
webdataset's own TarWriter. Output is deterministic (sorted inputs, seeded shuffles, fixed tar
metadata: the same inputs and seed give byte-identical tars) and atomic (each tar is written under
a temporary name and renamed; `index.json` comes last).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import webdataset as wds

from .manifest import manifest
from .taxonomy import Label, Taxonomy, load_taxonomy
from .workdir import WorkDir, atomic_write_json

STAGE = "shard"


@dataclass(frozen=True)
class ShardSettings:
    maxcount: int = 1000
    maxsize: int = 1 << 30  # bytes per tar, at most
    # The paper holds out 100,001 of 1,353,166 frames (7.4%) for testing.
    test_fraction: float = 100_001 / 1_353_166
    seed: int = 0


def split_films(frames: pd.DataFrame, test_fraction: float, seed: int) -> dict[str, str]:
    """movie_id -> "train" | "test". Films are drawn in a seeded order; each goes to test while the
    test split stays within test_fraction of the frames (the first drawn always does, so a test split
    exists whenever there are two films or more; the last film is never taken: train stays non-empty)."""
    counts = frames.groupby("movie_id").size().sort_index()
    split = {movie: "train" for movie in counts.index}
    if len(counts) < 2 or test_fraction <= 0:
        return split
    in_test, tested = 0, 0
    for i in np.random.default_rng(seed).permutation(len(counts)):
        if tested == len(counts) - 1:
            break
        if in_test and in_test + counts.iloc[i] > test_fraction * counts.sum():
            continue
        split[counts.index[i]] = "test"
        in_test, tested = in_test + counts.iloc[i], tested + 1
    return split


def label_fields(label: Label | None, source: str | None = None, confidence: float | None = None) -> dict:
    """The label part of a sample's json: all null for an unlabelled frame."""
    return {"label_id": label.id if label else None, "label": label.name if label else None,
            "era": label.era if label else None, "nationality": label.nationality if label else None,
            "garment": label.garment if label else None, "label_source": source if label else None,
            "label_confidence": float(confidence) if label else None}


def sample_json(row, taxonomy: Taxonomy) -> dict:
    label = taxonomy.by_name(row.label) if isinstance(row.label, str) else None
    boxes = row.boxes if isinstance(row.boxes, (list, np.ndarray)) else []
    return {
        "frame_id": row.frame_id, "movie": row.movie_id, "timestamp": round(float(row.timestamp), 3),
        "width": int(row.width), "height": int(row.height),
        "boxes": [[round(float(v), 5) for v in box] for box in boxes],
        **label_fields(label, row.label_source, row.label_confidence),
    }


def encode_json(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


def _sample(row, root: Path, taxonomy: Taxonomy) -> dict:
    meta = sample_json(row, taxonomy)
    sample = {"__key__": row.frame_id, "jpg": (root / row.jpeg).read_bytes(),
              "json": encode_json(meta)}
    if meta["label_id"] is not None:
        sample["cls"] = str(meta["label_id"]).encode()
    target = row.parsing if isinstance(getattr(row, "parsing", None), str) else getattr(row, "mask", None)
    if isinstance(target, str):
        sample["mask.png"] = (root / target).read_bytes()
    return sample


class AtomicTar:
    """One tar written with webdataset's TarWriter under a hidden temporary name and renamed on a
    clean exit (removed on an error): no partial tar is ever visible under its final name."""

    def __init__(self, path: Path):
        self.path, self.temp = path, path.with_name(f".{path.name}.tmp")
        self.file = open(self.temp, "wb")
        # Samples are bytes already (no encoder pass); GNU headers cost less than PAX ones; fixed
        # owner and mtime make the bytes depend on the samples alone.
        self.writer = wds.TarWriter(self.file, user="mhmd", group="mhmd", mtime=0, encoder=False,
                                    format="GNU_FORMAT")

    def write(self, sample: dict) -> None:
        self.writer.write(sample)

    def __enter__(self) -> "AtomicTar":
        return self

    def __exit__(self, error_type, *_) -> None:
        self.close(keep=error_type is None)

    def close(self, keep: bool = True) -> None:
        self.writer.close()
        self.file.close()
        if keep:
            os.replace(self.temp, self.path)
        else:
            self.temp.unlink(missing_ok=True)


class _Tars:
    """Consecutive tars of one split, each opened when the last one is full."""

    def __init__(self, out: Path, split: str, settings: ShardSettings):
        self.out, self.split, self.settings = out, split, settings
        self.shards: list[dict] = []
        self.tar: AtomicTar | None = None

    def write(self, sample: dict) -> None:
        size = sum(len(v) + 1024 for k, v in sample.items() if k != "__key__")  # tar headers: 512 B each
        current = self.shards[-1] if self.shards else None
        if current is None or current["count"] >= self.settings.maxcount or (
                current["count"] and current["bytes"] + size > self.settings.maxsize):
            self._open()
        self.tar.write(sample)
        self.shards[-1]["count"] += 1
        self.shards[-1]["bytes"] += size

    def _open(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self.tar = AtomicTar(self.out / name)
        self.shards.append({"name": name, "split": self.split, "count": 0, "bytes": 0})

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def split_entry(movies: list[str], labels: list[str | None]) -> dict:
    """A split's line in index.json: samples, films, and the label histogram."""
    return {"samples": len(movies), "movies": len(set(movies)),
            "labels": dict(sorted(Counter(label for label in labels if isinstance(label, str)).items()))}


def clear_shard_dir(out: Path) -> None:
    """Remove an earlier shard set from OUT; refuse to touch a folder that holds anything else."""
    out.mkdir(parents=True, exist_ok=True)
    ours = re.compile(r"^(\.?(train|test)-\d{6}\.tar(\.tmp)?|index\.json)$")
    others = sorted(p.name for p in out.iterdir() if not ours.match(p.name))
    if others:
        raise ValueError(f"{out}: holds files that are not shards ({', '.join(others[:3])}...): "
                         "give an empty or new folder")
    for path in out.iterdir():
        path.unlink()


def shard(workdir: WorkDir | str | Path, out: str | Path, settings: ShardSettings | None = None,
          taxonomy: Taxonomy | None = None) -> dict:
    """Write every kept frame into OUT; returns (and writes as OUT/index.json) the shard index."""
    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    settings, taxonomy, out = settings or ShardSettings(), taxonomy or load_taxonomy(), Path(out)
    started = time.monotonic()
    frames = manifest(workdir)
    if "jpeg" in frames:
        frames = frames[frames.kept.astype(bool) & frames.jpeg.notna()].sort_values("frame_id", ignore_index=True)
    if frames.empty:
        raise ValueError(f"{workdir.root}: no kept frames to shard (run extract and detect first)")
    for column in ("boxes", "mask", "parsing", "label", "label_source", "label_confidence"):
        if column not in frames:
            frames[column] = None
    split_of = split_films(frames, settings.test_fraction, settings.seed)
    frames["split"] = frames.movie_id.map(split_of)

    clear_shard_dir(out)  # a rerun (or a killed run) rewrites the whole set
    index = {"settings": asdict(settings), "taxonomy_sha256": taxonomy.sha256, "shards": [], "splits": {}}
    for split in ("train", "test"):
        part = frames[frames.split == split]
        part = part.iloc[np.random.default_rng(settings.seed).permutation(len(part))]  # mix films and scenes
        tars = _Tars(out, split, settings)
        for row in part.itertuples():
            tars.write(_sample(row, workdir.root, taxonomy))
        tars.close()
        index["shards"] += [{k: s[k] for k in ("name", "split", "count")} for s in tars.shards]
        index["splits"][split] = split_entry(part.movie_id.tolist(), part.label.tolist())
    atomic_write_json(out / "index.json", index)
    _record(workdir, frames, out, started)
    return index


def _record(workdir: WorkDir, frames: pd.DataFrame, out: Path, started: float) -> None:
    """The shard stage's own records: which frame went to which split, and the funnel counts."""
    workdir.begin(STAGE, "all")
    table = pa.Table.from_pandas(frames[["frame_id", "movie_id", "split"]], preserve_index=False)
    workdir.commit(STAGE, "all", table, {"frames_in": len(frames), "frames_out": len(frames), "output": str(out),
                                          "seconds": round(time.monotonic() - started, 3)})

