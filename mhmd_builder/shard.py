"""Stage 5: the kept frames as WebDataset shards (`train-000000.tar`, `test-000000.tar`; the format,
its tar writer and index.json are in shards.py).

Split by film (no film in both splits), samples shuffled across films within a split (in the order
of a seeded hash of their frame ids: the plan spills the frames into buckets of that order and holds
one at a time), written as webdataset's own TarWriter writes them (shards.AtomicTar). Output is deterministic (sorted inputs,
seeded shuffles, fixed tar metadata: the same inputs and seed give byte-identical tars) and atomic
(each tar is written under a temporary name and renamed; `index.json` comes last). To an object
store (`s3://bucket/prefix`), each tar is written whole in the partition's staging folder
(W/shard/tmp/) and then uploaded under its name, which the store publishes only once complete.

Every tar is one partition of the shard stage: tars are written in parallel (the writer is pure
Python: one process cannot keep up with the disk), and a rerun rewrites only the tars whose samples
changed, or that are missing.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from .errors import InputError
from .footage import duplicate_groups, fingerprints
from .manifest import manifest_by_movie
from .runners import LocalRunner
from .shards import (BOX_DECIMALS, JPG, MASK, SPLITS, AtomicTar, class_index, clear_shard_dir, encode_json, folder_sizes,
                     is_remote, label_fields, make_index, sample_members, shard_output, split_entry,
                     tar_name, upload_tar, write_index)
from .stages import Partition, PartitionError, Resources
from .tables import DETECT_SCHEMA, EXTRACT, FRAME_SCHEMA, MANIFEST_COLUMNS, SHARD
from .taxonomy import Taxonomy, load_taxonomy
from .workdir import WorkDir, writes

STAGE = SHARD
# What shard reads of the extract tables: the samples' json and files, the keep decisions and the
# films' perceptual hashes (near duplicates); not the other scores.
FINGERPRINT_COLUMNS = ["movie_id", "flags", "phash_hi", "phash_lo"]
EXTRACT_COLUMNS = ["frame_id", "timestamp", "width", "height", "kept", "reject_reason", "jpeg", "jpeg_bytes",
                   "jpeg_xxh3", *FINGERPRINT_COLUMNS]
# What a sample is made of (`_spec`): the columns of the frames to shard held while planning.
SAMPLE_COLUMNS = ["frame_id", "movie_id", "timestamp", "width", "height", "boxes", "label", "label_source",
                  "label_confidence", "jpeg", "jpeg_bytes", "jpeg_xxh3", "mask", "parsing"]
SPEC_ROWS = 4096  # frames turned into Python rows at once while planning
# The plan's shuffle (`spill_kept_frames`): the frames to shard, with their shuffle keys, in bucket
# files of about this many frames (~0.5 KB each in memory), one held at a time.
SHUFFLE_BUCKET_ROWS = 250_000
_TYPES = {**MANIFEST_COLUMNS, **dict(zip(FRAME_SCHEMA.names, FRAME_SCHEMA.types)),
          **dict(zip(DETECT_SCHEMA.names, DETECT_SCHEMA.types)), "parsing": pa.string()}
SPILL_SCHEMA = pa.schema([*((name, _TYPES[name]) for name in SAMPLE_COLUMNS), ("key", pa.uint64())])
SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")  # a third of the bytes, for little CPU


@dataclass(frozen=True)
class ShardSettings:
    maxcount: int = 1000
    maxsize: int = 1 << 30  # bytes per tar, at most
    # The paper holds out 100,001 of 1,353,166 frames (7.4%) for testing.
    test_fraction: float = 100_001 / 1_353_166
    seed: int = 0


def split_films(counts: dict[str, int], test_fraction: float, seed: int,
                groups: list[list[str]] = ()) -> dict[str, str]:
    """movie_id -> "train" | "test", of each film's number of frames. Films are drawn in a seeded order; each goes to test while the
    test split stays within test_fraction of the frames (the first drawn always does, so a test split
    exists whenever there are two films or more; the last film is never taken: train stays non-empty).
    A group of near-duplicate films (`groups`) is one film: drawn with its first member drawn, all
    of it in the same split; without groups the split is what it was before groups existed."""
    counts = pd.Series(counts, dtype=np.int64).sort_index()
    split = {movie: "train" for movie in counts.index}
    unit_of = {movie: group[0] for group in groups for movie in group if movie in split}
    units = counts.groupby(lambda movie: unit_of.get(movie, movie)).sum()
    if len(units) < 2 or test_fraction <= 0:
        return split
    in_test, tested, drawn = 0, 0, set()
    for i in np.random.default_rng(seed).permutation(len(counts)):
        unit = unit_of.get(counts.index[i], counts.index[i])
        if unit in drawn:
            continue
        drawn.add(unit)
        if tested == len(units) - 1:
            break
        if in_test and in_test + units[unit] > test_fraction * counts.sum():
            continue
        split.update({movie: "test" for movie in counts.index if unit_of.get(movie, movie) == unit})
        in_test, tested = in_test + units[unit], tested + 1
    return split


def sample_json(row: dict, taxonomy: Taxonomy, film: dict | None = None) -> dict:
    """A sample's json, of a row of SAMPLE_COLUMNS (Arrow's, or pandas', with NaN for null). An
    unlabelled frame of a film whose era / nationality are known (movie metadata) carries those, with
    label_source "movie"."""
    label = taxonomy.by_name(row["label"]) if isinstance(row["label"], str) else None
    boxes = row["boxes"] if isinstance(row["boxes"], (list, np.ndarray)) else []
    meta = {
        "frame_id": row["frame_id"], "movie": row["movie_id"], "timestamp": round(float(row["timestamp"]), 3),
        "width": int(row["width"]), "height": int(row["height"]),
        "boxes": [[round(float(v), BOX_DECIMALS) for v in box] for box in boxes],
        **label_fields(label, row["label_source"], row["label_confidence"]),
    }
    if label is None and film and (film.get("era") or film.get("nationality")):
        meta.update(era=film.get("era"), nationality=film.get("nationality"), label_source="movie")
    return meta


def _spec(row: dict, root: str, taxonomy: Taxonomy, film: dict | None) -> dict:
    """What a sample's members are made of: the json written out, `cls`, the files' paths and sizes
    (plain strings and os.path: this runs once per frame, in one process). `cls` is UNLABELLED, not
    None, for an unlabelled frame: the digest then differs from that of a tar written before `cls`
    was in every sample, and a rerun writes such a tar again."""
    meta = sample_json(row, taxonomy, film)
    target = row["parsing"] if isinstance(row["parsing"], str) else row["mask"]
    files = {JPG: os.path.join(root, row["jpeg"]),
             **({MASK: os.path.join(root, target)} if isinstance(target, str) else {})}
    spec = {"key": row["frame_id"], "movie_id": row["movie_id"], "json": encode_json(meta).decode(),
            "cls": class_index(meta["label_id"]), "files": files,
            "sizes": {k: _size(path) for k, path in files.items()}}
    size, digest = row.get("jpeg_bytes"), row.get("jpeg_xxh3")
    if isinstance(digest, str):  # not recorded by earlier versions: not checked (and their tars' digests stay)
        spec["written"] = [int(size), digest]
    return spec


def _size(path: str) -> int | None:
    """A member file's size; None when it cannot be stat'ed (its tar then fails, naming it)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return None


# What writes a member's file again when it is missing or unreadable.
_REMEDY = {JPG: "re-extract its film (`mhmd extract --redo`)",
           MASK: "write it again (`mhmd detect --masks` or `mhmd parsing attach`)"}


READ_BYTES = 1 << 18  # a frame's JPEG (about 60 KB) in one read


def _read_member(member: str, path: str) -> bytes:
    """A member file's bytes; PartitionError naming the file when it is missing or unreadable.
    os.read until the end: open() adds an ioctl, two fstats and a seek to each file, which cost
    as much as the read of a small one."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            chunks = [os.read(fd, READ_BYTES)]
            while chunks[-1]:
                chunks.append(os.read(fd, READ_BYTES))
        finally:
            os.close(fd)
        return b"".join(chunks)
    except OSError as error:
        reason = "missing" if isinstance(error, FileNotFoundError) else f"unreadable ({error.strerror or error})"
        raise PartitionError(f"{path}: {reason}: {_REMEDY[member]}") from None


def _check_written(path: str, data: bytes, written: list) -> None:
    """PartitionError naming the JPEG when its bytes are not those extract wrote (its size and XXH3,
    recorded then): a file cut short or overwritten since would go into the tar unnoticed."""
    size, digest = written
    if len(data) != size:
        change = f"{len(data)} bytes, {size} when extracted"
    elif xxhash.xxh3_64_hexdigest(data) != digest:
        change = "its bytes differ from those extracted (XXH3)"
    else:
        return
    raise PartitionError(f"{path}: damaged since it was extracted ({change}): {_REMEDY[JPG]}")


def _members(spec: dict) -> dict:
    """The sample as webdataset writes it: `jpg` (and `mask.png`) copied byte for byte, not re-encoded."""
    files = {member: _read_member(member, path) for member, path in spec["files"].items()}
    if "written" in spec:
        _check_written(spec["files"][JPG], files[JPG], spec["written"])
    return sample_members(spec["key"], spec["json"].encode(), spec["cls"], files)


@dataclass
class ShardStage:
    """Writes one tar per partition into `out` (a folder or an object store's URL) and records which
    frames went into it."""

    workdir: WorkDir
    out: Path | str
    name: str = STAGE
    # Forked writers: plain file work with what the parent imported, no threads or CUDA; a spawned
    # writer would spend a second or two importing.
    resources: Resources = field(default_factory=lambda: Resources(start_method="fork"))
    unit: str = "samples"

    def setup(self) -> None:
        pass

    def process(self, partition: Partition, progress) -> dict:
        started = time.monotonic()
        staging = self.workdir.begin(STAGE, partition.id)
        specs, name = json.loads(samples_path(self.workdir, partition.id).read_bytes()), partition.info["tar"]
        path = staging / name if is_remote(self.out) else self.out / name
        with AtomicTar(path) as tar:
            for i, spec in enumerate(specs):
                tar.write(_members(spec))
                progress(i + 1, len(specs))
        if is_remote(self.out):  # from this worker: fsspec makes its own client and IO thread after a fork
            upload_tar(path, self.out)
        table = pa.table({"frame_id": [s["key"] for s in specs], "movie_id": [s["movie_id"] for s in specs],
                          "split": [partition.info["split"]] * len(specs), "shard": [name] * len(specs)})
        summary = {"digest": partition.info["digest"], "output": str(self.out), "frames_in": len(specs),
                   "frames_out": len(specs), "bytes": path.stat().st_size,
                   "seconds": round(time.monotonic() - started, 3)}
        self.workdir.commit(STAGE, partition.id, table, summary)
        return summary


def _sample_bytes(spec: dict) -> int:
    """A sample's share of a tar: its members plus a 512-byte header (and padding) for each."""
    sizes = [size or 0 for size in spec["sizes"].values()]  # None: a missing file, whose tar fails anyway
    members = [len(spec["json"]), *sizes, 8]  # 8: `cls`, a few digits
    return sum(size + 1024 for size in members)


@dataclass
class KeptFrames:
    """What the plan learns of the frames to shard (kept, with a JPEG) from one pass over the movies:
    the frames themselves spilled to bucket files (`spill_kept_frames`), and per film their count
    and labels; the groups of near-duplicate films."""

    buckets: list[Path]  # Arrow IPC streams of SPILL_SCHEMA, in the order of their shuffle keys
    counts: dict[str, int] = field(default_factory=dict)  # movie_id -> frames
    labels: dict[str, Counter] = field(default_factory=dict)  # movie_id -> its frames' labels
    groups: list[list[str]] = field(default_factory=list)


def shuffle_keys(frame_ids: list[str], seed: int) -> np.ndarray:
    """Each frame's place in its split (uint64; ties, which never happen in practice, go by frame_id):
    a seeded hash of its id, so that sorting by it shuffles the split, whatever order the frames come
    in and however they are cut into buckets."""
    return np.fromiter((xxhash.xxh3_64_intdigest(frame_id.encode(), seed) for frame_id in frame_ids), np.uint64,
                       len(frame_ids))


def spill_kept_frames(workdir: WorkDir, folder: Path, seed: int) -> KeptFrames:
    """Reads the movies once (`manifest_by_movie`) and writes their frames to shard, as SPILL_SCHEMA
    rows with their shuffle key, into bucket files by the key's first bits: each bucket holds about
    SHUFFLE_BUCKET_ROWS frames, so that the plan holds one bucket, not every frame, at a time."""
    bits = _bucket_bits(workdir)
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    kept, prints = KeptFrames(buckets=[folder / f"{b:05d}.arrow" for b in range(1 << bits)]), {}
    try:
        for movie in manifest_by_movie(workdir, before=STAGE, columns=EXTRACT_COLUMNS):  # its own records are redone here
            if "jpeg" not in movie.column_names:  # an extract table of an earlier version: nothing to shard
                continue
            rows = _spill_rows(movie.filter(pc.and_(movie["kept"], pc.is_valid(movie["jpeg"]))), seed)
            if not rows.num_rows:
                continue
            movie_id = rows["movie_id"][0].as_py()
            kept.counts[movie_id], kept.labels[movie_id] = rows.num_rows, Counter(rows["label"].to_pylist())
            prints.update(fingerprints(movie.select([c for c in FINGERPRINT_COLUMNS if c in movie.column_names])))
            bucket = rows["key"].to_numpy() >> np.uint64(64 - bits) if bits else np.zeros(rows.num_rows, np.uint64)
            for b in np.unique(bucket):
                if b not in writers:
                    writers[b] = pa.ipc.new_stream(kept.buckets[b], SPILL_SCHEMA, options=SPILL_OPTIONS)
                writers[b].write_table(rows.filter(bucket == b))
    finally:
        for writer in writers.values():
            writer.close()
    kept.buckets = [path for b, path in enumerate(kept.buckets) if b in writers]
    kept.groups = duplicate_groups(prints)
    return kept


def _bucket_bits(workdir: WorkDir) -> int:
    """log2 of the number of buckets: enough for SHUFFLE_BUCKET_ROWS frames each, from the frames
    extract kept (its done markers' counts: more than shard keeps after detection, never fewer)."""
    frames = sum(int(summary.get("frames_out", 0)) for summary in workdir.done(EXTRACT).values())
    return max(0, math.ceil(math.log2(max(1, frames) / SHUFFLE_BUCKET_ROWS)))


def _spill_rows(rows: pa.Table, seed: int) -> pa.Table:
    """One movie's frames to shard as SPILL_SCHEMA (columns of stages not run yet are null)."""
    columns = [rows[name] if name in rows.column_names else pa.nulls(rows.num_rows) for name in SAMPLE_COLUMNS]
    columns.append(pa.array(shuffle_keys(rows["frame_id"].to_pylist(), seed), pa.uint64()))
    return pa.table(columns, names=[*SAMPLE_COLUMNS, "key"]).cast(SPILL_SCHEMA)


def _shuffled_bucket(path: Path, movies: pa.Array) -> tuple[pa.Table, np.ndarray]:
    """A bucket's frames of `movies` (one split's films) and their row numbers in shuffle-key order."""
    with pa.ipc.open_stream(path) as reader:
        frames = reader.read_all()
    frames = frames.filter(pc.is_in(frames["movie_id"], value_set=movies))
    return frames, pc.sort_indices(frames, sort_keys=[("key", "ascending"), ("frame_id", "ascending")]).to_numpy()


def samples_path(workdir: WorkDir, partition: str) -> Path:
    """W/shard/samples/<tar>.json: the specs of the samples a tar holds, as planned; its writer reads
    them there, so that no process holds every sample's spec."""
    return workdir.stage_dir(STAGE) / "samples" / f"{partition}.json"


def plan_tars(kept: KeptFrames, split: dict[str, str], workdir: WorkDir, out: Path | str, settings: ShardSettings,
              taxonomy: Taxonomy, movie_metadata: dict[str, dict] | None = None) -> list[Partition]:
    """Consecutive tars per split (`split`: movie_id -> split), its frames in the order of their shuffle
    keys, bucket after bucket: a new tar when the last holds `maxcount` samples or would pass `maxsize`
    bytes. Each tar's specs go to its samples file (`samples_path`) as soon as it is full; the
    partition says where, its split, sample count and digest (of its specs and OUT)."""
    folder = samples_path(workdir, "").parent
    shutil.rmtree(folder, ignore_errors=True)  # rewritten whole by every plan
    folder.mkdir(parents=True)
    partitions = []
    for name in SPLITS:
        movies = pa.array(sorted(movie for movie, s in split.items() if s == name), pa.string())
        specs: list[dict] = []
        size = tars = 0
        for spec in _split_specs(kept.buckets, movies, str(workdir.root), taxonomy, movie_metadata or {}):
            spec_bytes = _sample_bytes(spec)
            if specs and (len(specs) >= settings.maxcount or size + spec_bytes > settings.maxsize):
                partitions.append(_planned_tar(workdir, out, tar_name(name, tars), name, specs))
                specs, size, tars = [], 0, tars + 1
            specs.append(spec)
            size += spec_bytes
        if specs:
            partitions.append(_planned_tar(workdir, out, tar_name(name, tars), name, specs))
    return partitions


def _split_specs(buckets: list[Path], movies: pa.Array, root: str, taxonomy: Taxonomy,
                 movie_metadata: dict[str, dict]):
    """The specs of the frames of `movies`, in shuffle-key order: one bucket held at a time."""
    for path in buckets:
        frames, order = _shuffled_bucket(path, movies)
        yield from _specs(frames, order, root, taxonomy, movie_metadata)


def _specs(frames: pa.Table, order: np.ndarray, root: str, taxonomy: Taxonomy, movie_metadata: dict[str, dict]):
    """The specs of `frames`' rows in `order` (row numbers), made from a few thousand rows at a time
    (Python dicts straight from Arrow: pandas rows cost more)."""
    for start in range(0, len(order), SPEC_ROWS):
        for row in frames.take(order[start:start + SPEC_ROWS]).to_pylist():
            yield _spec(row, root, taxonomy, movie_metadata.get(row["movie_id"]))


def _planned_tar(workdir: WorkDir, out: Path | str, name: str, split: str, specs: list[dict]) -> Partition:
    """The partition of the tar `name`, its specs written to its samples file; its digest is that of
    json.dumps([str(out), specs]), of which the specs' text is a part."""
    text = json.dumps(specs)
    digest = hashlib.sha256(f"[{json.dumps(str(out))}, {text}]".encode()).hexdigest()[:16]
    pid = Path(name).stem
    # Not synced: every plan writes them again before a writer reads them.
    samples_path(workdir, pid).write_bytes(text.encode())
    return Partition(pid, {"split": split, "tar": name, "count": len(specs), "digest": digest},
                     record={"split": split, "samples": len(specs)})


def _up_to_date(partition: Partition, done: dict | None, sizes: dict[str, int]) -> bool:
    """Whether the tar is still as its done marker says (sizes: folder_sizes of OUT)."""
    return bool(done) and done.get("digest") == partition.info["digest"] \
        and sizes.get(partition.info["tar"]) == done.get("bytes")


@writes("workdir", "out")
def shard(workdir: WorkDir | str | Path, out: str | Path, settings: ShardSettings | None = None,
          taxonomy: Taxonomy | None = None, runner=None, movie_metadata: dict[str, dict] | None = None) -> dict:
    """Write every kept frame into OUT, a folder or an object store's URL (`s3://bucket/prefix`);
    returns (and writes as OUT/index.json) the shard index.
    Tars still up to date from an earlier (or killed) run are kept; the others are written by
    `runner` (default: one process per core). Near-duplicate films (footage.py) go to one split and
    are listed in the index. movie_metadata: movie_id -> {"era", "nationality"},
    given to unlabelled frames."""
    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    settings, taxonomy, out = settings or ShardSettings(), taxonomy or load_taxonomy(), shard_output(out)
    shuffle = workdir.stage_dir(STAGE) / "shuffle"
    shutil.rmtree(shuffle, ignore_errors=True)  # a killed plan's buckets
    shuffle.mkdir(parents=True)
    try:
        kept = spill_kept_frames(workdir, shuffle, settings.seed)
        if not kept.counts:
            raise InputError(f"{workdir.root}: no kept frames to shard (run extract and detect first)")
        split = split_films(kept.counts, settings.test_fraction, settings.seed, kept.groups)
        splits = {name: split_entry(Counter({m: n for m, n in kept.counts.items() if split[m] == name}),
                                    sum((kept.labels[m] for m in kept.labels if split[m] == name), Counter()))
                  for name in SPLITS}
        partitions = plan_tars(kept, split, workdir, out, settings, taxonomy, movie_metadata)
    finally:
        shutil.rmtree(shuffle, ignore_errors=True)
    pa.default_memory_pool().release_unused()  # the writers fork from here

    planned = {p.id for p in partitions}
    for stale in (set(workdir.done(STAGE)) | set(workdir.failed(STAGE)) | set(workdir.planned(STAGE))) - planned:
        workdir.drop(STAGE, stale)  # tars of an earlier, larger plan
    done, sizes = workdir.done(STAGE), folder_sizes(out)
    todo = [p for p in partitions if not _up_to_date(p, done.get(p.id), sizes)]
    clear_shard_dir(out, keep={p.info["tar"] for p in partitions if p not in todo})
    for p in partitions:
        workdir.plan(STAGE, p.id, {"split": p.info["split"], "samples": p.info["count"], "digest": p.info["digest"]})
    gc.freeze()  # a forked writer's collections then never touch, and copy, the pages of this heap
    try:
        failures = [r for r in (runner or LocalRunner()).run(ShardStage(workdir, out), todo) if not r.ok]
    finally:
        gc.unfreeze()
    if failures:
        raise InputError(f"{out}: {len(failures)} tars could not be written; first: {failures[0].id}: "
                         f"{failures[0].reason}")
    index = make_index(asdict(settings), taxonomy.sha256,
                       [(p.info["tar"], p.info["split"], p.info["count"]) for p in partitions], splits, kept.groups)
    write_index(out, index)
    return index
