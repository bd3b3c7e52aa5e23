"""The work directory seen whole: per-stage status and the manifest, one row per sampled frame.

The manifest is the one read model of the work directory: every command that needs frames of
several stages (sample, labels import, the labeler, shard, report, parsing) asks `manifest()`.
It is built from the tables alone (`tables.py`), never from a stage module, and once per state of
the work directory: asked again in the same process while no table changed, it is not rebuilt.
"""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from contextlib import closing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .batching import prefetched
from .errors import DamagedFileError
from .filter import MovieDecisions, current_counts, current_decisions, fresh_decisions, with_decisions
from .logs import progress_bar
from .tables import (DETECT, EXTRACT, EXTRACT_CHUNKS, FILTER, FUNNEL, LABEL, MANIFEST_COLUMNS, SHARD, SPILL_OPTIONS,
                     decisions_path, human_labels_path, parsing_table_path, rows_by_movie)
from .workdir import WorkDir, atomic_table_writer, changes

if TYPE_CHECKING:  # pandas costs seconds to import, which `mhmd status` does not need
    import pandas as pd



def _kept(summaries) -> dict:
    """frames_out and rejected (by reason, most first) summed over partition summaries."""
    rejected = sum((Counter(s.get("rejected", {})) for s in summaries), Counter())
    return {"frames_out": sum(s.get("frames_out", 0) for s in summaries),
            "rejected": dict(sorted(rejected.items(), key=lambda item: (-item[1], item[0])))}


def stage_status(workdir: WorkDir, stage: str) -> dict:
    planned, done, failed = workdir.planned(stage), workdir.done(stage), workdir.failed(stage)
    running = workdir.progress(stage)
    if stage == EXTRACT:  # a film extracted in chunks runs as its chunks, `<movie>@<k>`
        running.update(workdir.progress(EXTRACT_CHUNKS))
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
                    for pid, p in running.items() if pid not in done and pid not in failed},
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
        _built = None  # the old one goes before the new one is built, not after
        table, damaged = _build(workdir)
        _built = (state, table.to_pandas(), damaged)
    _, frames, damaged = _built
    _refuse(damaged, before)
    return frames.copy(deep=False)


def manifest_table(workdir: WorkDir, before: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """`manifest` as an Arrow table built for this call (not kept), for a command that reads it
    once: of the extract tables' `columns` only when given (the contract's columns it leaves out
    are null), so that a command holds no score it does not use."""
    table, damaged = _build(workdir, columns)
    _refuse(damaged, before)
    return table


def _refuse(damaged: dict[str, list[str]], before: str | None) -> None:
    for stage in FUNNEL[:FUNNEL.index(before)] if before else FUNNEL:
        if damaged[stage]:
            raise DamagedFileError(damaged[stage][0])


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


def _build(workdir: WorkDir, columns: list[str] | None = None) -> tuple[pa.Table, dict[str, list[str]]]:
    """The manifest of the partitions that read, and per stage the damaged ones left out. Built in
    Arrow: each stage's table is read once, of the columns the manifest shows, and its rows are
    matched to the frames by frame_id (`_matched`), not joined as pandas frames."""
    damaged: dict[str, list[str]] = {stage: [] for stage in FUNNEL}
    frames = workdir.read_arrow(EXTRACT, damaged[EXTRACT], columns)
    if frames is None:
        return pa.table({name: pa.array([], kind) for name, kind in MANIFEST_COLUMNS.items()}), damaged
    later = _Later(decisions=fresh_decisions(workdir), detections=workdir.read_arrow(DETECT, damaged[DETECT]),
                   human=_human_labels(workdir), predicted=workdir.read_arrow(LABEL, damaged[LABEL]),
                   shards=workdir.read_arrow(SHARD, damaged[SHARD], columns=["frame_id", "split"]),
                   parsing=_parsing(workdir))
    frames = _assemble(frames, later)
    return frames.sort_by([("movie_id", "ascending"), ("timestamp", "ascending")]), damaged


def manifest_by_movie(workdir: WorkDir, before: str | None = None,
                      columns: list[str] | None = None) -> Iterator[pa.Table]:
    """`manifest_table` one movie at a time, in the manifest's order: each movie's rows built from
    its own partitions and its rows of the whole-dataset tables (the filter's decisions, read per
    movie: `MovieDecisions`; the shard records and the parsing maps, spilled once into buckets of
    movies: `MovieBuckets`), so that a command holds one movie's frames, not every frame. A damaged record of a stage
    before `before` raises when it is reached. A caller of a stage (`before`: every stage is shard
    or before it) gets no split: the shard records, out of date once it runs, are not read."""
    refused = set(FUNNEL[:FUNNEL.index(before)] if before else FUNNEL)
    damaged = {stage: None if stage in refused else [] for stage in FUNNEL}  # None: raise
    decisions, human = MovieDecisions(workdir), _human_labels(workdir)
    movies, done = sorted(workdir.marked_done(EXTRACT)), workdir.done(EXTRACT)
    sizes = {movie: int(done.get(movie, {}).get("frames_out", 0)) for movie in movies}  # buckets' sizes
    with tempfile.TemporaryDirectory(prefix="mhmd-manifest-") as spill:
        shards = MovieBuckets(() if before else _shard_records(workdir, damaged[SHARD]), SHARD_RECORD, sizes,
                              Path(spill) / "shard")
        parsing = MovieBuckets(_parsing_batches(workdir), PARSING_RECORD, sizes, Path(spill) / "parsing")

        def movie_rows(movie: str) -> pa.Table | None:
            frames = workdir.read_partition(EXTRACT, movie, damaged[EXTRACT], columns)
            if frames is None:
                return None
            later = _Later(decisions=decisions.of(movie), human=human, shards=shards.get(movie),
                           parsing=parsing.get(movie), detections=workdir.read_partition(DETECT, movie, damaged[DETECT]),
                           predicted=workdir.read_partition(LABEL, movie, damaged[LABEL]))
            return _in_time_order(_assemble(frames, later))

        # A thread builds the next movies while the caller works on this one (Arrow lets go of the
        # GIL); one thread, so that the movies' decisions and buckets are read in order
        # (MovieDecisions and MovieBuckets keep the last read). Closed before the spill folder goes,
        # should the caller stop early: no thread is left reading it.
        with closing(prefetched(movies, movie_rows, threads=1, ahead=2)) as built:
            for _, rows in progress_bar(built, "films read", "film", len(movies)):
                if rows is not None:
                    yield rows


SHARD_RECORD = ["frame_id", "movie_id", "split"]
PARSING_RECORD = ["frame_id", "movie_id", "parsing"]
MOVIE_BUCKET_ROWS = 250_000  # rows of a whole-dataset table a reader going movie by movie holds at once


def _shard_records(workdir: WorkDir, damaged: list[str] | None) -> Iterator[pa.Table]:
    """The shard records (SHARD_RECORD's columns), a tar's at a time."""
    for tar in workdir.marked_done(SHARD):
        records = workdir.read_partition(SHARD, tar, damaged, columns=SHARD_RECORD)
        if records is not None:
            yield records


def _parsing_batches(workdir: WorkDir) -> Iterator[pa.Table]:
    """The parsing maps attached (PARSING_RECORD's columns), a batch at a time."""
    path = parsing_table_path(workdir)
    if path.exists():
        for batch in pq.ParquetFile(path).iter_batches(columns=PARSING_RECORD):
            yield pa.Table.from_batches([batch])


class MovieBuckets:
    """The rows of a whole-dataset table (a movie_id column: the shard records, whose tars mix every
    film; the parsing maps) one movie at a time, in the movies' order, without holding them all:
    spilled once into files of consecutive movies (about MOVIE_BUCKET_ROWS rows each, by the movies'
    `sizes`), a file read when one of its movies is first asked and dropped for the next."""

    def __init__(self, tables: Iterable[pa.Table], columns: list[str], sizes: dict[str, int], folder: Path):
        self.bucket_of, rows, bucket = {}, 0, 0
        for movie in sorted(sizes):
            if rows and rows + sizes[movie] > MOVIE_BUCKET_ROWS:
                bucket, rows = bucket + 1, 0
            self.bucket_of[movie], rows = bucket, rows + sizes[movie]
        folder.mkdir()
        self.paths = [folder / f"{b:05d}.arrow" for b in range(bucket + 1)]
        writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        pending: dict[int, list[pa.Table]] = {}  # rows not written yet, a bucket's written together

        def write(bucket: int) -> None:
            rows = pa.concat_tables(pending.pop(bucket)).combine_chunks()
            if bucket not in writers:
                writers[bucket] = pa.ipc.new_stream(self.paths[bucket], rows.schema, options=SPILL_OPTIONS)
            writers[bucket].write_table(rows)

        try:
            schema, held = None, 0  # the first table's schema: the others are cast to it
            for table in tables:
                table = table.select(columns) if schema is None else table.select(columns).cast(schema)
                schema = table.schema
                movies = pc.dictionary_encode(table["movie_id"]).combine_chunks()
                # -1: a movie no one will ask for (not extracted, or no movie_id)
                of_movie = np.array([self.bucket_of.get(movie, -1) for movie in movies.dictionary.to_pylist()] + [-1])
                buckets = of_movie[pc.fill_null(movies.indices, -1).to_numpy()]
                for b in np.unique(buckets[buckets >= 0]).tolist():
                    pending.setdefault(b, []).append(table.filter(buckets == b))
                held += int((buckets >= 0).sum())
                if held > MOVIE_BUCKET_ROWS:  # each bucket's rows go to its file
                    for b in list(pending):
                        write(b)
                    held = 0
            for b in list(pending):
                write(b)
        finally:
            for writer in writers.values():
                writer.close()
        self.loaded, self.rows = None, {}

    def get(self, movie: str) -> pa.Table | None:
        """The movie's rows; None when it has none."""
        bucket = self.bucket_of.get(movie)
        if bucket is None:
            return None
        if bucket != self.loaded:
            path, self.rows = self.paths[bucket], {}  # the last bucket's rows dropped first
            if path.exists():
                with pa.ipc.open_stream(path) as reader:
                    self.rows = rows_by_movie(reader.read_all())
            self.loaded = bucket
        return self.rows.get(movie)


def _in_time_order(frames: pa.Table) -> pa.Table:
    """A movie's frames sorted by timestamp (stable): as they are, when extract wrote them in that
    order already (sorting moves every column's values: a seventh of reading a movie)."""
    stamps = frames["timestamp"]
    if not stamps.null_count and pc.all(pc.less_equal(stamps.slice(0, len(stamps) - 1), stamps.slice(1))).as_py() is not False:
        return frames
    return frames.sort_by([("timestamp", "ascending")])


@dataclass
class _Later:
    """What later stages (and the filter, people, parsing) recorded of the frames being assembled:
    Arrow tables, each None when there is none."""
    decisions: pa.Table | None
    detections: pa.Table | None
    human: pa.Table | None
    predicted: pa.Table | None
    shards: pa.Table | None
    parsing: pa.Table | None


def _human_labels(workdir: WorkDir) -> pa.Table | None:
    path = human_labels_path(workdir)
    return pq.read_table(path, columns=["frame_id", "label"]) if path.exists() else None


def _parsing(workdir: WorkDir) -> pa.Table | None:
    path = parsing_table_path(workdir)
    return pq.read_table(path, columns=PARSING_RECORD) if path.exists() else None


def _assemble(frames: pa.Table, later: _Later) -> pa.Table:
    """Extract rows (of one movie or all) with the current decisions and every later record of
    them matched by frame_id, as the manifest's columns (the contract's first, scores after)."""
    frames = with_decisions(frames, later.decisions)
    if later.detections is not None:
        detections = later.detections
        # Detection saw the frames kept after quality: its rows of others are from earlier decisions.
        at = pc.if_else(frames["kept"], _matched(frames, detections), pa.scalar(None, pa.int32()))
        for name in ("persons", "boxes", "confidences", "largest_person_area", "mask"):
            frames = _put(frames, name, detections[name].take(at))
        rejected = pc.fill_null(pc.invert(detections["kept"].take(at)), False)
        frames = _put(frames, "kept", pc.and_(frames["kept"], pc.invert(rejected)))
        frames = _put(frames, "reject_reason", pc.if_else(rejected, detections["reject_reason"].take(at),
                                                          frames["reject_reason"]))
    frames = _with_labels(frames, later.human, later.predicted)
    if later.shards is not None:
        frames = _put(frames, "split", later.shards["split"].take(_matched(frames, later.shards)))
    if later.parsing is not None:
        frames = _put(frames, "parsing", later.parsing["parsing"].take(_matched(frames, later.parsing)))
    for name in MANIFEST_COLUMNS:
        if name not in frames.column_names:
            frames = frames.append_column(name, pa.nulls(len(frames)))
    extra = [c for c in frames.column_names if c not in MANIFEST_COLUMNS]
    return frames.select(list(MANIFEST_COLUMNS) + extra)


def _matched(frames: pa.Table, rows: pa.Table) -> pa.Array:
    """For each frame, the index of its row in `rows` (by frame_id), null where it has none."""
    return pc.index_in(frames["frame_id"], value_set=rows["frame_id"].combine_chunks())


def _put(frames: pa.Table, name: str, column) -> pa.Table:
    """`frames` with the column `name` set (replaced, or added last)."""
    if name in frames.column_names:
        return frames.set_column(frames.schema.get_field_index(name), name, column)
    return frames.append_column(name, column)


def _with_labels(frames: pa.Table, human: pa.Table | None, predicted: pa.Table | None) -> pa.Table:
    """label, label_source, label_confidence: the labeler's output where it ran, else the human
    labels imported so far."""
    if human is not None:
        label = human["label"].take(_matched(frames, human))
        frames = _put(frames, "label", label)
        frames = _put(frames, "label_source", pc.if_else(pc.is_valid(label), "human", pa.scalar(None, pa.string())))
        frames = _put(frames, "label_confidence", pc.if_else(pc.is_valid(label), 1.0, pa.scalar(None, pa.float64())))
    if predicted is not None:
        at = _matched(frames, predicted)
        found = pc.is_valid(at)
        predicted = _put(predicted, "label_confidence", predicted["label_confidence"].cast(pa.float64()))
        for name in ("label", "label_source", "label_confidence", "top3", "top3_confidence"):
            column = predicted[name].take(at)
            if name in frames.column_names:
                column = pc.if_else(found, column, frames[name])
            frames = _put(frames, name, column)
    return frames


def export_manifest(workdir: WorkDir, out: str) -> int:
    """Write the manifest as Parquet with the contract's column types; returns the row count.
    Movie by movie (`manifest_by_movie`), a row group each, into one file that has the columns of
    `manifest_table` (`_export_schema`): no pandas frame, and never the whole manifest held."""
    schema, rows = _export_schema(workdir), 0
    with atomic_table_writer(Path(out), schema) as writer:
        for table in manifest_by_movie(workdir):
            writer.write_table(pa.table([table[field.name].cast(field.type) if field.name in table.column_names
                                         else pa.nulls(table.num_rows, field.type) for field in schema], schema=schema))
            rows += table.num_rows
    return rows


def _export_schema(workdir: WorkDir) -> pa.Schema:
    """The columns `manifest_table` would have, with the contract's types, from the tables'
    footers: the manifest of empty tables of every stage's columns. One movie's rows cannot tell:
    a movie not detected yet has no boxes, which other movies' rows have."""
    frames = _no_rows([workdir.table_path(EXTRACT, pid) for pid in workdir.marked_done(EXTRACT)])
    if frames is None:
        return pa.schema(MANIFEST_COLUMNS.items())
    partitions = {stage: [workdir.table_path(stage, pid) for pid in workdir.marked_done(stage)]
                  for stage in (DETECT, LABEL, SHARD)}
    later = _Later(decisions=None, detections=_no_rows(partitions[DETECT]),  # decisions add no column
                   human=_no_rows([human_labels_path(workdir)], ["frame_id", "label"]),
                   predicted=_no_rows(partitions[LABEL]), shards=_no_rows(partitions[SHARD], ["frame_id", "split"]),
                   parsing=_no_rows([parsing_table_path(workdir)], ["frame_id", "movie_id", "parsing"]))
    schema = _assemble(frames, later).schema
    for name, kind in MANIFEST_COLUMNS.items():
        schema = schema.set(schema.get_field_index(name), pa.field(name, kind))
    return schema


def _no_rows(paths: list[Path], columns: list[str] | None = None) -> pa.Table | None:
    """An empty table of the Parquet files' columns (`columns` of them), their schemas unified as
    `WorkDir.read_arrow` concatenates them; None when none reads (a damaged one is refused where
    its rows are read)."""
    schemas = []
    for path in paths:
        try:
            schemas.append(pq.read_schema(path))
        except (pa.ArrowException, OSError):
            continue
    if not schemas:
        return None
    table = pa.unify_schemas(schemas, promote_options="default").remove_metadata().empty_table()
    return table.select([c for c in columns if c in table.column_names]) if columns else table
