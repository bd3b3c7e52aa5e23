"""The work directory: per-stage, per-partition tables written atomically, with done markers.

Layout (one folder per stage, one partition per movie for the frame stages):

    WORKDIR/<stage>/plan/<partition>.json     what the stage was asked to do (written before it runs)
    WORKDIR/<stage>/parts/<partition>.parquet one row per frame the stage saw, kept or not
    WORKDIR/<stage>/parts/<partition>.done    json summary; its presence marks the partition done
    WORKDIR/<stage>/parts/<partition>.failed  json with a one-line reason
    WORKDIR/<stage>/tmp/                      staging area, wiped when a partition restarts
    WORKDIR/frames/<movie_id>/<frame_id>.jpg  the extracted frames

A partition's outputs are written under temporary names, renamed into place, and only then marked
done: the done marker is the commit point, so a killed run never leaves a half-done partition that
looks finished.
"""
from __future__ import annotations

import fcntl
import functools
import glob
import inspect
import json
import os
import shutil
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DamagedFileError, MhmdError

if TYPE_CHECKING:  # pandas costs a second to import: only the stages that read tables need it
    import pandas as pd


_changes = 0  # tables this process wrote or partitions it restarted, in any work directory


def changes() -> int:
    """How many tables this process wrote and partitions it restarted: a cache of what the work
    directory's tables hold (the manifest) is keyed by it as well as by the files' stat, whose
    times are only as fine as the kernel's clock tick."""
    return _changes


def _changed() -> None:
    global _changes
    _changes += 1


def _temporary_prefix(path: Path) -> str:
    """The name of `path`'s temporary siblings, less the writer's process id that ends it."""
    return f".{path.name}.tmp"


def _remove_killed_writes(path: Path) -> None:
    """Remove the temporary siblings a write of `path` killed before its rename left (SIGKILL: no
    cleanup ran). Only where no other process can be writing `path` now."""
    for left in path.parent.glob(f"{glob.escape(_temporary_prefix(path))}*"):
        left.unlink(missing_ok=True)


@contextmanager
def _temporary_sibling(path: Path) -> Iterator[Path]:
    """A hidden temporary name beside `path`, renamed to it when the block succeeds and removed when
    it fails (a full disk, Ctrl-C): readers never see a partial file, and nothing is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_temporary_prefix(path)}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename in (None, str(tmp)):  # name the file the user knows
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temporary sibling, flushed to the disk (unless not `durable`: a file that a crash
    may lose or leave empty), and rename."""
    with _temporary_sibling(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def json_bytes(obj: Any) -> bytes:
    """A json file's bytes as every record and index of this package is written."""
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write_bytes(path, json_bytes(obj), durable)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    _changed()
    with _temporary_sibling(path) as tmp:
        pq.write_table(table, tmp)


@contextmanager
def atomic_table_writer(path: Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """`atomic_write_table` a piece at a time (each `write_table` a row group or more), so that a
    writer of a whole-dataset table never holds all of it: renamed into place when the block succeeds."""
    _changed()
    with _temporary_sibling(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        yield writer


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _record(path: Path) -> dict | None:
    """A marker's or plan's json object; None when it is not one (garbage, cut short) or is gone."""
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _damage(error: Exception) -> str:
    """What a failed read of a partition table says about the file."""
    if isinstance(error, FileNotFoundError):
        return "missing"
    if isinstance(error, OSError):
        return f"unreadable ({error.strerror or error})"
    return "damaged (cut short or not a Parquet file)"


def _table_problem(path: Path) -> str | None:
    """Why a partition table cannot be read, or None when it can. Reads only the footer: cheap
    enough to ask of every done partition."""
    try:
        pq.read_metadata(path)
    except (pa.ArrowException, OSError) as error:
        return _damage(error)
    return None


# The command that runs a stage, where it is not `mhmd <stage>`.
_COMMANDS = {"label": "labeler predict"}


def _redo(stage: str, path: Path, problem: str) -> DamagedFileError:
    """The error naming a damaged file of a stage and the command that redoes its partition."""
    return DamagedFileError(f"{path}: {problem}: run `mhmd {_COMMANDS.get(stage, stage)}` again to redo it")


LOCK = ".lock"  # in a work directory or a shard folder: who writes it now (json), flock-ed while they do
_held: dict[Path, int] = {}  # folders this process holds the lock of -> how many callers hold it


class FolderBusy(MhmdError):
    """Another process writes the folder now."""


def _holder_text(lock: Path) -> str:
    try:
        h = read_json(lock)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
        return f"pid {h['pid']} on {h['host']} since {since} ({h['command']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is writing it this instant
        return "another process"


@contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """Hold FOLDER/.lock for the block, or raise FolderBusy at once naming its holder. The flock
    goes with the process however it ends (a kill -9 leaves no stale lock); the same process may take
    it again (build calls extract). Workers of a runner never take it, so their parent's lock never
    blocks them; a forked worker shares its parent's open file, which only keeps the lock held while
    that worker still writes."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield
        finally:
            _held[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    with _lock_file(folder) as f:
        f.truncate(0)
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                   "since": time.time()}, f)
        f.flush()
        _held[folder] = 1
        try:
            yield
        finally:
            del _held[folder]
            # Removed while still held, so the folder is left as it was (shard folders stay byte for
            # byte the same); the next writer then creates and locks a new file.
            (folder / LOCK).unlink(missing_ok=True)


@contextmanager
def _lock_file(folder: Path) -> Iterator:
    """FOLDER/.lock opened and flock-ed. The holder removes it when done: a lock taken on a file
    that was removed meanwhile is no lock (a third writer would create a new file), so it is
    taken again on the file that is there now."""
    path = folder / LOCK
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise FolderBusy(f"{folder}: in use by {_holder_text(path)}: wait for it to end") from None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # its holder removed it between our open and our lock: try the new one
    with f:
        yield f


def writes(*params: str) -> Callable:
    """Decorator of the plain functions that write a work directory or a shard folder: the folders
    given as the parameters `params` (a WorkDir, str or path) are locked while the function runs.
    Taken here, not in the CLI, so that Python callers are kept from interleaving too."""
    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            with ExitStack() as stack:
                for name in params:
                    value = bound[name]
                    if "://" in str(value):  # object storage has no lock: written through W, whose lock is held
                        continue
                    stack.enter_context(locked(value.root if isinstance(value, WorkDir) else value))
                return func(*args, **kwargs)
        return wrapper
    return decorate


class WorkDir:
    """Where every stage keeps its records. Cheap to construct and picklable (just a path)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"WorkDir({str(self.root)!r})"

    # -- layout -------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def parts_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "parts"

    def tmp_dir(self, stage: str, partition: str) -> Path:
        return self.stage_dir(stage) / "tmp" / partition

    def frames_dir(self, movie_id: str) -> Path:
        return self.root / "frames" / movie_id

    def table_path(self, stage: str, partition: str) -> Path:
        return self.parts_dir(stage) / f"{partition}.parquet"

    def _marker(self, stage: str, partition: str, kind: str) -> Path:
        return self.parts_dir(stage) / f"{partition}.{kind}"

    # -- plan ---------------------------------------------------------------------------------
    def plan(self, stage: str, partition: str, info: dict) -> None:
        # Not synced (a shard plan writes a thousand): one that a crash empties reads as damaged, and
        # is written again by the next plan.
        atomic_write_json(self.stage_dir(stage) / "plan" / f"{partition}.json", info, durable=False)

    def _plans(self, stage: str) -> dict[str, dict | None]:
        return {p.stem: _record(p) for p in sorted((self.stage_dir(stage) / "plan").glob("*.json"))}

    def planned(self, stage: str) -> dict[str, dict]:
        """The plans that read; a damaged one is written again when the stage plans next."""
        return {pid: plan for pid, plan in self._plans(stage).items() if plan is not None}

    # -- partition state ----------------------------------------------------------------------
    def is_done(self, stage: str, partition: str) -> bool:
        """Whether one partition is done by the rules of `done`: its marker reads and so does its
        table's footer."""
        return self.done_record(stage, partition) is not None

    def done_record(self, stage: str, partition: str) -> dict | None:
        """One partition's done marker if it is done by the rules of `done`, else None."""
        record = _record(self._marker(stage, partition, "done"))
        return record if record is not None and _table_problem(self.table_path(stage, partition)) is None else None

    def _markers(self, stage: str, kind: str) -> dict[str, dict | None]:
        """Every `kind` marker of a stage: its json object, or None when it is damaged."""
        return {p.name[: -len(kind) - 1]: _record(p) for p in sorted(self.parts_dir(stage).glob(f"*.{kind}"))}

    def _committed(self, stage: str) -> dict[str, dict]:
        """Partitions whose done marker reads, whatever the state of their table."""
        return {pid: record for pid, record in self._markers(stage, "done").items() if record is not None}

    def done(self, stage: str) -> dict[str, dict]:
        """Done partitions: a done marker that reads and a table whose footer reads. Anything less
        counts as not done, so the stage's next run redoes it (`damaged` names it)."""
        return {pid: record for pid, record in self._committed(stage).items()
                if _table_problem(self.table_path(stage, pid)) is None}

    def failed(self, stage: str) -> dict[str, dict]:
        """Failed partitions whose record reads; a damaged record leaves its partition pending."""
        return {pid: record for pid, record in self._markers(stage, "failed").items() if record is not None}

    def damaged(self, stage: str) -> list[str]:
        """One line per record or table of the stage that cannot be read; the stage's next run
        redoes the partition (or plans it again)."""
        records = [self._marker(stage, pid, kind) for kind in ("done", "failed")
                   for pid, record in self._markers(stage, kind).items() if record is None]
        records += [self.stage_dir(stage) / "plan" / f"{pid}.json"
                    for pid, plan in self._plans(stage).items() if plan is None]
        tables = [self.table_path(stage, pid) for pid in self._committed(stage)]
        return [f"damaged record {path}: redone on the next run" for path in records] + [
            f"{path}: {problem}: redone on the next run" for path in tables if (problem := _table_problem(path))]

    def begin(self, stage: str, partition: str) -> Path:
        """Start (or restart) a partition: drop what an earlier attempt left behind. The done
        marker goes first, so a redo that is killed leaves the partition pending, not stale."""
        _changed()
        for path in (self._marker(stage, partition, "done"), self._marker(stage, partition, "failed"),
                     self.table_path(stage, partition)):
            path.unlink(missing_ok=True)
            _remove_killed_writes(path)
        tmp = self.tmp_dir(stage, partition)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def drop(self, stage: str, partition: str) -> None:
        """Forget a partition that is no longer planned: its records, staging folder and plan."""
        self.begin(stage, partition)
        shutil.rmtree(self.tmp_dir(stage, partition), ignore_errors=True)
        (self.stage_dir(stage) / "plan" / f"{partition}.json").unlink(missing_ok=True)

    def commit(self, stage: str, partition: str, table: pa.Table, summary: dict) -> None:
        """Publish a partition's table, then mark it done (the commit point)."""
        atomic_write_table(self.table_path(stage, partition), table)
        atomic_write_json(self._marker(stage, partition, "done"), summary)
        shutil.rmtree(self.tmp_dir(stage, partition), ignore_errors=True)

    def mark_failed(self, stage: str, partition: str, info: dict) -> None:
        # The staging folder goes first: on a full disk, that frees the room the record needs.
        shutil.rmtree(self.tmp_dir(stage, partition), ignore_errors=True)
        atomic_write_json(self._marker(stage, partition, "failed"), info)

    # -- progress of running partitions (for `mhmd status` while a run goes on) ------------------
    def _progress_path(self, stage: str, partition: str) -> Path:
        return self.stage_dir(stage) / "progress" / f"{partition}.json"

    def write_progress(self, stage: str, partition: str, done: float, total: float) -> None:
        # Not synced: a report a crash loses only says less about a run that is over.
        atomic_write_json(self._progress_path(stage, partition), {"done": done, "total": total, "at": time.time()},
                          durable=False)

    def clear_progress(self, stage: str, partition: str) -> None:
        self._progress_path(stage, partition).unlink(missing_ok=True)

    def progress(self, stage: str) -> dict[str, dict]:
        """Partitions reported running: {"done", "total"} in the stage's own units, "at" (epoch
        seconds). A run killed mid-partition leaves its last report: `at` tells how old it is."""
        reports = {path.stem: _record(path) for path in sorted((self.stage_dir(stage) / "progress").glob("*.json"))}
        return {pid: report for pid, report in reports.items() if report is not None}  # None: removed while read

    # -- reading ------------------------------------------------------------------------------
    def read_table(self, stage: str, damaged: list[str] | None = None) -> pd.DataFrame | None:
        """All done partitions of a stage as one frame, or None when the stage has none. A partition
        whose done marker or table does not read raises DamagedFileError naming the file and the
        command that redoes it: leaving it out would drop its rows unnoticed. Given a list
        `damaged`, such a partition is left out and the error's message added to the list instead."""
        table = self.read_arrow(stage, damaged)
        return table.to_pandas() if table is not None else None

    def read_arrow(self, stage: str, damaged: list[str] | None = None,
                   columns: list[str] | None = None) -> pa.Table | None:
        """`read_table` as one Arrow table, of `columns` only (those a partition has; the others
        are null in its rows) when given: a whole-dataset reader reads no column it does not use."""
        tables = [self.read_partition(stage, pid, damaged, columns) for pid in self.marked_done(stage)]
        tables = [table for table in tables if table is not None]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def marked_done(self, stage: str) -> list[str]:
        """Every partition with a done marker, whether it reads or not, in the order of the markers' names."""
        return [path.name[: -len(".done")] for path in sorted(self.parts_dir(stage).glob("*.done"))]

    def read_partition(self, stage: str, partition: str, damaged: list[str] | None = None,
                       columns: list[str] | None = None) -> pa.Table | None:
        """One partition's table (`columns` of it that it has); None when it has no done marker.
        When its marker or table does not read: DamagedFileError naming the file, or, given a list
        `damaged`, that line appended to it and None."""
        marker = self._marker(stage, partition, "done")
        if not marker.exists():
            return None
        error = None
        if _record(marker) is None:
            error = _redo(stage, marker, "damaged record (not a json object)")
        else:
            path = self.table_path(stage, partition)
            try:
                with pq.ParquetFile(path) as file:
                    return file.read(None if columns is None else [c for c in columns if c in file.schema_arrow.names])
            except (pa.ArrowException, OSError) as problem:
                error = _redo(stage, path, _damage(problem))
        if damaged is None:
            raise error
        damaged.append(str(error))
        return None
