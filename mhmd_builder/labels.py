"""Human labels: reading a filled CSV or a Label Studio export, checking every line against the
taxonomy and the frames that passed detection, and merging them into WORKDIR/label/human.parquet
(tables.HUMAN_SCHEMA: frame_id, label, label_id, source file, line); movie metadata files."""
from __future__ import annotations

import csv
import difflib
import io
import json
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote
from typing import TYPE_CHECKING

import pyarrow as pa

from .errors import InputError, listing
from .manifest import manifest
from .tables import EXTRACT, HUMAN_SCHEMA, LABEL, human_labels_path, movie_paths, read_human_labels
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
    return frames[frames.kept.fillna(False).astype(bool) & frames.persons.notna()].reset_index(drop=True)


# -- problems, reported all together --------------------------------------------------------------
class LabelFileError(InputError):
    """A label or movie metadata file with problems; `.problems` lists each as `file:line: problem`."""

    def __init__(self, path, problems: list[str], consequence: str = "nothing imported"):
        # In file order: each problem reads `<path>:<line>: ...` (line-less ones come first).
        self.path = str(path)
        self.problems = sorted(problems, key=lambda p: int(re.match(r"\d*", p[len(self.path) + 1:])[0] or 0))
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"{path}: {count}, {consequence}\n" + listing(self.problems))


def _read_csv(path: Path, problems: list[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line, row) pairs, values stripped; rows with the wrong number of fields become
    problems. Lines are the file's own (a quoted field may span lines: its row's last line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelFileError(path, [f"{path}: cannot read ({e})"]) from None
    reader = csv.reader(io.StringIO(text, newline=""))
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


def _read_label_csv(path: Path, problems: list[str]) -> tuple[list[_Entry], int]:
    header, rows = _read_csv(path, problems)
    if "frame_id" not in header or not ({"label", "garment"} & set(header)):
        raise LabelFileError(path, [f"{path}:1: need a frame_id column and a label column "
                                    "or era,nationality,garment columns"])
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
    position, line, lines = text.index("[") + 1, 1, []
    while True:
        start = space.match(text, position).end()
        if start >= len(text) or text[start] == "]":
            return lines
        line += text.count("\n", position, start)
        lines.append(line)
        _, position = decoder.raw_decode(text, start)
        line += text.count("\n", start, position)


def _read_label_studio(path: Path, problems: list[str]) -> tuple[list[_Entry], int]:
    """A Label Studio JSON export: per task, the latest annotation that was not cancelled (skipped)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        tasks = json.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise LabelFileError(path, [f"{path}: cannot read ({e})"]) from None
    except json.JSONDecodeError as e:
        raise LabelFileError(path, [f"{path}:{e.lineno}: not JSON ({e.msg})"]) from None
    if not isinstance(tasks, list):
        raise LabelFileError(path, [f"{path}:1: not a Label Studio JSON export (a list of tasks)"])
    entries, unlabelled = [], 0
    for line, task in zip(_element_lines(text), tasks):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not isinstance(task.get("annotations", []), list):
            problems.append(f"{path}:{line}: not a Label Studio task (no data, or annotations not a list)")
            continue
        # Tasks made by `mhmd sample` carry frame_id; others are known by their image file's name.
        frame = str(data.get("frame_id") or Path(unquote(str(data.get("image", "")))).stem)
        done = [a for a in task.get("annotations", []) if isinstance(a, dict) and not a.get("was_cancelled")]
        if not done:
            unlabelled += 1
            continue
        latest = max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
        entry, where = _Entry(line, frame), f"{path}:{line}: task {task.get('id')}"
        results = latest.get("result") or []
        if not isinstance(results, list):
            problems.append(f"{where}: its annotation's result is not a list")
            continue
        for result in results:
            if not isinstance(result, dict):
                problems.append(f"{where}: a result that is not an object ({reprlib.repr(result)})")
            elif result.get("type") == "choices" and result.get("from_name") in PARTS:
                value = result.get("value")
                choices = value.get("choices") if isinstance(value, dict) else None
                if not isinstance(choices, list) or len(choices) != 1:
                    count = len(choices) if isinstance(choices, list) else "no"
                    problems.append(f"{where}: {count} {result['from_name']} choices, need one")
                else:
                    setattr(entry, result["from_name"], str(choices[0]).strip())
        entries.append(entry)
    return entries, unlabelled


def _read_label_file(path: Path, problems: list[str]) -> tuple[list[_Entry], int]:
    """A CSV, or a Label Studio JSON export when the name ends in .json."""
    return (_read_label_studio if path.suffix.lower() == ".json" else _read_label_csv)(path, problems)


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
    """Check a label file (CSV, or a Label Studio JSON export when it ends in .json) against the
    work directory and merge it into WORKDIR/label/human.parquet. Every problem is reported at
    once in a LabelFileError, and then nothing is written. Importing the same file again changes
    nothing; a corrected file replaces its own earlier labels, never another file's."""
    import pandas as pd

    path, problems = Path(path), []
    entries, unlabelled = _read_label_file(path, problems)
    everything = manifest(workdir, before=LABEL)
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
