"""`mhmd filter`: new quality thresholds applied to the recorded scores, without decoding, and
the keep decisions every later stage uses (`current_decisions`).

A stage never rewrites another's files: the filter's decisions are its own table, and they
replace extract's for the movies they were made on (until a movie is extracted again).
"""
from __future__ import annotations

import hashlib
import shlex
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import InputError
from .logs import progress_bar
from .quality import SCORE_NAMES, DuplicateRuns, FrameVerdict, QualityThresholds, judge_columns
from .tables import EXTRACT, FILTER, decisions_path, movie_paths
from .workdir import WorkDir, atomic_table_writer, atomic_write_json, read_json, writes

if TYPE_CHECKING:  # pandas costs seconds to import: `mhmd status` (current_counts) does not need it
    import pandas as pd

STAGE = FILTER
DECISION_COLUMNS = ["frame_id", "kept", "reject_reason", "flags", "needs_extraction"]
# The extract columns a decision reads: not the flags, whose lists pandas makes an array a frame of.
DECIDED_ON = ["frame_id", "movie_id", "timestamp", "jpeg", *SCORE_NAMES]
RUN_SCORES = ("phash_hi", "phash_lo", "sharpness")  # what DuplicateRuns reads of a verdict's scores


def decide(frames: pd.DataFrame, thresholds: QualityThresholds) -> pd.DataFrame:
    """The decisions the extract pass would have made with these thresholds, from the recorded
    scores of `frames` (extract table rows): frame_id, movie_id, kept, reject_reason, flags."""
    import pandas as pd

    missing = [name for name in SCORE_NAMES if name not in frames]
    if missing:
        raise InputError(f"the extract table has no {', '.join(missing)} scores: re-extract with this version")
    rows = []
    for movie, group in frames.sort_values(["movie_id", "timestamp"], kind="stable").groupby("movie_id", sort=False):
        runs = DuplicateRuns(thresholds.max_hash_distance)
        verdicts = []
        flags = judge_columns({name: group[name].to_numpy() for name in SCORE_NAMES}, thresholds)
        # A verdict carries the scores its duplicate run compares, not all twelve: a dict a frame.
        run_scores = (group[name].tolist() for name in RUN_SCORES)
        for fid, hi, lo, sharp, failed in zip(group["frame_id"].tolist(), *run_scores, flags):
            scores = {"phash_hi": hi, "phash_lo": lo, "sharpness": sharp}
            verdicts += runs.push(FrameVerdict({"frame_id": fid}, scores, failed))
        verdicts += runs.flush()
        rows += [(v.meta["frame_id"], movie, v.kept, v.reason, v.flags) for v in verdicts]
    return pd.DataFrame(rows, columns=["frame_id", "movie_id", "kept", "reject_reason", "flags"])


def _fingerprint(path) -> str:
    """Identifies one version of a movie's extract table: filter decisions made on an older
    version (the movie was extracted again since) no longer apply."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def current_decisions(workdir: WorkDir, damaged: list[str] | None = None) -> pd.DataFrame:
    """The keep decision of every sampled frame that later stages and the manifest use: those of
    the last `mhmd filter` for the movies it saw (unless extracted again since), else extract's.
    `needs_extraction`: kept, but no JPEG was ever encoded (re-extract the movie). A damaged extract
    partition raises, or is left out when given a list `damaged` (`WorkDir.read_table`)."""
    import pandas as pd

    frames = workdir.read_arrow(EXTRACT, damaged, columns=["frame_id", "kept", "reject_reason", "flags", "jpeg"])
    if frames is None:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in DECISION_COLUMNS})
    decisions = with_decisions(frames, fresh_decisions(workdir))
    needs = pc.and_(decisions["kept"], pc.is_null(decisions["jpeg"]))
    return decisions.append_column("needs_extraction", needs).select(DECISION_COLUMNS).to_pandas()


def fresh_decisions(workdir: WorkDir) -> pa.Table | None:
    """The last filter's decisions (frame_id, movie_id, kept, reject_reason, flags) of the movies
    not extracted again since; None when there was no filter."""
    path = decisions_path(workdir)
    return _fresh(workdir, pq.read_table(path, columns=_READ)) if path.exists() else None


_READ = ["frame_id", "movie_id", "kept", "reject_reason", "flags", "extract_fingerprint"]


def _fresh(workdir: WorkDir, filtered: pa.Table) -> pa.Table:
    """The rows of `filtered` (rows of the decisions file) of the movies whose extract table is
    still the one decided on, without the fingerprint."""
    prints = filtered.group_by(["movie_id", "extract_fingerprint"]).aggregate([]).to_pylist()
    fresh = [p["movie_id"] for p in prints if workdir.is_done(EXTRACT, p["movie_id"])
             and _fingerprint(workdir.table_path(EXTRACT, p["movie_id"])) == p["extract_fingerprint"]]
    return filtered.filter(pc.is_in(filtered["movie_id"], value_set=pa.array(fresh, pa.string()))).drop_columns(
        "extract_fingerprint")


class MovieDecisions:
    """`fresh_decisions` one movie at a time (`of`), read from the decisions file's row groups that
    hold the movie (by their movie_id statistics): the filter writes a row group per movie, and an
    earlier version's larger groups are read once for the movies they hold in a row, so a reader
    going movie by movie in order never holds every frame's decision."""

    def __init__(self, workdir: WorkDir):
        path = decisions_path(workdir)
        self.workdir, self.file = workdir, pq.ParquetFile(path) if path.exists() else None
        groups = self.file.num_row_groups if self.file else 0
        self.ranges = [_movie_range(self.file.metadata.row_group(i)) for i in range(groups)]
        self.read: tuple[list[int], pa.Table | None] = ([], None)  # the row groups read last, their rows

    def of(self, movie: str) -> pa.Table | None:
        """The movie's fresh decisions; None when the last filter did not decide on it (or there was none)."""
        groups = [i for i, (low, high) in enumerate(self.ranges) if low is None or low <= movie <= high]
        if not groups:
            return None
        if groups != self.read[0]:
            self.read = groups, None  # the old rows go before the new are read
            self.read = groups, self.file.read_row_groups(groups, columns=_READ)
        rows = self.read[1]
        rows = _fresh(self.workdir, rows.filter(pc.equal(rows["movie_id"], movie)))
        return rows if rows.num_rows else None


def _movie_range(group: pq.RowGroupMetaData) -> tuple[str | None, str | None]:
    """The least and greatest movie_id of a row group; (None, None) when it has no statistics (any movie)."""
    for i in range(group.num_columns):
        column = group.column(i)
        if column.path_in_schema == "movie_id" and column.statistics is not None and column.statistics.has_min_max:
            return column.statistics.min, column.statistics.max
    return None, None


def with_decisions(frames: pa.Table, decisions: pa.Table | None) -> pa.Table:
    """`frames` with `kept`, `reject_reason` and `flags` of their rows in `decisions`
    (`fresh_decisions`, or some movies' rows of it), matched by frame_id."""
    if decisions is None:
        return frames
    at = pc.index_in(frames["frame_id"], value_set=decisions["frame_id"].combine_chunks())
    for name in ("kept", "reject_reason", "flags"):
        column = pc.if_else(pc.is_valid(at), decisions[name].take(at), frames[name])
        frames = frames.set_column(frames.schema.get_field_index(name), name, column)
    return frames


def current_counts(workdir: WorkDir) -> dict[str, dict] | None:
    """Per done extract partition, `frames_out` and `rejected` (by reason) under the current
    decisions, as `current_decisions` would count them, from the done markers and the last filter's
    per-movie counts: no frame table is read, only the hashes of those the filter decided on are
    taken (to tell a movie extracted again since). None when the last filter's summary has no
    per-movie counts (written by an earlier version) or does not read: count `current_decisions`."""
    done = workdir.done(EXTRACT)
    filtered = {}
    if decisions_path(workdir).exists():
        try:
            filtered = read_json(_summary_path(workdir)).get("movies")
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(filtered, dict):
            return None
    return {movie: filtered[movie] if movie in filtered
            and filtered[movie]["extract_fingerprint"] == _fingerprint(workdir.table_path(EXTRACT, movie))
            else marker for movie, marker in done.items()}


def _summary_path(workdir: WorkDir) -> Path:
    return workdir.stage_dir(STAGE) / "summary.json"


def recorded_thresholds(workdir: WorkDir) -> QualityThresholds:
    """The thresholds the current decisions were made with: the last filter's, else the extract
    settings (when every movie used the same), else the defaults. `mhmd filter` starts from these."""
    summary = _summary_path(workdir)
    if summary.exists():
        return QualityThresholds.from_mapping(read_json(summary)["thresholds"])
    used = {tuple(sorted(s.get("settings", {}).get("quality", {}).items())) for s in workdir.done("extract").values()}
    return QualityThresholds.from_mapping(dict(used.pop())) if len(used) == 1 else QualityThresholds()


def threshold_args(thresholds: QualityThresholds) -> list[str]:
    """The command-line options that give these thresholds (those that differ from the defaults)."""
    defaults = QualityThresholds()
    return [arg for f in fields(thresholds) if getattr(thresholds, f.name) != getattr(defaults, f.name)
            for arg in (f"--{f.name.replace('_', '-')}", f"{getattr(thresholds, f.name):g}")]


def _extract_args(settings: dict) -> list[str]:
    """`mhmd extract` options that repeat a movie's recorded extract settings (all but quality),
    so that extracting it again samples the same frames."""
    sampling = settings["sampling"]
    args = {"fps": ["--fps", sampling["fps"]], "keyframes": ["--keyframes"],
            "scenes": ["--scenes", "--scene-threshold", sampling["scene_threshold"],
                       "--scene-max-gap", sampling["scene_max_gap"]]}[sampling["mode"]]
    args += ["--max-side", settings["max_side"] or 0, "--skip-head", settings["skip_head"],
             "--skip-tail", settings["skip_tail"], "--crop" if settings["crop_letterbox"] else "--no-crop",
             "--jpeg-quality", settings["jpeg_quality"]]
    return [f"{a:g}" if isinstance(a, float) else str(a) for a in args]


def reextract_commands(workdir: WorkDir, movies: list[str], thresholds: QualityThresholds) -> list[str]:
    """The `mhmd extract --redo` commands (one per set of recorded extract settings) that extract
    these movies again with these thresholds."""
    done, paths = workdir.done(EXTRACT), movie_paths(workdir)
    groups: dict[tuple, list[str]] = {}
    for movie in movies:
        groups.setdefault(tuple(_extract_args(done[movie]["settings"])), []).append(str(paths[movie]))
    return [shlex.join(["mhmd", "extract", *paths, "-w", str(workdir.root), "--redo", *args,
                        *threshold_args(thresholds)]) for args, paths in groups.items()]


@writes("workdir")
def refilter(workdir: WorkDir | str, thresholds: QualityThresholds) -> dict:
    """Re-decide every extracted frame with new thresholds, from the recorded scores (no decoding),
    and record the decisions as the filter stage's own table. Returns a summary: counts, frames
    newly rejected and accepted, and which movies must be extracted again (frames now kept that
    never had a JPEG encoded) with the command that does it. Movie by movie: one extract table's
    rows and decisions are held at a time."""
    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    movies = sorted(workdir.marked_done(EXTRACT))
    if not movies:
        raise InputError(f"{workdir.root}: no extracted movies yet: run `mhmd extract` first")
    earlier, frames, counts, changed = MovieDecisions(workdir), 0, {}, Counter()
    # Written as decided, a row group per movie (what MovieDecisions reads); the file read for the
    # earlier decisions is replaced only once the new one is whole.
    with atomic_table_writer(decisions_path(workdir), DECISIONS_SCHEMA) as writer:
        for movie in progress_bar(movies, "filter", "film"):
            table = workdir.read_partition(EXTRACT, movie)
            decided_on = table.select([name for name in DECIDED_ON if name in table.column_names])
            decisions = _movie_decisions(workdir, movie, decided_on.to_pandas(), thresholds)
            was_kept = _kept_before(table, earlier.of(movie)).reindex(decisions["frame_id"]).fillna(False)
            was_kept = was_kept.astype(bool).to_numpy()
            changed.update(newly_rejected=int((was_kept & ~decisions["kept"]).sum()),
                           newly_accepted=int((~was_kept & decisions["kept"]).sum()))
            writer.write_table(pa.Table.from_pandas(decisions, preserve_index=False, schema=DECISIONS_SCHEMA))
            frames += len(decisions)
            counts.update(_movie_counts(decisions))

    stale = {movie: int(n) for movie, n in ((m, c["needs_extraction"]) for m, c in counts.items()) if n}
    rejected = sum((Counter(c["rejected"]) for c in counts.values()), Counter())
    summary = {
        "frames": frames,
        "kept": sum(c["frames_out"] for c in counts.values()),
        "rejected": dict(sorted(rejected.items())),
        "newly_rejected": changed["newly_rejected"],
        "newly_accepted": changed["newly_accepted"],
        "needs_extraction": stale,
        "reextract_commands": reextract_commands(workdir, list(stale), thresholds),
        "thresholds": thresholds.to_dict(),
        "output": str(decisions_path(workdir)),
        "movies": {movie: {k: v for k, v in c.items() if k != "needs_extraction"} for movie, c in counts.items()},
    }
    atomic_write_json(_summary_path(workdir), summary)
    return summary


DECISIONS_SCHEMA = pa.schema([
    ("frame_id", pa.string()), ("movie_id", pa.string()), ("kept", pa.bool_()), ("reject_reason", pa.string()),
    ("flags", pa.list_(pa.string())), ("needs_extraction", pa.bool_()), ("extract_fingerprint", pa.string())])


def _movie_decisions(workdir: WorkDir, movie: str, frames: pd.DataFrame, thresholds: QualityThresholds) -> pd.DataFrame:
    """One movie's decisions (`decide`) with `needs_extraction` and the fingerprint of its extract table."""
    decisions = decide(frames, thresholds)
    jpeg = frames.set_index("frame_id")["jpeg"]
    decisions["needs_extraction"] = decisions["kept"] & jpeg.reindex(decisions["frame_id"]).isna().to_numpy()
    decisions["extract_fingerprint"] = _fingerprint(workdir.table_path(EXTRACT, movie))
    return decisions


def _kept_before(frames: pa.Table, earlier: pa.Table | None) -> pd.Series:
    """frame_id -> kept of one movie's extract rows under the current decisions (`current_decisions`)."""
    frames = with_decisions(frames.select(["frame_id", "kept", "reject_reason", "flags"]), earlier)
    return frames.select(["frame_id", "kept"]).to_pandas().set_index("frame_id")["kept"]


def _movie_counts(decisions: pd.DataFrame) -> dict[str, dict]:
    """Per movie: the extract table decided on (its fingerprint), frames kept and rejected by
    reason: what `mhmd status` counts (`current_counts`) without reading the decisions again; and
    the frames kept that were never encoded (`needs_extraction`, not written to the summary's movies)."""
    return {movie: {"extract_fingerprint": group["extract_fingerprint"].iat[0],
                    "frames_out": int(group["kept"].sum()),
                    "rejected": {r: int(n) for r, n in group["reject_reason"].value_counts().sort_index().items()},
                    "needs_extraction": int(group["needs_extraction"].sum())}
            for movie, group in decisions.groupby("movie_id", sort=True)}


def format_refilter(summary: dict) -> str:
    lines = [f"{summary['kept']} of {summary['frames']} frames kept "
             f"({summary['newly_rejected']} newly rejected, {summary['newly_accepted']} newly accepted)"]
    lines += [f"  {reason}: {n}" for reason, n in summary["rejected"].items()]
    if summary["needs_extraction"]:
        frames = sum(summary["needs_extraction"].values())
        lines += [f"{frames} newly kept frames of {len(summary['needs_extraction'])} movies were never encoded; "
                  f"extract them again with:", *(f"  {c}" for c in summary["reextract_commands"])]
    return "\n".join(lines)
