"""The shard format: what `mhmd shard` writes, `mhmd relabel` rewrites, and HistoryNet and the report read.

A shard folder holds the tars `train-000000.tar`, `test-000000.tar`, ... (`{split}-{n:06d}.tar`), a
wids shard index per split with tars (`train.wids.json`, ...: `wids.ShardListDataset` reads it) and
`index.json`, written last. A tar holds samples; a sample's members are `__key__` (the frame id, with
no dot: webdataset splits a member's name into key and member at the first dot), `jpg` (the frame's
JPEG), `json` (its metadata and label fields), `cls` (the label id; `UNLABELLED`, -1, for a frame
without a label) and `mask.png` (a parsing map or person mask, when there is one).

`cls` is in every sample, so every sample of a partly labelled build has the same members: Hugging
Face `datasets` refuses tars whose samples differ in members, and webdataset's `.to_tuple("jpg",
"cls")` fails on a sample without one. -1 is the usual "no class" (torchvision's STL10 unlabelled
split, scikit-learn's semi-supervised estimators): never a class index, and an integer like the
labels, so every reader decodes it to the same type. Tars written before had no `cls` for an
unlabelled frame: `sample_label` reads both.

- writing: `AtomicTar` (the bytes of webdataset's TarWriter with fixed metadata, so the same samples
  give the same bytes, under a temporary name until complete; its headers made from one of
  tarfile's, `member_headers`, since tarfile's own building was most of a tar's time),
  `sample_members` / `with_json` (a sample as a tar holds it), `encode_json`, `label_fields`,
  `clear_shard_dir`;
- object storage (`s3://bucket/prefix`, through fsspec): `shard_output`, `is_remote`, `upload_tar`,
  `folder_sizes`; `clear_shard_dir` and `write_index` take a URL too;
- reading: `open_shard`, `shard_urls` (the tars of a folder, pattern or list), `sample_label`;
- indexes: `INDEX`, `read_index` / `write_index` (the wids indexes too: `wids_index`), `make_index`
  and its parts, the lookups that HistoryNet and the CLI make in an index.

webdataset imports torch (seconds): it is imported here only when a tar is read, so that reading an
index, or writing tars, stays fast (`load_webdataset`).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tarfile
from collections import Counter
from itertools import chain, repeat
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import InputError, MhmdError, first_line
from .taxonomy import Label
from .workdir import LOCK, atomic_write_json, json_bytes, read_json

SPLITS = ("train", "test")
KEY, JPG, JSON, CLS, MASK = "__key__", "jpg", "json", "cls", "mask.png"
UNLABELLED = -1  # the `cls` of a frame without a label
BOX_DECIMALS = 5  # a sample's person boxes (normalised) are rounded to this many decimals
TAR = ".tar"
INDEX = "index.json"
RELABEL_RECORDS = ".relabel"  # `mhmd relabel`'s records in the new shard folder until its index is written
SHARD_NAME = re.compile(rf"^({'|'.join(SPLITS)})-\d{{6}}\.tar$")
WIDS_NAME = re.compile(rf"^({'|'.join(SPLITS)})\.wids\.json$")
TEMPORARY = re.compile(rf"^\.({'|'.join(SPLITS)})-\d{{6}}\.tar\.tmp$")
# Object stores publish an object only once its upload completes: a tar uploaded whole is never seen
# partial at its name. Other fsspec file systems (sftp, ftp...) give no such promise.
OBJECT_STORES = ("s3", "s3a", "gs", "gcs")


def tar_name(split: str, number: int) -> str:
    """`train-000003.tar`: the name of a split's tar number `number` (from 0)."""
    return f"{split}-{number:06d}{TAR}"


def wids_name(split: str) -> str:
    """`train.wids.json`: the name of a split's wids shard index."""
    return f"{split}.wids.json"


def tar_pattern(split: str) -> str:
    """`train-*.tar`: the glob of a split's tars in a shard folder."""
    return f"{split}-*{TAR}"


def load_webdataset():
    """The webdataset module, imported on first use (it imports torch)."""
    import webdataset

    return webdataset


# -- samples --------------------------------------------------------------------------------------
def label_fields(label: Label | None, source: str | None = None, confidence: float | None = None) -> dict:
    """The label part of a sample's json: all null for an unlabelled frame."""
    return {"label_id": label.id if label else None, "label": label.name if label else None,
            "era": label.era if label else None, "nationality": label.nationality if label else None,
            "garment": label.garment if label else None, "label_source": source if label else None,
            "label_confidence": float(confidence) if label else None}


_JSON = json.JSONEncoder(sort_keys=True)  # json.dumps(meta, sort_keys=True) without making an encoder each call


def encode_json(meta: dict) -> bytes:
    """A sample's `json` member: json.dumps(meta, sort_keys=True)."""
    return _JSON.encode(meta).encode()


def class_index(label_id: int | None) -> int:
    """A label id as `cls` holds it: UNLABELLED for none."""
    return UNLABELLED if label_id is None else label_id


def sample_members(key: str, meta: bytes, label_id: int | None, files: dict[str, bytes]) -> dict:
    """A sample as a tar holds it: `__key__`, `json` (encoded: encode_json), `cls` (class_index) and
    `files` (`jpg`, `mask.png`: bytes, written as they are)."""
    return {KEY: key, JSON: meta, CLS: str(class_index(label_id)).encode(), **files}


def with_json(sample: dict, meta: dict) -> dict:
    """A sample read from a tar, with a new json and the `cls` of its label id; every other member
    (the images) unchanged."""
    files = {k: v for k, v in sample.items() if not k.startswith("__") and k not in (JSON, CLS)}
    return sample_members(sample[KEY], encode_json(meta), meta["label_id"], files)


# -- writing --------------------------------------------------------------------------------------
# A member as webdataset's TarWriter(user="mhmd", group="mhmd", mtime=0) writes it, in GNU format (tarfile
# builds GNU headers for less than PAX ones; webdataset 1.0 takes a `format` but never hands it on).
_MEMBER = {"mode": 0o444, "uname": "mhmd", "gname": "mhmd", "mtime": 0}
_ERRORS = "surrogateescape"  # tarfile's, for names that are not valid in its encoding


def _tarfile_header(name: str, size: int) -> bytes:
    """tarfile's own GNU header(s) of a member."""
    info = tarfile.TarInfo(name)
    info.size = size
    for field, value in _MEMBER.items():
        setattr(info, field, value)
    return info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, _ERRORS)


# Members differ only in their name (bytes 0-100), size (124-136) and checksum (148-156, the sum of
# the header's bytes with those 8 taken as spaces): the header of an empty name and size, built once,
# its size field zeros and its checksum field spaces, and the sum of its bytes.
_BLANK = np.frombuffer(_tarfile_header("", 0), np.uint8).copy()
_BLANK[124:136], _BLANK[148:156] = 0, ord(" ")
_BLANK_SUM = int(_BLANK.sum())
_OCTAL_SIZES = 8 ** 11  # 8 GiB: a larger member's size is written in base 256 (tarfile's GNU extension)
_SIZE_DIGITS = 8 ** np.arange(10, -1, -1, dtype=np.uint64)  # the size field: 11 octal digits, then NUL
_CHECKSUM_DIGITS = 8 ** np.arange(5, -1, -1, dtype=np.int64)  # the checksum: 6 octal digits, NUL, space


def member_headers(names: list[str], sizes: list[int]) -> list[bytes | memoryview]:
    """The headers tarfile writes for members `names` of `sizes` bytes, made at once in numpy: _BLANK
    with each name and size filled in and its checksum made again (tarfile's own code costs more than
    the member's bytes in a tar of JPEGs); a name over 100 bytes (GNU puts it in a `././@LongLink`
    member first) or a size of 8 GiB or more is left to tarfile."""
    encoded = [name.encode(tarfile.ENCODING, _ERRORS) for name in names]
    name_fields = np.frombuffer(b"".join(name[:tarfile.LENGTH_NAME].ljust(tarfile.LENGTH_NAME, b"\0")
                                         for name in encoded), np.uint8).reshape(-1, tarfile.LENGTH_NAME)
    octal = np.minimum(np.asarray(sizes, np.uint64).reshape(-1, 1), _OCTAL_SIZES - 1)
    size_fields = (octal // _SIZE_DIGITS % 8 + ord("0")).astype(np.uint8)
    checksums = (_BLANK_SUM + name_fields.sum(axis=1, dtype=np.int64)
                 + size_fields.sum(axis=1, dtype=np.int64)).reshape(-1, 1)
    headers = np.empty((len(names), tarfile.BLOCKSIZE), np.uint8)
    headers[:] = _BLANK
    headers[:, :tarfile.LENGTH_NAME], headers[:, 124:135] = name_fields, size_fields
    headers[:, 148:154] = checksums // _CHECKSUM_DIGITS % 8 + ord("0")
    headers[:, 154] = 0
    made = memoryview(headers.tobytes())
    block = tarfile.BLOCKSIZE
    if max(map(len, encoded), default=0) <= tarfile.LENGTH_NAME and max(sizes, default=0) < _OCTAL_SIZES:
        return [made[start:start + block] for start in range(0, len(made), block)]
    return [_tarfile_header(name, size) if len(raw) > tarfile.LENGTH_NAME or size >= _OCTAL_SIZES
            else made[i * block:(i + 1) * block] for i, (name, raw, size) in enumerate(zip(names, encoded, sizes))]


_ZEROS = bytes(tarfile.BLOCKSIZE)  # a member's padding is a slice of it


class AtomicTar:
    """One tar written under a hidden temporary name and renamed on a clean exit (removed on an
    error): no partial tar is ever visible under its final name. Its bytes are those webdataset's
    TarWriter writes (fixed owner and times: the same samples give the same bytes), headers built
    by `member_headers` (tests/test_shards.py compares the two byte for byte)."""

    def __init__(self, path: Path):
        self.path, self.temp = path, path.with_name(f".{path.name}.tmp")
        self.file = open(self.temp, "wb", buffering=1 << 20)

    def write(self, sample: dict) -> None:
        """Write a sample (sample_members) as TarWriter does: its members in sorted order, named
        `<key>.<member>`, those starting with "_" left out."""
        self.write_many([sample[KEY]], {member: [sample[member]] for member in sample if member[0] != "_"})

    def write_many(self, keys: list[str], members: dict[str, list]) -> None:
        """Write samples given by column: member name -> each sample's bytes (None: the sample has
        no such member); as `write` writes them one by one, their headers made at once. A key with
        a dot is refused, since it would be read back as another key and member."""
        dotted = next((key for key in keys if "." in key), None)
        if dotted is not None:
            raise InputError(f"{self.path}: sample key {dotted!r} holds a dot: a key must be a plain frame id")
        present = [(member, column) for member, column in sorted(members.items()) if any(v is not None for v in column)]
        # Sample by sample, each one's members in order.
        names = list(chain.from_iterable(zip(*([f"{key}.{member}" for key in keys] for member, _ in present))))
        data = list(chain.from_iterable(zip(*(column for _, column in present))))
        if None in data:  # a member only some samples have
            names, data = [name for name, value in zip(names, data) if value is not None], [v for v in data if v is not None]
        if not all(map(isinstance, data, repeat((bytes, bytearray)))):
            name, member = next((n, m) for n, m in zip(names, data) if not isinstance(m, (bytes, bytearray)))
            raise TypeError(f"{name}: a member is bytes, not {type(member).__name__}")
        headers = member_headers(names, [len(member) for member in data])
        padding = [_ZEROS[:-len(member) % tarfile.BLOCKSIZE] for member in data]
        self.file.writelines(chain.from_iterable(zip(headers, data, padding)))

    def __enter__(self) -> "AtomicTar":
        return self

    def __exit__(self, error_type, *_) -> None:
        self.close(keep=error_type is None)

    def close(self, keep: bool = True) -> None:
        """Two zero blocks end the tar, and zeros fill its last record, as tarfile closes one."""
        end = self.file.tell() + 2 * tarfile.BLOCKSIZE
        self.file.write(bytes(2 * tarfile.BLOCKSIZE - end % -tarfile.RECORDSIZE))
        self.file.close()
        if keep:
            os.replace(self.temp, self.path)
        else:
            self.temp.unlink(missing_ok=True)


def clear_shard_dir(out: Path | str, keep: set[str] = frozenset()) -> None:
    """Remove an earlier shard set from OUT (a folder or a URL), except the tars named in `keep`;
    refuse to touch one that holds anything else. The index goes first: a folder being rewritten
    never has one."""
    if is_remote(out):
        _clear_remote(out, keep)
        return
    out.mkdir(parents=True, exist_ok=True)
    _refuse_others(out, [p.name for p in out.iterdir()])
    (out / INDEX).unlink(missing_ok=True)
    for path in out.iterdir():
        if path.is_dir():  # the records of a relabel that was stopped
            shutil.rmtree(path)
        elif path.name not in keep | {LOCK}:  # the lock of the command writing OUT now
            path.unlink()


def _refuse_others(out: Path | str, names: list[str]) -> None:
    others = sorted(name for name in names
                    if not (SHARD_NAME.match(name) or WIDS_NAME.match(name) or TEMPORARY.match(name)
                            or name in (INDEX, RELABEL_RECORDS, LOCK)))
    if others:
        raise InputError(f"{out}: holds files that are not shards ({', '.join(others[:3])}...): "
                         "give an empty or new folder")


def _clear_remote(url: str, keep: set[str]) -> None:
    fs, root = remote_fs(url)
    held = folder_sizes(url)
    _refuse_others(url, list(held))
    if INDEX in held:
        fs.rm_file(f"{root}/{INDEX}")
    stale = [f"{root}/{name}" for name in held if name not in keep | {INDEX}]
    if stale:
        fs.rm(stale)


# -- object storage -------------------------------------------------------------------------------
def is_remote(out: Path | str) -> bool:
    """Whether OUT is a URL (`s3://bucket/prefix`) rather than a local folder."""
    return "://" in str(out)


def shard_output(out: Path | str) -> Path | str:
    """OUT as the shard writers take it: a local folder resolved, or an object store's URL without a
    trailing slash; InputError for a URL of another kind of storage."""
    if not is_remote(out):
        return Path(out).resolve()
    scheme = str(out).split("://", 1)[0]
    if scheme not in OBJECT_STORES:
        raise InputError(f"{out}: shards go to a local folder or an object store ({', '.join(OBJECT_STORES)}), "
                         f"whose uploads are published whole; not to {scheme}://")
    return str(out).rstrip("/")


def remote_fs(url: str):
    """(fsspec file system, path in it) of an object store's URL; InputError naming what to install
    when its fsspec backend is missing (s3fs for s3://)."""
    import fsspec  # only for object storage (it comes with torch)

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        raise InputError(f"{url}: {first_line(error)} (for s3://: install mhmd-builder's `s3` extra, "
                         "`pip install 'mhmd-builder[s3]'`)") from None


def folder_sizes(out: Path | str) -> dict[str, int]:
    """Name -> size in bytes of what the shard folder or URL OUT holds now (nothing when it is absent)."""
    if not is_remote(out):
        return {p.name: p.stat().st_size for p in Path(out).iterdir() if p.is_file()} if Path(out).is_dir() else {}
    fs, root = remote_fs(out)
    try:
        entries = fs.ls(root, detail=True, refresh=True)  # refresh: what another process wrote counts
    except FileNotFoundError:
        return {}
    return {PurePosixPath(entry["name"]).name: entry["size"] for entry in entries}


def upload_tar(tar: Path, url: str) -> None:
    """Publish the complete local tar under URL/its name (OBJECT_STORES: seen whole or not at all)."""
    fs, root = remote_fs(url)
    fs.put_file(str(tar), f"{root}/{tar.name}")


def in_folder(out: Path | str, name: str) -> str:
    """The path or URL of the file `name` of the shard folder or URL OUT."""
    return f"{out}/{name}" if is_remote(out) else str(Path(out) / name)


# -- reading --------------------------------------------------------------------------------------
class ShardsNotFound(MhmdError, FileNotFoundError):
    """A shard pattern that names no file, or files that are missing."""


def open_shard(path: str | Path):
    """The samples of one tar, in the order they were written (member name -> bytes, `__key__`)."""
    return load_webdataset().WebDataset(str(path), shardshuffle=False)


def sample_label(sample: dict) -> int | None:
    """The label id of a raw sample (member name -> bytes); None for an unlabelled one, whether its
    `cls` says UNLABELLED or it has none (tars written before `cls` was in every sample)."""
    label = int(sample[CLS]) if CLS in sample else UNLABELLED
    return None if label == UNLABELLED else label


def shard_urls(shards: str | Path | list | tuple, split: str = "train") -> list[str]:
    """The shard files of a brace pattern (`train-{000000..000009}.tar`), a glob, a directory (its
    `{split}-*.tar`), a single file or a list of any of these. Remote URLs (`pipe:`, `s3://`...) are
    passed on unchecked; local names that match nothing raise ShardsNotFound naming the pattern."""
    from webdataset.shardlists import expand_urls  # a brace pattern as webdataset expands it

    if isinstance(shards, (list, tuple)):
        if not shards:
            raise ShardsNotFound("no shards given (an empty list)")
        return [url for item in shards for url in shard_urls(item, split)]
    pattern = str(shards)
    if pattern.startswith("pipe:") or "://" in pattern:
        return expand_urls(pattern)
    if Path(pattern).is_dir():
        pattern = str(Path(pattern) / tar_pattern(split))
    if "{" in pattern:
        urls = expand_urls(pattern)
    elif any(c in pattern for c in "*?["):  # glob syntax
        urls = sorted(glob.glob(pattern))
    else:
        urls = [pattern]
    missing = [url for url in urls if not Path(url).is_file()]
    if len(missing) == len(urls):
        raise ShardsNotFound(f"no shards match {pattern}")
    if missing:
        raise ShardsNotFound(f"{pattern}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    return urls


def split_beside(url: str, split: str) -> list[str]:
    """The tars of `split` in the folder of the local tar `url` (none for a remote one)."""
    return sorted(str(path) for path in Path(url).parent.glob(tar_pattern(split))) if Path(url).is_file() else []


# -- indexes --------------------------------------------------------------------------------------
class NoShardIndex(InputError):
    """A folder without index.json, given as a shard folder."""


def has_index(folder: str | Path) -> bool:
    return (Path(folder) / INDEX).is_file()


def require_index(folder: str | Path) -> Path:
    """FOLDER/index.json; NoShardIndex when there is none."""
    if not has_index(folder):
        raise NoShardIndex(f"{folder}: no {INDEX} (not a folder written by `mhmd shard`)")
    return Path(folder) / INDEX


def read_index(folder: str | Path) -> dict:
    return read_json(require_index(folder))


def write_index(folder: Path | str, index: dict) -> None:
    """The wids index of each split with tars, then index.json, each atomically: index.json comes last,
    so a folder (or URL) with one holds every tar it lists and their wids indexes."""
    for split in SPLITS:
        if any(entry["split"] == split for entry in index["shards"]):
            _publish_json(folder, wids_name(split), wids_index(index, split))
    _publish_json(folder, INDEX, index)


def _publish_json(folder: Path | str, name: str, obj) -> None:
    if is_remote(folder):
        fs, root = remote_fs(folder)
        fs.pipe_file(f"{root}/{name}", json_bytes(obj))  # one PUT: published whole
    else:
        atomic_write_json(folder / name, obj)


def wids_index(index: dict, split: str) -> dict:
    """A split's tars as wids' shard index lists them, in index.json's order: each tar's URL is its
    name, which wids resolves against the folder of the index file (the shard folder, wherever it is
    read from)."""
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1,
            "shardlist": [{"url": entry["name"], "nsamples": entry["count"]}
                          for entry in index["shards"] if entry["split"] == split]}


def split_entry(movies: Counter, labels: Counter) -> dict:
    """A split's line in index.json, of its samples counted per film and per label (None: unlabelled):
    samples, films, and the label histogram."""
    return {"samples": sum(movies.values()), "movies": len(movies),
            "labels": dict(sorted((label, n) for label, n in labels.items() if isinstance(label, str)))}


def make_index(settings: dict, taxonomy_sha256: str, tars: list[tuple[str, str, int]], splits: dict,
               near_duplicates: list[list[str]] = ()) -> dict:
    """index.json: the shard settings, the taxonomy's SHA-256 (labels are its ids), every tar as
    (name, split, count) in order, each split's entry (split_entry) and the groups of near-duplicate
    films (each group in one split)."""
    return {"settings": settings, "taxonomy_sha256": taxonomy_sha256,
            "shards": [{"name": name, "split": split, "count": count} for name, split, count in tars],
            "splits": splits, "near_duplicates": [list(group) for group in near_duplicates]}


def format_index(index: dict, out: str | Path) -> str:
    """Per split: samples, films and tars (the first one's path, the last one's name); the index's path."""
    lines = []
    for split, info in index["splits"].items():
        tars = [s["name"] for s in index["shards"] if s["split"] == split]
        where = f"{in_folder(out, tars[0])} .. {tars[-1]}" if tars else "no tars"
        lines.append(f"{split}: {info['samples']} samples of {info['movies']} movies in {len(tars)} tars ({where})")
    lines += [f"near-duplicate films, kept in one split: {', '.join(group)}"
              for group in index.get("near_duplicates", [])]
    return "\n".join(lines + [f"index: {in_folder(out, INDEX)}"])


def folder_indexes(urls: list[str]) -> dict[Path, dict]:
    """The index.json of every local shard folder of `urls` that has one, by its path."""
    folders = {Path(url).parent for url in urls if Path(url).is_file()}
    return {folder / INDEX: read_json(folder / INDEX) for folder in sorted(folders) if has_index(folder)}


def indexed_samples(urls: list[str], indexes: dict[Path, dict]) -> int | None:
    """How many samples the tars hold by their folders' indexes (folder_indexes); None when one of
    them is not listed."""
    total = 0
    for url in urls:
        index = indexes.get(Path(url).parent / INDEX, {})
        counts = {shard["name"]: shard["count"] for shard in index.get("shards", [])}
        if Path(url).name not in counts:
            return None
        total += counts[Path(url).name]
    return total
