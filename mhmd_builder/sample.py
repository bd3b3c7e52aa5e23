"""`mhmd sample`: which frames people should label, as a CSV or a Label Studio project.

The first round is a stratified sample of the frames that passed detection: every film gets its
share, and inside a film the picks are spread over time (consecutive frames of a shot look alike,
so a plain random sample would waste people's time on near-duplicates). Later rounds pick the
frames the labeler is least sure of. Frames already labelled by a person are never picked again.

Label Studio: the tasks point at the JPEGs through Label Studio's local-files serving, by their
path relative to the work directory. Start Label Studio with
    LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<WORKDIR>
create a project with the written labeling config (<out>.xml), add a "Local files" source storage
with the absolute path <WORKDIR>/frames (it grants access to the files; do not sync it, which would
make a second, bare task per JPEG) and import the tasks JSON. Export the annotations as JSON, JSON-MIN
or CSV for `mhmd labels import`.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError
from .labels import PARTS, passed_detection
from .manifest import manifest_by_movie
from .tables import LABEL, read_human_labels
from .taxonomy import Taxonomy
from .workdir import WorkDir, atomic_write_bytes

CSV_COLUMNS = ["frame_id", "image", "movie_id", "timestamp", "label", *PARTS]
FORMATS = ("csv", "label-studio")


# The manifest's columns a sample is drawn from (no score, no list), of the extract tables' first.
EXTRACT_COLUMNS = ["frame_id", "movie_id", "timestamp", "kept", "reject_reason", "flags", "jpeg"]
COLUMNS = ["frame_id", "movie_id", "timestamp", "kept", "persons", "jpeg", "label_confidence"]


def _films(workdir: WorkDir) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Per film with frames that passed detection, in the manifest's order: those frames, and those
    of them nobody has labelled yet. One film's frames at a time (`manifest_by_movie`); InputError
    when no frame has passed detection."""
    human = read_human_labels(workdir)
    labelled = pa.array(human.frame_id.unique() if human is not None else [], pa.string())
    found = False
    for table in manifest_by_movie(workdir, before=LABEL, columns=EXTRACT_COLUMNS):
        frames = table.select(COLUMNS).append_column("labelled", pc.is_in(table["frame_id"], value_set=labelled))
        frames = passed_detection(frames.to_pandas())
        if len(frames):
            found = True
            yield frames.drop(columns="labelled"), frames[~frames.labelled].drop(columns="labelled")
    if not found:
        raise InputError(f"{workdir.root}: no frame has passed detection yet: run `mhmd detect` first")


def sample_frames(workdir: WorkDir, fraction: float = 0.01, seed: int = 0, minimum: int = 1,
                  movie_metadata: dict[str, dict] | None = None) -> pd.DataFrame:
    """About `fraction` of each film's frames that passed detection (at least `minimum` per film),
    spread evenly over the film's running time, drawn from the frames not labelled yet.
    The same work directory and seed give the same sample."""
    if not 0 < fraction <= 1:
        raise InputError(f"fraction must be in (0, 1], not {fraction}")
    picks = []
    for frames, film in _films(workdir):
        if film.empty:
            continue
        movie = film.movie_id.iat[0]
        share = int(fraction * len(frames) + 0.5)  # of the whole film: rounds add up
        count = min(len(film), max(minimum, share))
        # One generator per film: adding a film to the work directory leaves the others' picks alone.
        rng = np.random.default_rng([seed, zlib.crc32(movie.encode())])
        picks.append(_spread(film, count, rng))
    return _to_sample(workdir, pd.concat(picks) if picks else pd.DataFrame(columns=COLUMNS), movie_metadata)


def _spread(film: pd.DataFrame, count: int, rng: np.random.Generator) -> pd.DataFrame:
    """`count` frames: the film, in time order, cut into `count` equal runs, one random frame of each."""
    film = film.sort_values(["timestamp", "frame_id"])
    strata = np.array_split(np.arange(len(film)), count) if count else []
    return film.iloc[[stratum[rng.integers(len(stratum))] for stratum in strata]]


def uncertain_frames(workdir: WorkDir, count: int, movie_metadata: dict[str, dict] | None = None) -> pd.DataFrame:
    """The `count` model-labelled frames with the lowest label confidence (the next labeling round)."""
    predictions = workdir.read_table(LABEL)
    if predictions is None:
        raise InputError(f"{workdir.root}: no model labels yet: run `mhmd labeler predict` first")
    open_frames = pd.concat([film for _, film in _films(workdir)])
    model = predictions[predictions.label_source == "model"][["frame_id", "label_confidence"]]
    picked = (open_frames.drop(columns="label_confidence", errors="ignore").merge(model, on="frame_id")
              .sort_values(["label_confidence", "frame_id"]).head(count))
    return _to_sample(workdir, picked, movie_metadata)


def _to_sample(workdir: WorkDir, frames: pd.DataFrame, movie_metadata: dict[str, dict] | None) -> pd.DataFrame:
    """The sample's columns: empty label columns, era and nationality filled where the film's are known."""
    known = movie_metadata or {}
    sample = pd.DataFrame({
        "frame_id": frames.frame_id.astype(str),
        "image": [str(workdir.root / jpeg) for jpeg in frames.jpeg],
        "jpeg": frames.jpeg.astype(str),
        "movie_id": frames.movie_id.astype(str),
        "timestamp": frames.timestamp.astype(float),
        "label": "",
        **{part: [(known.get(m) or {}).get(part) or "" for m in frames.movie_id] for part in PARTS},
    })
    if "label_confidence" in frames:
        sample["label_confidence"] = frames.label_confidence.to_numpy()
    return sample.reset_index(drop=True)


def write_sample(sample: pd.DataFrame, out: str | Path, format: str, taxonomy: Taxonomy) -> list[Path]:
    """Write the sample; returns the files written. csv: `out` alone. label-studio: `out` is the
    tasks JSON, and the labeling config goes beside it with the suffix .xml."""
    out = Path(out)
    if format == "csv":
        atomic_write_bytes(out, sample[CSV_COLUMNS].to_csv(index=False).encode())
        return [out]
    if format != "label-studio":
        raise InputError(f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
    config = out.with_suffix(".xml")
    if config == out:
        raise InputError(f"{out}: the tasks file must not end in .xml (its config is written to {config})")
    tasks = [_task(row) for row in sample.itertuples(index=False)]
    atomic_write_bytes(out, json.dumps(tasks, indent=1).encode())
    atomic_write_bytes(config, labeling_config(taxonomy).encode())
    return [out, config]


def _task(row) -> dict:
    task = {"data": {"image": f"/data/local-files/?d={quote(row.jpeg)}", "frame_id": row.frame_id,
                     "movie_id": row.movie_id, "timestamp": row.timestamp}}
    # What the movie metadata says arrives as a pre-annotation the annotator only has to accept.
    known = [{"from_name": part, "to_name": "image", "type": "choices", "value": {"choices": [getattr(row, part)]}}
             for part in ("era", "nationality") if getattr(row, part)]
    if known:
        task["predictions"] = [{"model_version": "movie metadata", "score": 1.0, "result": known}]
    return task


def labeling_config(taxonomy: Taxonomy) -> str:
    """A Label Studio labeling config: the image and one single-choice group per label part, each
    required, so Label Studio refuses to submit a task with a part left out."""
    lines = ["<View>", '  <Image name="image" value="$image" zoom="true"/>']
    for part in PARTS:
        values = list(dict.fromkeys(getattr(label, part) for label in taxonomy.labels))
        lines += [f'  <Header value="{part}"/>',
                  f'  <Choices name="{part}" toName="image" choice="single-radio" showInline="true" required="true">']
        lines += [f"    <Choice value={quoteattr(value)}/>" for value in values]
        lines.append("  </Choices>")
    return "\n".join(lines + ["</View>", ""])
