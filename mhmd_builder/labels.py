"""Human labels: reading a filled CSV or a Label Studio export (JSON, JSON-MIN or CSV), checking
every line against the taxonomy and the frames that passed detection, and merging them into
WORKDIR/label/human.parquet (tables.HUMAN_SCHEMA: frame_id, label, label_id, source file, line);
movie metadata files."""
from __future__ import annotations

import csv
import difflib
import io
import json
import re
import reprlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError, listing
from .images import read_regular_file
from .manifest import manifest, manifest_by_movie
from .tables import EXTRACT, HUMAN_SCHEMA, LABEL, MANIFEST_COLUMNS, human_labels_path, movie_paths, read_human_labels
from .taxonomy import Taxonomy
from .workdir import WorkDir, atomic_write_table, writes

if TYPE_CHECKING:
    import pandas as pd



def write_human_labels(workdir: WorkDir, labels: "pd.DataFrame") -> None:
    """Replace the human labels table (atomically) with `labels` (HUMAN_SCHEMA columns)."""
    table = pa.Table.from_pandas(labels[HUMAN_SCHEMA.names], schema=HUMAN_SCHEMA, preserve_index=False)
    atomic_write_table(human_labels_path(workdir), table)


# -- which frames can be labelled ---------------------------------------------------------------
def labelable_frames(workdir: WorkDir) -> "pd.DataFrame":
    """The manifest's frames that passed detection: the only frames a human label may name."""
    return passed_detection(manifest(workdir, before=LABEL))


def passed_detection(frames: "pd.DataFrame") -> "pd.DataFrame":
    return frames[passed_detection_mask(frames)].reset_index(drop=True)


def passed_detection_mask(frames: "pd.DataFrame") -> "pd.Series":
    """Which of the manifest's frames passed detection."""
    return frames.kept.fillna(False).astype(bool) & frames.persons.notna()


# -- problems, reported all together --------------------------------------------------------------
class LabelFileError(InputError):
    """A label or movie metadata file with problems; `.problems` lists each as `file:line: problem`."""

    def __init__(self, path, problems: list[str], consequence: str = "nothing imported"):
        # In file order: each problem reads `<path>:<line>: ...` (line-less ones come first).
        self.path = str(path)
        self.problems = sorted(problems, key=lambda p: int(re.match(r"\d*", p[len(self.path) + 1:])[0] or 0))
        if len(problems) == 1:
            super().__init__(f"{self.problems[0]} ({consequence})")
        else:
            super().__init__(f"{path}: {len(problems)} problems, {consequence}\n" + listing(self.problems))


# Far above a real export (a Label Studio JSON export, the largest format, takes about 2.3 kB a task),
# and small enough that reading one holds well under a GiB.
MAX_LABEL_FILE_BYTES = 256 << 20


def _read_text(path: Path) -> str:
    """A label or movie metadata file's text: a regular file of at most MAX_LABEL_FILE_BYTES, UTF-8."""
    data = read_regular_file(path, MAX_LABEL_FILE_BYTES, "a label file", lambda reason: LabelFileError(path, [reason]))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelFileError(path, [f"{path}: not UTF-8 text (byte {e.start}), so not a label file"]) from None


def _read_csv(path: Path, problems: list[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    return _parse_csv(path, _read_text(path), problems)


def _parse_csv(path: Path, text: str, problems: list[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line, row) pairs, values stripped; rows with the wrong number of fields become
    problems. Lines are the file's own (a quoted field may span lines: its row's last line)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        for name, separator in (("semicolon", ";"), ("tab", "\t")):
            if len(header) == 1 and separator in header[0]:
                raise LabelFileError(path, [f"{path}:1: looks {name}-separated: save it comma-separated"])
        rows = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                problems.append(f"{path}:{reader.line_num}: {len(fields)} fields, the header has {len(header)}")
                continue
            rows.append((reader.line_num, {k: v.strip() for k, v in zip(header, fields)}))
    except csv.Error as e:  # a field over csv's size limit
        raise LabelFileError(path, [f"{path}:{reader.line_num}: not CSV ({e})"]) from None
    return header, rows


# -- movie metadata -------------------------------------------------------------------------------
def _movie_rows(path: Path, taxonomy: Taxonomy, problems: list[str]) -> list[tuple[int, dict]]:
    """The (line, row) pairs of a movie metadata CSV; unknown eras and nationalities are problems."""
    header, rows = _read_csv(path, problems)
    missing = [c for c in ("movie", "era", "nationality") if c not in header]
    if missing:
        raise LabelFileError(path, [f"{path}:1: missing column(s) {', '.join(missing)}"], "no metadata read")
    eras, nations = {l.era for l in taxonomy.labels}, {l.nationality for l in taxonomy.labels}
    for line, row in rows:
        era, nation = row["era"], row["nationality"]
        bad = [f"unknown era {era!r}"] * (bool(era) and era not in eras) + \
              [f"unknown nationality {nation!r}"] * (bool(nation) and nation not in nations)
        if not bad and not taxonomy.consistent_with(era or None, nation or None):
            bad = [f"no label of the taxonomy is {era}/{nation}"]
        problems += [f"{path}:{line}: {b}" for b in bad]
    return rows


def check_movie_metadata(path: str | Path, taxonomy: Taxonomy) -> None:
    """The problems a movie metadata file has on its own (columns, eras, nationalities), found
    before any movie is extracted; `load_movie_metadata` checks its movies afterwards."""
    path, problems = Path(path), []
    _movie_rows(path, taxonomy, problems)
    if problems:
        raise LabelFileError(path, problems, "no metadata read")


def load_movie_metadata(path: str | Path, workdir: WorkDir, taxonomy: Taxonomy) -> dict[str, dict]:
    """movie_id -> {"era": ..., "nationality": ...} (None where not known) from a CSV with columns
    movie (file name or movie id of an extracted movie), era, nationality."""
    path, problems = Path(path), []
    rows = _movie_rows(path, taxonomy, problems)
    extracted = workdir.done(EXTRACT)
    by_file: dict[str, list[str]] = {}
    for movie_id, movie_path in movie_paths(workdir).items():
        if movie_id in extracted:
            by_file.setdefault(movie_path.name, []).append(movie_id)
    metadata, seen = {}, {}
    for line, row in rows:
        where, name = f"{path}:{line}", row["movie"]
        ids = [name] if name in extracted else by_file.get(name, [])
        if not ids:
            problems.append(f"{where}: unknown movie {name!r} (neither the file name nor the id of an extracted movie)")
        elif len(ids) > 1:
            problems.append(f"{where}: {name!r} names {len(ids)} extracted movies ({', '.join(ids)}): give the movie id")
        elif ids[0] in seen:
            problems.append(f"{where}: movie {ids[0]} also on line {seen[ids[0]]}")
        else:
            seen[ids[0]] = line
            metadata[ids[0]] = {"era": row["era"] or None, "nationality": row["nationality"] or None}
    if problems:
        raise LabelFileError(path, problems, "no metadata read")
    return metadata


# -- importing human labels -----------------------------------------------------------------------
PARTS = ("era", "nationality", "garment")


@dataclass
class _Entry:
    """One labelled frame as the file gives it: a label name, or parts (empty where not given)."""

    line: int
    frame_id: str
    label: str = ""
    era: str = ""
    nationality: str = ""
    garment: str = ""


def _read_label_file(path: Path, problems: list[str]) -> tuple[list[_Entry], int]:
    """The entries of a label file and how many of its frames are not labelled yet. The format is
    told from the content, whatever the name: a JSON list is a Label Studio JSON or JSON-MIN export,
    anything else a CSV (Label Studio's own when it has an annotation_id column)."""
    text = _read_text(path)
    if re.match(r"\s*[\[{]", text):
        return _read_label_studio_json(path, text, problems)
    header, rows = _parse_csv(path, text, problems)
    if "annotation_id" in header:
        return _read_label_studio_rows(path, [(line, _decode_cells(row)) for line, row in rows], problems)
    return _read_label_csv(path, header, rows)


def _read_label_csv(path: Path, header: list[str], rows: list[tuple[int, dict]]) -> tuple[list[_Entry], int]:
    """A CSV as `mhmd sample` writes it, filled in."""
    if "frame_id" not in header or not ({"label", "garment"} & set(header)):
        raise LabelFileError(path, [f"{path}:1: need a frame_id column and a label column or era,nationality,garment "
                                    "columns, or a Label Studio export (JSON, JSON-MIN or CSV)"])
    entries, unlabelled = [], 0
    for line, row in rows:
        if not row.get("label") and not row.get("garment"):
            unlabelled += 1  # not labelled yet: a TODO file is imported as far as it is done
            continue
        entries.append(_Entry(line, row["frame_id"], *(row.get(c, "") for c in ("label", *PARTS))))
    return entries, unlabelled


def _element_lines(text: str) -> list[int]:
    """The line on which each element of a top-level JSON list starts (for error messages)."""
    decoder, space = json.JSONDecoder(), re.compile(r"[\s,]*")
    position = text.index("[") + 1
    line, lines = 1 + text.count("\n", 0, position), []
    while True:
        start = space.match(text, position).end()
        if start >= len(text) or text[start] == "]":
            return lines
        line += text.count("\n", position, start)
        lines.append(line)
        _, position = decoder.raw_decode(text, start)
        line += text.count("\n", start, position)


def _read_label_studio_json(path: Path, text: str, problems: list[str]) -> tuple[list[_Entry], int]:
    """A Label Studio JSON export (a task per element, with all its annotations) or JSON-MIN export
    (a row per annotation), told apart by the first element."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise LabelFileError(path, [f"{path}:{e.lineno}: not JSON ({e.msg})"]) from None
    except RecursionError:
        raise LabelFileError(path, [f"{path}: JSON nested too deeply for a label file"]) from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise LabelFileError(path, [f"{path}: a number too long for a label file"]) from None
    if not isinstance(items, list):
        raise LabelFileError(path, [f"{path}:1: not a Label Studio export (a JSON list of tasks or JSON-MIN rows)"])
    lines = _element_lines(text)
    first = items[0] if items else {}
    if isinstance(first, dict) and "annotation_id" in first:
        return _read_label_studio_rows(path, list(zip(lines, items)), problems)
    if items and not (isinstance(first, dict) and {"data", "annotations", "completions"} & first.keys()):
        raise LabelFileError(path, [f"{path}:{lines[0]}: neither a Label Studio task (data, annotations) nor a "
                                    "JSON-MIN row (annotation_id): not a label file"])
    return _read_label_studio_tasks(path, zip(lines, items), problems)


def _read_label_studio_tasks(path: Path, tasks, problems: list[str]) -> tuple[list[_Entry], int]:
    """JSON export: per task, the annotation that counts (`_chosen`) of those not skipped."""
    entries, unlabelled = [], 0
    for line, task in tasks:
        done = _annotations_done(path, line, task, problems)
        if done is None:
            continue
        if not done:
            unlabelled += 1
            continue
        chosen = _chosen(done, "id", path, task.get("id"), problems)
        if chosen is None:
            continue
        results, where = chosen[1].get("result") or [], f"{path}:{line}: task {task.get('id')}"
        if not isinstance(results, list):
            problems.append(f"{where}: its annotation's result is not a list")
            continue
        entries.append(_entry(line, _frame(task["data"]), _result_choices(results, where, problems), where, problems))
    return entries, unlabelled


def _annotations_done(path: Path, line: int, task, problems: list[str]) -> list[tuple[int, dict]] | None:
    """A JSON task's (line, annotation) pairs that were submitted, not skipped; None, with a problem,
    when it is not a task. `completions` and `skipped`: their names before Label Studio 1.0."""
    annotations = task.get("annotations", task.get("completions", [])) if isinstance(task, dict) else None
    if not isinstance(annotations, list) or not isinstance(task.get("data"), dict):
        problems.append(f"{path}:{line}: not a Label Studio task (no data, or annotations not a list)")
        return None
    done = []
    for annotation in annotations:
        if not isinstance(annotation, dict):
            problems.append(f"{path}:{line}: task {task.get('id')}: an annotation that is not an object "
                            f"({reprlib.repr(annotation)})")
        elif not (annotation.get("was_cancelled") or annotation.get("skipped")):
            done.append((line, annotation))
    return done


def _result_choices(results: list, where: str, problems: list[str]) -> dict[str, list]:
    """Per label part, the `choices` of each of its results (the JSON export's shape)."""
    given: dict[str, list] = {}
    for result in results:
        if not isinstance(result, dict):
            problems.append(f"{where}: a result that is not an object ({reprlib.repr(result)})")
        elif result.get("type") == "choices" and result.get("from_name") in PARTS:
            value = result.get("value")
            choices = value.get("choices") if isinstance(value, dict) else None
            given.setdefault(result["from_name"], []).append(choices)
    return given


def _read_label_studio_rows(path: Path, rows: list[tuple[int, dict]],
                            problems: list[str]) -> tuple[list[_Entry], int]:
    """JSON-MIN or CSV export: a row per annotation not skipped, so one per annotator of a task, and
    one row without annotation_id for a task nobody annotated; per task, the row that counts (`_chosen`)."""
    tasks: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for line, row in rows:
        if not isinstance(row, dict) or "annotation_id" not in row:
            problems.append(f"{path}:{line}: not a Label Studio JSON-MIN row (no annotation_id)")
        else:
            tasks.setdefault((str(row.get("id")), _frame(row)), []).append((line, row))  # str: any id hashes
    entries, unlabelled = [], 0
    for (task, frame), task_rows in tasks.items():
        annotated = [(line, row) for line, row in task_rows if row["annotation_id"] not in (None, "")]
        if not annotated:
            unlabelled += 1
            continue
        chosen = _chosen(annotated, "annotation_id", path, task, problems)
        if chosen:
            line, row = chosen
            given = {part: _exported_choices(row[part]) for part in PARTS if row.get(part) not in (None, "")}
            entries.append(_entry(line, frame, given, f"{path}:{line}: task {task}", problems))
    return entries, unlabelled


def _decode_cells(row: dict) -> dict:
    """A Label Studio CSV row with its label parts as JSON-MIN has them: a part with several choices
    or results is written as JSON text."""
    def decoded(text: str):
        try:
            return json.loads(text) if text.startswith(("{", "[")) else text
        except (ValueError, RecursionError):
            return text  # then not a choice of the taxonomy either: reported as such
    return {**row, **{part: decoded(row[part]) for part in PARTS if part in row}}


def _exported_choices(value) -> list:
    """A JSON-MIN label part as `choices` lists, one per result: a string is one choice, {"choices":
    [...]} several, a list holds one of those per result (the shapes of `prettify_result` in
    Label Studio's converter)."""
    results = value if isinstance(value, list) else [value]
    return [[r] if isinstance(r, str) else r.get("choices") if isinstance(r, dict) else None for r in results]


def _entry(line: int, frame: str, given: dict[str, list], where: str, problems: list[str]) -> _Entry:
    """The entry of an annotation whose label parts `given` holds as `choices` lists, one per result:
    a part must have exactly one choice in all."""
    entry = _Entry(line, frame)
    for part, found in given.items():
        choices = [c for cs in found for c in cs] if all(isinstance(cs, list) for cs in found) else []
        if len(choices) != 1:
            problems.append(f"{where}: {len(choices) or 'no'} {part} choices, need one")
        else:
            setattr(entry, part, str(choices[0]).strip())
    return entry


def _frame(data: dict) -> str:
    """Tasks made by `mhmd sample` carry frame_id; others are known by their image file's name."""
    return str(data.get("frame_id") or Path(unquote(str(data.get("image") or ""))).stem)


def _chosen(annotations: list[tuple[int, dict]], id_key: str, path: Path, task, problems: list[str]):
    """The (line, annotation) that counts among a task's: a ground truth when one is marked (only the
    JSON export says so), else the latest (updated_at, else created_at; then the higher id). None,
    with a problem, when a time does not read and so the latest is unknown."""
    candidates = [a for a in annotations if a[1].get("ground_truth") is True] or annotations
    if len(candidates) == 1:
        return candidates[0]
    keys = []
    for line, annotation in candidates:
        time = _time(annotation)
        if time is None:
            value = annotation.get("updated_at") or annotation.get("created_at")
            problems.append(f"{path}:{line}: task {task}: annotation {annotation.get(id_key)} was changed at "
                            f"{reprlib.repr(value)}, not a time: which annotation is the latest is unknown")
            return None
        keys.append((time, _number(annotation.get(id_key))))
    return candidates[keys.index(max(keys))]


_NEVER = datetime.min.replace(tzinfo=timezone.utc)


def _time(annotation: dict) -> datetime | None:
    """When an annotation was last changed: ISO 8601 (seconds since 1970 before Label Studio 1.0),
    _NEVER when not given, None when not a time."""
    value = annotation.get("updated_at") or annotation.get("created_at")
    try:
        if value in (None, ""):
            return _NEVER
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, timezone.utc)
        time = datetime.fromisoformat(value) if isinstance(value, str) else None
    except (ValueError, OverflowError, OSError):
        return None
    return time if time is None or time.tzinfo else time.replace(tzinfo=timezone.utc)


def _number(value) -> int:
    """An annotation id as a number (a CSV gives text); -1 when there is none."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return -1


def check_label_file(path: str | Path) -> None:
    """The problems a label file has on its own (format, columns, task structure), found before any
    stage runs; `import_labels` checks its frames and labels against the work directory."""
    path, problems = Path(path), []
    _read_label_file(path, problems)
    if problems:
        raise LabelFileError(path, problems)


def _resolve(entry: _Entry, taxonomy: Taxonomy, known: dict) -> tuple[object, list[str]]:
    """The entry's taxonomy label (or None) and its problems; `known` is the film's metadata."""
    if entry.label:
        label = taxonomy.by_name(entry.label)
        if label is None:
            close = difflib.get_close_matches(entry.label, taxonomy.names, n=1)
            return None, [f"unknown label {entry.label!r}" + (f" (did you mean {close[0]}?)" if close else "")]
        clash = [f"label {label.name} but {part} {getattr(entry, part)!r}" for part in PARTS
                 if getattr(entry, part) and getattr(entry, part) != getattr(label, part)]
        if clash:
            return None, clash
    else:
        parts = {part: getattr(entry, part) or known.get(part) or "" for part in PARTS}
        missing = [part for part in PARTS if not parts[part]]
        if missing:
            return None, [f"no {' and no '.join(missing)} (and the movie metadata does not say)"]
        unknown = [f"unknown {part} {value!r}" for part, value in parts.items()
                   if value not in {getattr(l, part) for l in taxonomy.labels}]
        label = None if unknown else taxonomy.find(**parts)
        if label is None:
            return None, unknown or [f"{'/'.join(parts.values())} is not a label of the taxonomy"]
    conflicts = [f"{label.name} conflicts with the movie metadata ({part} {known[part]})"
                 for part in ("era", "nationality") if known.get(part) and known[part] != getattr(label, part)]
    return (None if conflicts else label), conflicts


@writes("workdir")
def import_labels(workdir: WorkDir, path: str | Path, taxonomy: Taxonomy,
                  movie_metadata: dict[str, dict] | None = None) -> dict:
    """Check a label file (a CSV, or a Label Studio JSON, JSON-MIN or CSV export) against the
    work directory and merge it into WORKDIR/label/human.parquet. Every problem is reported at
    once in a LabelFileError, and then nothing is written. Importing the same file again changes
    nothing; a corrected file replaces its own earlier labels, never another file's."""
    import pandas as pd

    path, problems = Path(path), []
    entries, unlabelled = _read_label_file(path, problems)
    everything = _named_frames(workdir, [entry.frame_id for entry in entries])
    frames, everything = passed_detection(everything).set_index("frame_id"), everything.set_index("frame_id")
    existing = read_human_labels(workdir)
    existing = existing.set_index("frame_id") if existing is not None else None
    source = str(path.resolve())
    rows, first_line = [], {}
    for entry in entries:
        where = f"{path}:{entry.line}: frame {entry.frame_id or '(no frame_id)'}"
        movie = frames.movie_id.get(entry.frame_id)
        if movie is None and entry.frame_id in everything.index:
            reason = everything.reject_reason.get(entry.frame_id)
            reason = reason if isinstance(reason, str) else "not through detection yet"  # null, not a reason
            problems.append(f"{where}: was not kept ({reason})")
        elif movie is None:
            problems.append(f"{where}: no such frame in the work directory")
        label, label_problems = _resolve(entry, taxonomy, (movie_metadata or {}).get(movie, {}))
        problems += [f"{where}: {p}" for p in label_problems]
        if entry.frame_id in first_line:
            problems.append(f"{where}: also on line {first_line[entry.frame_id]}")
            continue
        first_line[entry.frame_id] = entry.line
        if label is None or movie is None:
            continue
        if existing is not None and entry.frame_id in existing.index:
            old = existing.loc[entry.frame_id]
            if old.label != label.name and old.source != source:
                problems.append(f"{where}: {label.name} here, but {old.label} in {old.source}:{old.line}")
        rows.append({"frame_id": entry.frame_id, "label": label.name, "label_id": label.id,
                     "source": source, "line": entry.line})
    if problems:
        raise LabelFileError(path, problems)
    return _merge(workdir, existing, pd.DataFrame(rows, columns=HUMAN_SCHEMA.names), source, unlabelled)


# What a label file's frames are checked against: the manifest's columns (of the extract tables' first).
EXTRACT_COLUMNS = ["frame_id", "movie_id", "kept", "reject_reason", "flags"]
NAMED_COLUMNS = ["frame_id", "movie_id", "kept", "persons", "reject_reason"]


def _named_frames(workdir: WorkDir, frame_ids: list[str | None]) -> "pd.DataFrame":
    """The manifest's rows of these frames (those it has), read one movie at a time: a label file
    names a few of the frames, and only theirs are held."""
    wanted = pa.array(sorted({fid for fid in frame_ids if isinstance(fid, str)}), pa.string())
    rows = [movie.filter(pc.is_in(movie["frame_id"], value_set=wanted)).select(NAMED_COLUMNS)
            for movie in manifest_by_movie(workdir, before=LABEL, columns=EXTRACT_COLUMNS)]
    if not rows:
        return pa.table({name: pa.array([], MANIFEST_COLUMNS[name]) for name in NAMED_COLUMNS}).to_pandas()
    return pa.concat_tables(rows, promote_options="default").to_pandas()


def _merge(workdir: WorkDir, existing, new, source: str, unlabelled: int) -> dict:
    import pandas as pd

    new = new.set_index("frame_id")
    if existing is None:
        existing = new.iloc[:0]
    same = existing.label.reindex(new.index) == new.label
    changed = new.index.isin(existing.index) & ~same
    summary = {"file": source, "labelled": len(new), "new": int((~new.index.isin(existing.index)).sum()),
               "changed": int(changed.sum()), "unchanged": int(same.sum()), "unlabelled": unlabelled}
    if summary["new"] or summary["changed"]:  # an unchanged import leaves the table as it was, byte for byte
        merged = pd.concat([existing[~existing.index.isin(new.index[~same])], new[~same]]).sort_index()
        write_human_labels(workdir, merged.reset_index())
    summary["total"] = len(existing) + summary["new"]
    return summary
