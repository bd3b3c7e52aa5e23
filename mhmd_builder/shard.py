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
import json
import math
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from .batching import prefetched
from .errors import InputError, storage_error
from .footage import duplicate_groups, fingerprints
from .manifest import manifest_by_movie
from .runners import LocalRunner
from .shards import (BOX_DECIMALS, CLS, JPG, JSON, MASK, SPLITS, AtomicTar, class_index, clear_shard_dir, encode_json,
                     folder_sizes, is_remote, label_fields, make_index, shard_output, split_entry,
                     tar_name, upload_tar, write_index)
from .stages import Partition, PartitionError, Resources
from .tables import DETECT_SCHEMA, EXTRACT, FRAME_SCHEMA, MANIFEST_COLUMNS, SHARD, SPILL_OPTIONS, values_digest
from .taxonomy import Taxonomy, load_taxonomy
from .workdir import WorkDir, writes

STAGE = SHARD
# What shard reads of the extract tables: the samples' json and files, the keep decisions and the
# films' perceptual hashes (near duplicates); not the other scores.
FINGERPRINT_COLUMNS = ["movie_id", "flags", "phash_hi", "phash_lo"]
EXTRACT_COLUMNS = ["frame_id", "timestamp", "width", "height", "kept", "reject_reason", "jpeg", "jpeg_bytes",
                   "jpeg_xxh3", *FINGERPRINT_COLUMNS]
# What a sample is made of (`ShardStage._samples`): the columns of the frames to shard held while planning.
SAMPLE_COLUMNS = ["frame_id", "movie_id", "timestamp", "width", "height", "boxes", "label", "label_source",
                  "label_confidence", "jpeg", "jpeg_bytes", "jpeg_xxh3", "mask", "parsing"]
# The plan's shuffle (`spill_kept_frames`): the frames to shard, with their shuffle keys, in bucket
# files of about this many frames (~0.5 KB each in memory), one held at a time.
SHUFFLE_BUCKET_ROWS = 250_000
MAX_BUCKET_BITS = 8  # at most 256 buckets, each a file open while the movies are read
_TYPES = {**MANIFEST_COLUMNS, **dict(zip(FRAME_SCHEMA.names, FRAME_SCHEMA.types)),
          **dict(zip(DETECT_SCHEMA.names, DETECT_SCHEMA.types)), "parsing": pa.string()}
SPILL_SCHEMA = pa.schema([*((name, _TYPES[name]) for name in SAMPLE_COLUMNS), ("key", pa.uint64())])
# A tar's samples file: each frame's row, and its mask's size then (a mask written again rewrites the tar).
TAR_COLUMNS = [*SAMPLE_COLUMNS, "target_bytes"]


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


class SampleJson:
    """The samples' json, made a column at a time in Arrow (json.dumps costs more than the rest of a
    sample): of rows of SAMPLE_COLUMNS, the bytes `encode_json` (json.dumps, sorted keys) makes of each
    frame's meta: frame_id, movie, timestamp (rounded to the millisecond), width, height, boxes
    (rounded to BOX_DECIMALS) and the label fields (`label_fields`). An unlabelled frame of a film
    whose era / nationality are known (movie metadata) carries those, with label_source "movie"."""

    KEYS = ("boxes", "era", "frame_id", "garment", "height", "label", "label_confidence", "label_id",
            "label_source", "movie", "nationality", "timestamp", "width")  # json.dumps' sorted order
    # A label's fields, or an unlabelled film's, that do not change from frame to frame.
    PART_KEYS = ("era", "garment", "label", "nationality", "label_source")

    def __init__(self, taxonomy: Taxonomy, movie_metadata: dict[str, dict]):
        self.taxonomy, self.movie_metadata = taxonomy, movie_metadata
        self.labels: dict = {}  # label name -> its part (`_part`); None for an unknown name
        self.films: dict = {}  # movie_id -> its json text, and the part of its unlabelled frames

    def __call__(self, rows: pa.Table) -> tuple[list[bytes], list[int | None]]:
        """Each row's json and label id (None: unlabelled)."""
        films = [self._film(movie) for movie in rows["movie_id"].to_pylist()]
        parts = [self._label(label) or film[1] for label, film in zip(rows["label"].to_pylist(), films)]
        label_ids = [part[0] for part in parts]
        texts = {key: pa.array([part[i + 1] for part in parts], pa.string()) for i, key in enumerate(self.PART_KEYS[:-1])}
        texts["movie"] = pa.array([film[0] for film in films], pa.string())
        texts["label_id"] = pa.array(label_ids, pa.int64()).cast(pa.string()).fill_null("null")
        # A labelled frame's source and confidence are its own (its part's source is None).
        sources = _json_strings(rows["label_source"]).to_pylist()
        texts["label_source"] = pa.array([source if part[-1] is None else part[-1] for source, part in zip(sources, parts)],
                                         pa.string())
        confidences = iter(_float_texts([float(confidence) for confidence, label_id in
                                         zip(rows["label_confidence"].to_pylist(), label_ids) if label_id is not None]))
        texts["label_confidence"] = pa.array([next(confidences) if label_id is not None else "null"
                                              for label_id in label_ids], pa.string())
        texts["timestamp"] = pa.array(_float_texts([round(float(t), 3) for t in rows["timestamp"].to_pylist()]),
                                      pa.string())
        texts["frame_id"] = _json_strings(rows["frame_id"])
        texts["boxes"] = _boxes_texts(rows["boxes"])
        for key in ("width", "height"):
            texts[key] = rows[key].cast(pa.int64()).cast(pa.string())  # int's repr
        pieces = [piece for i, key in enumerate(self.KEYS) for piece in (("{" if i == 0 else ", ") + f'"{key}": ', texts[key])]
        return pc.binary_join_element_wise(*pieces, "}", "").cast(pa.binary()).to_pylist(), label_ids

    def _label(self, name: str | None) -> tuple | None:
        """A label's part: (label_id, then PART_KEYS' texts, its label_source None: the frame's own);
        None for no label or an unknown name."""
        if name not in self.labels:
            label = self.taxonomy.by_name(name) if name is not None else None
            self.labels[name] = self._part(label_fields(label, "", 0.0), own_source=True) if label else None
        return self.labels[name]

    def _film(self, movie: str) -> tuple:
        """A film's json text, and the part of its unlabelled frames: all null, or its era /
        nationality (movie metadata) with label_source "movie"."""
        if movie not in self.films:
            fields, film = label_fields(None), self.movie_metadata.get(movie) or {}
            if film.get("era") or film.get("nationality"):
                fields.update(era=film.get("era"), nationality=film.get("nationality"), label_source="movie")
            self.films[movie] = (encode_json(movie).decode(), self._part(fields))
        return self.films[movie]

    def _part(self, fields: dict, own_source: bool = False) -> tuple:
        return (fields["label_id"], *(encode_json(fields[key]).decode() for key in self.PART_KEYS[:-1]),
                None if own_source else encode_json(fields["label_source"]).decode())


def _json_strings(strings: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Strings (null: null) as json writes them: in quotes, in Arrow where every one is printable
    ASCII without a quote or backslash, else escaped one by one."""
    strings = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    if pc.all(pc.match_substring_regex(strings, r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$")).as_py() is not False:
        return pc.fill_null(pc.binary_join_element_wise('"', strings, '"', ""), "null")
    return pa.array([encode_json(value).decode() for value in strings.to_pylist()], pa.string())


def _float_texts(values: list[float]) -> list[str]:
    """Floats as json writes them (repr; NaN and Infinity as json's own, not repr's)."""
    if all(map(math.isfinite, values)):
        return list(map(float.__repr__, values))
    return [encode_json(value).decode() for value in values]


def _boxes_texts(boxes: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Each row's boxes (a list of lists of floats; null: none) as json writes them, rounded to
    BOX_DECIMALS: joined in Arrow."""
    boxes = boxes.combine_chunks() if isinstance(boxes, pa.ChunkedArray) else boxes
    flat = pc.list_flatten(boxes)
    values = pc.list_flatten(flat)
    texts = _rounded_texts(values)
    if texts is None:  # a value rounding does not make plain: one at a time
        texts = pa.array(_float_texts([round(float(v), BOX_DECIMALS) for v in values.to_pylist()]), pa.string())
    return _json_lists(_json_lists(texts, flat), boxes)


def _json_lists(items: pa.Array, lists: pa.Array) -> pa.Array:
    """The json texts `items`, grouped as `lists` groups its values (a null list: none), each group
    joined as json writes a list."""
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy()
    grouped = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32()), items)
    return pc.binary_join_element_wise("[", pc.fill_null(pc.binary_join(grouped, ", "), ""), "]", "")


_DECIMALS = 10 ** BOX_DECIMALS


def _rounded_texts(values: pa.Array) -> pa.Array | None:
    """repr(round(v, BOX_DECIMALS)) of float32 values, made in Arrow; None when they are not float32,
    or one is not finite or 10**9 or more. A float32 times 10**5 is exact in a float64, so rint of it
    is round's integer k (half to even), and the repr of k / 10**5 its digits: 0.00123 (or 1e-05
    under 10**-4, as repr writes it)."""
    if values.type != pa.float32():
        return None
    scaled = values.to_numpy(zero_copy_only=False).astype(np.float64) * _DECIMALS
    if not (np.isfinite(scaled).all() and (np.abs(scaled) < 1e9 * _DECIMALS).all()):
        return None
    k = np.rint(scaled)
    digits = pa.array(np.abs(k).astype(np.int64)).cast(pa.string())
    padded = pc.utf8_lpad(digits, BOX_DECIMALS + 1, "0")
    fraction = pc.utf8_rtrim(pc.utf8_slice_codeunits(padded, -BOX_DECIMALS), characters="0")
    fraction = pc.if_else(pc.equal(fraction, ""), "0", fraction)
    sign = pc.if_else(pa.array(np.signbit(k)), "-", "")
    positional = pc.binary_join_element_wise(sign, pc.utf8_slice_codeunits(padded, 0, -BOX_DECIMALS), ".", fraction, "")
    exponent = pc.binary_join_element_wise(sign, digits, f"e-{BOX_DECIMALS:02d}", "")
    return pc.if_else(pa.array((np.abs(k) > 0) & (np.abs(k) < 10)), exponent, positional)


def _size(path: str) -> int | None:
    """A member file's size; None when it cannot be stat'ed (its tar then fails, naming it)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return None


# What writes a member's file again when it is missing or unreadable.
_REMEDY = {JPG: "re-extract its film (`mhmd extract --redo`)",
           MASK: "write it again (`mhmd detect --masks` or `mhmd parsing attach`)"}


READ_BYTES = 1 << 18  # a frame's JPEG (about 60 KB) in one read, when its size is not known
WRITE_BATCH = 1024  # samples made and written at once (their files' bytes held: ~60 MB of 60 KB JPEGs)


def _read_member(member: str, path: str, size: int | None = None) -> bytes:
    """A member file's bytes; PartitionError naming the file when it is missing or unreadable.
    os.read: open() adds an ioctl, two fstats and a seek to each file, which cost as much as the read
    of a small one. Of a file whose size was recorded, a first read of a byte more: `size` bytes
    back is its end (one read, not two); a file that grew or shrank since is read to its end."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, READ_BYTES if size is None else size + 1)
            if len(data) == size:
                return data
            chunks = [data]
            while chunks[-1]:
                chunks.append(os.read(fd, READ_BYTES))
        finally:
            os.close(fd)
        return b"".join(chunks)
    except OSError as error:
        reason = "missing" if isinstance(error, FileNotFoundError) else f"unreadable ({error.strerror or error})"
        raise PartitionError(f"{path}: {reason}: {_REMEDY[member]}") from None


def _check_written(path: str, data: bytes, size: int, digest: str) -> None:
    """PartitionError naming the JPEG when its bytes are not those extract wrote (its size and XXH3,
    recorded then): a file cut short or overwritten since would go into the tar unnoticed."""
    if len(data) != size:
        change = f"{len(data)} bytes, {size} when extracted"
    elif xxhash.xxh3_64_hexdigest(data) != digest:
        change = "its bytes differ from those extracted (XXH3)"
    else:
        return
    raise PartitionError(f"{path}: damaged since it was extracted ({change}): {_REMEDY[JPG]}")


@dataclass
class ShardStage:
    """Writes one tar per partition into `out` (a folder or an object store's URL) and records which
    frames went into it."""

    workdir: WorkDir
    out: Path | str
    taxonomy: Taxonomy
    movie_metadata: dict[str, dict] = field(default_factory=dict)  # movie_id -> {"era", "nationality"}
    name: str = STAGE
    # Forked writers: plain file work with what the parent imported, no threads or CUDA; a spawned
    # writer would spend a second or two importing.
    resources: Resources = field(default_factory=lambda: Resources(start_method="fork"))
    unit: str = "samples"

    def setup(self) -> None:
        self.sample_json = SampleJson(self.taxonomy, self.movie_metadata)  # its texts kept from tar to tar

    def process(self, partition: Partition, progress) -> dict:
        started = time.monotonic()
        staging = self.workdir.begin(STAGE, partition.id)
        with pa.ipc.open_file(samples_path(self.workdir, partition.id)) as file:
            planned = file.read_all()
        name = partition.info["tar"]
        path = staging / name if is_remote(self.out) else self.out / name
        with AtomicTar(path) as tar:
            for start in range(0, planned.num_rows, WRITE_BATCH):
                tar.write_many(*self._samples(planned.slice(start, WRITE_BATCH)))
                progress(min(start + WRITE_BATCH, planned.num_rows), planned.num_rows)
        if is_remote(self.out):  # from this worker: fsspec makes its own client and IO thread after a fork
            upload_tar(path, self.out)
        count = planned.num_rows
        table = planned.select(["frame_id", "movie_id"]).append_column(
            "split", pa.array([partition.info["split"]] * count, pa.string())).append_column(
            "shard", pa.array([name] * count, pa.string()))
        summary = {"digest": partition.info["digest"], "output": str(self.out), "frames_in": count,
                   "frames_out": count, "bytes": path.stat().st_size,
                   "seconds": round(time.monotonic() - started, 3)}
        self.workdir.commit(STAGE, partition.id, table, summary)
        return summary

    def _samples(self, rows: pa.Table) -> tuple[list[str], dict[str, list]]:
        """The samples of rows (TAR_COLUMNS) as webdataset writes them, by column (`write_many`):
        their json (`SampleJson`), `cls`, and `jpg` (and `mask.png`: the parsing map, else the person
        mask) copied byte for byte, not re-encoded."""
        root = f"{self.workdir.root}{os.sep}"  # the tables' paths are relative to it
        jsons, label_ids = self.sample_json(rows)
        jpegs = []
        for jpeg, size, digest in zip(rows["jpeg"].to_pylist(), rows["jpeg_bytes"].to_pylist(),
                                      rows["jpeg_xxh3"].to_pylist()):
            path = root + jpeg
            jpegs.append(_read_member(JPG, path, size))
            if digest is not None:  # not recorded by earlier versions: not checked
                _check_written(path, jpegs[-1], size, digest)
        targets = pc.coalesce(rows["parsing"], rows["mask"]).to_pylist()  # as the plan sized them
        masks = [_read_member(MASK, root + target, size) if target else None
                 for target, size in zip(targets, rows["target_bytes"].to_pylist())]
        return rows["frame_id"].to_pylist(), {JSON: jsons, CLS: [str(class_index(i)).encode() for i in label_ids],
                                              JPG: jpegs, MASK: masks}


def _with_sizes(frames: pa.Table, root: str, json_bound: "JsonBound") -> pa.Table:
    """`frames` with `target_bytes` (the size of its mask or parsing map; null where it has none or it
    cannot be stat'ed: its tar then fails, naming it) and `sample_bytes`, its share of a tar at most:
    its members (the json at its largest: `JsonBound`) plus a 512-byte header and padding each."""
    targets = pc.coalesce(frames["parsing"], frames["mask"]).to_pylist()
    target_bytes = pa.array([_size(os.path.join(root, target)) if target else None for target in targets], pa.int64())
    jpeg_bytes = frames["jpeg_bytes"]
    if jpeg_bytes.null_count:  # not recorded by earlier versions: the file's size
        jpeg_bytes = pa.array([size if size is not None else _size(os.path.join(root, jpeg))
                               for size, jpeg in zip(jpeg_bytes.to_pylist(), frames["jpeg"].to_pylist())], pa.int64())
    with_target = pc.is_valid(target_bytes).to_numpy(zero_copy_only=False)
    sample = (json_bound(frames) + 1024) + (pc.fill_null(jpeg_bytes, 0).to_numpy() + 1024) + (8 + 1024) \
        + np.where(with_target, pc.fill_null(target_bytes, 0).to_numpy() + 1024, 0)  # 8: `cls`, a few digits
    return frames.append_column("target_bytes", target_bytes).append_column("sample_bytes", pa.array(sample))


class JsonBound:
    """The largest a sample's json (`SampleJson`) can be, per frame, from its row's
    string lengths and box count: the plan cuts tars by size without making the json, which the
    writers make. A string's character is at most 6 bytes escaped (`\\u00XX`, or 12 for 4 UTF-8 bytes);
    a float's repr at most 24 characters ("-1.2345678901234567e-308"), an int32's 11."""

    FLOAT, INT, NULL = 24, 11, 4
    BOX = 4 * FLOAT + 3 * 2 + 2 + 2  # "[a, b, c, d]" and the ", " before the next

    def __init__(self, taxonomy: Taxonomy, movie_metadata: dict[str, dict]):
        def longest(values) -> int:
            return max([self.NULL, *(len(json.dumps(value)) for value in values if value is not None)])

        labels, films = taxonomy.labels, movie_metadata.values()
        skeleton = {key: 0 for key in ("frame_id", "movie", "timestamp", "width", "height", "boxes",
                                       *label_fields(None))}
        self.fixed = (len(json.dumps(skeleton)) - len(skeleton)  # every value's place, taken by one "0"
                      + 2 * self.FLOAT + 2 * self.INT + 2 + longest(label.id for label in labels)
                      + longest(label.name for label in labels) + longest(label.garment for label in labels)
                      + longest([*(label.era for label in labels), *(film.get("era") for film in films)])
                      + longest([*(label.nationality for label in labels), *(film.get("nationality") for film in films)])
                      + len(json.dumps("movie")))  # label_source when not the row's own: "movie" or null

    def __call__(self, frames: pa.Table) -> np.ndarray:
        """Per frame: the fixed part, its strings escaped at their longest in quotes, its boxes."""
        strings = sum(pc.fill_null(pc.binary_length(frames[name]), 0).to_numpy() * 6 + 2
                      for name in ("frame_id", "movie_id", "label_source"))
        boxes = pc.fill_null(pc.list_value_length(frames["boxes"]), 0).to_numpy()
        return self.fixed + strings + boxes * self.BOX


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
                with _naming(kept.buckets[b]):  # Arrow's errors name no file
                    if b not in writers:
                        writers[b] = pa.ipc.new_stream(kept.buckets[b], SPILL_SCHEMA, options=SPILL_OPTIONS)
                    writers[b].write_table(rows.filter(bucket == b))
    finally:
        for b, writer in writers.items():
            with _naming(kept.buckets[b]):
                writer.close()
    kept.buckets = [path for b, path in enumerate(kept.buckets) if b in writers]
    kept.groups = duplicate_groups(prints)
    return kept


@contextmanager
def _naming(path: Path):
    """A full, read-only or forbidden file system met while writing `path` as the one-line
    StorageError naming it (Arrow's OSError names no file)."""
    try:
        yield
    except OSError as error:
        raise storage_error(error, path) or error


def _bucket_bits(workdir: WorkDir) -> int:
    """log2 of the number of buckets: enough for SHUFFLE_BUCKET_ROWS frames each, from the frames
    extract kept (its done markers' counts: more than shard keeps after detection, never fewer), up
    to MAX_BUCKET_BITS (past 64 M frames, the buckets grow instead)."""
    frames = sum(int(summary.get("frames_out", 0)) for summary in workdir.done(EXTRACT).values())
    return min(MAX_BUCKET_BITS, max(0, math.ceil(math.log2(max(1, frames) / SHUFFLE_BUCKET_ROWS))))


def _spill_rows(rows: pa.Table, seed: int) -> pa.Table:
    """One movie's frames to shard as SPILL_SCHEMA (columns of stages not run yet are null)."""
    columns = [rows[name] if name in rows.column_names else pa.nulls(rows.num_rows) for name in SAMPLE_COLUMNS]
    columns.append(pa.array(shuffle_keys(rows["frame_id"].to_pylist(), seed), pa.uint64()))
    return pa.table(columns, names=[*SAMPLE_COLUMNS, "key"]).cast(SPILL_SCHEMA)


def _shuffled_bucket(path: Path) -> pa.Table:
    """A bucket's frames in shuffle-key order."""
    with pa.ipc.open_stream(path) as reader:
        frames = reader.read_all()
    return frames.take(pc.sort_indices(frames, sort_keys=[("key", "ascending"), ("frame_id", "ascending")]))


def samples_path(workdir: WorkDir, partition: str) -> Path:
    """W/shard/samples/<tar>.arrow: the rows of the frames a tar holds (TAR_COLUMNS, an Arrow IPC file),
    as planned; its writer makes the samples from them, so that no process holds every sample."""
    return workdir.stage_dir(STAGE) / "samples" / f"{partition}.arrow"


@dataclass
class _SplitTars:
    """A split's tars as the plan cuts them: the tars made, and the rows, sample count and bytes of
    the one being filled."""

    name: str
    made: list[Partition] = field(default_factory=list)
    rows: list[pa.Table] = field(default_factory=list)
    count: int = 0
    size: int = 0


def plan_tars(kept: KeptFrames, split: dict[str, str], workdir: WorkDir, out: Path | str, settings: ShardSettings,
              taxonomy: Taxonomy, movie_metadata: dict[str, dict] | None = None) -> list[Partition]:
    """Consecutive tars per split (`split`: movie_id -> split), its frames in the order of their shuffle
    keys, bucket after bucket (each read once for both splits): a new tar when the last holds
    `maxcount` samples or would pass `maxsize` bytes (`_with_sizes`). Each tar's rows go to its samples
    file (`samples_path`) as soon as it is full; the partition says where, its split, sample count and
    digest (of its rows, OUT, the taxonomy and the films' metadata). Train's tars come first."""
    folder = samples_path(workdir, "").parent
    shutil.rmtree(folder, ignore_errors=True)  # rewritten whole by every plan
    folder.mkdir(parents=True)
    metadata = movie_metadata or {}
    bound, root = JsonBound(taxonomy, metadata), str(workdir.root)
    # What the writers make the samples' json with besides the rows: a tar made with others is redone.
    made_with = [taxonomy.sha256, {movie: metadata[movie] for movie in sorted(metadata) if movie in split}]
    movies = {name: pa.array(sorted(movie for movie, s in split.items() if s == name), pa.string()) for name in SPLITS}
    tars = [_SplitTars(name) for name in SPLITS]

    def finish(tar: _SplitTars) -> None:
        name = tar_name(tar.name, len(tar.made))
        tar.made.append(_planned_tar(workdir, out, name, tar.name, tar.rows, made_with))
        tar.rows, tar.count, tar.size = [], 0, 0

    for _, bucket in prefetched(kept.buckets, _shuffled_bucket, threads=1, ahead=1):  # the next read and sorted meanwhile
        for tar in tars:
            frames = _with_sizes(bucket.filter(pc.is_in(bucket["movie_id"], value_set=movies[tar.name])), root, bound)
            start = 0
            for i, sample in enumerate(frames["sample_bytes"].to_pylist()):
                if tar.count and (tar.count >= settings.maxcount or tar.size + sample > settings.maxsize):
                    tar.rows.append(frames.slice(start, i - start))
                    finish(tar)
                    start = i
                tar.count, tar.size = tar.count + 1, tar.size + sample
            tar.rows.append(frames.slice(start))
    for tar in tars:
        if tar.count:
            finish(tar)
    return [partition for tar in tars for partition in tar.made]


def _planned_tar(workdir: WorkDir, out: Path | str, name: str, split: str, rows: list[pa.Table],
                 made_with: list) -> Partition:
    """The partition of the tar `name`, its rows (TAR_COLUMNS) written to its samples file; its digest
    is of OUT, `made_with` and the rows' values (`values_digest`)."""
    table = pa.concat_tables(rows).select(TAR_COLUMNS)
    pid = Path(name).stem
    path = samples_path(workdir, pid)
    # Not synced: every plan writes them again before a writer reads them.
    with _naming(path), pa.ipc.new_file(path, table.schema) as file:
        file.write_table(table)
    return Partition(pid, {"split": split, "tar": name, "count": table.num_rows,
                           "digest": values_digest(table, [str(out), *made_with])},
                     record={"split": split, "samples": table.num_rows})


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

    planned, done = {p.id for p in partitions}, workdir.done(STAGE)
    for stale in (set(done) | set(workdir.failed(STAGE)) | set(workdir.planned(STAGE))) - planned:
        workdir.drop(STAGE, stale)  # tars of an earlier, larger plan
    sizes = folder_sizes(out)
    current = {p.id for p in partitions if _up_to_date(p, done.get(p.id), sizes)}
    todo = [p for p in partitions if p.id not in current]
    clear_shard_dir(out, keep={p.info["tar"] for p in partitions if p.id in current})
    for p in partitions:
        workdir.plan(STAGE, p.id, {"split": p.info["split"], "samples": p.info["count"], "digest": p.info["digest"]})
    gc.freeze()  # a forked writer's collections then never touch, and copy, the pages of this heap
    try:
        stage = ShardStage(workdir, out, taxonomy, movie_metadata or {})
        failures = [r for r in (runner or LocalRunner()).run(stage, todo) if not r.ok]
    finally:
        gc.unfreeze()
    if failures:
        raise InputError(f"{out}: {len(failures)} tars could not be written; first: {failures[0].id}: "
                         f"{failures[0].reason}")
    index = make_index(asdict(settings), taxonomy.sha256,
                       [(p.info["tar"], p.info["split"], p.info["count"]) for p in partitions], splits, kept.groups)
    write_index(out, index)
    return index
