"""The label taxonomy: data, not code. MHMD's 42 labels (era x nationality x garment, with the
paper's image counts) ship in data_manifests/mhmd_taxonomy.csv; a user may give their own CSV with
the same columns and other eras, nations or garments.

Columns: id (0..n-1, the class index), name (`era/nationality/garment`), era, nationality,
garment, paper_count (optional: the image count the paper reports for the label).
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from . import shipped
from .errors import InputError

DEFAULT_TAXONOMY = shipped("data_manifests/mhmd_taxonomy.csv")
MHMD_TOTAL = 1_353_166  # images in MHMD: the paper's counts must add up to this
COLUMNS = ("id", "name", "era", "nationality", "garment")


class TaxonomyError(InputError):
    """A taxonomy file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    era: str
    nationality: str
    garment: str
    paper_count: int | None = None


@dataclass(frozen=True)
class Taxonomy:
    labels: tuple[Label, ...]
    source: str
    sha256: str  # of the file's bytes: a checkpoint records it and refuses any other taxonomy

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    def by_name(self, name: str) -> Label | None:
        return self._index.get(name)

    def find(self, era: str, nationality: str, garment: str) -> Label | None:
        return self._index.get(f"{era}/{nationality}/{garment}")

    def consistent_with(self, era: str | None = None, nationality: str | None = None) -> list[int]:
        """Ids of the labels a frame can have when its film's era and/or nationality are known."""
        return [label.id for label in self.labels
                if (era is None or label.era == era) and (nationality is None or label.nationality == nationality)]

    @cached_property
    def _index(self) -> dict[str, Label]:
        """name -> label, made once (the labels are a tuple): shard looks up a label for every frame."""
        return {label.name: label for label in self.labels}


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Read and validate a taxonomy CSV (the shipped MHMD one by default)."""
    path = Path(path) if path else DEFAULT_TAXONOMY
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TaxonomyError(f"{path}: cannot read ({e.strerror})") from None
    reader = csv.DictReader(data.decode("utf-8-sig").splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise TaxonomyError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(COLUMNS)})")
    labels = [_parse_row(row, path, line) for line, row in enumerate(reader, start=2)]
    _validate(labels, path)
    return Taxonomy(tuple(labels), str(path), hashlib.sha256(data).hexdigest())


def _parse_row(row: dict, path: Path, line: int) -> Label:
    try:
        label_id = int(row["id"])
        count = int(row["paper_count"]) if row.get("paper_count") not in (None, "") else None
    except ValueError:
        raise TaxonomyError(f"{path}:{line}: id and paper_count must be whole numbers") from None
    era, nationality, garment = (row[c].strip() for c in ("era", "nationality", "garment"))
    name = row["name"].strip()
    if not (era and nationality and garment):
        raise TaxonomyError(f"{path}:{line}: era, nationality and garment must not be empty")
    if name != f"{era}/{nationality}/{garment}":
        raise TaxonomyError(f"{path}:{line}: name {name!r} is not {era}/{nationality}/{garment}")
    return Label(label_id, name, era, nationality, garment, count)


def _validate(labels: list[Label], path: Path) -> None:
    if not labels:
        raise TaxonomyError(f"{path}: no labels")
    ids, names = [label.id for label in labels], [label.name for label in labels]
    if sorted(ids) != list(range(len(labels))):
        raise TaxonomyError(f"{path}: ids must be 0..{len(labels) - 1}, each once (they are class indices)")
    if ids != sorted(ids):
        raise TaxonomyError(f"{path}: rows must be in id order")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TaxonomyError(f"{path}: duplicate label names: {', '.join(duplicates)}")
    counts = [label.paper_count for label in labels]
    if path.resolve() == DEFAULT_TAXONOMY and sum(c or 0 for c in counts) != MHMD_TOTAL:
        raise TaxonomyError(f"{path}: paper counts add up to {sum(c or 0 for c in counts):,}, not {MHMD_TOTAL:,}")
