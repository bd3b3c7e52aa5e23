"""`mhmd report`: one self-contained HTML page about a dataset, made from its work directory (the
whole funnel) or from a shard folder (what its index.json and shards hold).

The page works offline: inline CSS, no script, no font or address from elsewhere; plots (matplotlib,
Agg) and thumbnails are inline base64 images. Sections: the funnel (sampled -> quality -> persons ->
labeled -> in shards, per reject reason and per film), the labels laid out like the paper's Table 1
next to the paper's counts, the hue histogram of kept frames, thumbnails per label and per reject
reason, the labeler's validation metrics, and the settings. A stage that has not run gets a section
that says so.

It stays fast on large work directories: hue frames and thumbnails are evenly spread samples,
decoded at reduced size (JPEG's own downscaling), never every JPEG.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure

from . import __version__
from .detect import REASONS as PERSON_REASONS
from .errors import InputError
from .labeler import config_path, default_checkpoint, metrics_path
from .labels import passed_detection_mask
from .shards import INDEX, JPG, JSON, has_index, open_shard, read_index
from .manifest import manifest_by_movie
from .media import Crop, Sampling, decode_frames
from .quality import REASONS as QUALITY_REASONS
from .tables import EXTRACT, FUNNEL, movie_paths, read_human_labels
from .taxonomy import Taxonomy, load_taxonomy
from .workdir import WorkDir, atomic_write_bytes, read_json

HUE_FRAMES = 2000  # frames sampled for the hue histogram, at most
PER_LABEL = 8  # thumbnails per label
PER_REASON = 4  # example thumbnails per reject reason
THUMB = 160  # thumbnail's longer side, pixels
PACKAGES = ("numpy", "pandas", "pyarrow", "opencv-python", "torch", "torchvision", "ultralytics", "webdataset",
            "matplotlib")
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;padding:0 1em;color:#222;background:#fff}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#eee}td:first-child,th:first-child{text-align:left}
.cls{text-align:left;white-space:nowrap;margin-bottom:.3em}.paper{color:#777;font-size:.9em}
.note{color:#555;font-style:italic}
.grid{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:1em}
figure{margin:0;width:164px;font-size:.7em;word-break:break-all}figure img{display:block;max-width:160px}
.missing{width:160px;height:90px;background:#eee;color:#777;display:flex;align-items:center;justify-content:center}
#labels table{font-size:.8em}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
"""


class ReportError(InputError):
    """Nothing to report on; the message is one line and says what to do."""


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    body: str


def write_report(source: str | Path, out: str | Path, taxonomy: Taxonomy | None = None,
                 recipe: str | Path | None = None) -> Path:
    """Write the report on SOURCE, a work directory or a shard folder (one with index.json), to OUT.
    `recipe`: the pipeline recipe the dataset was built with, shown with the settings."""
    source, taxonomy = Path(source), taxonomy or load_taxonomy()
    if has_index(source):
        title, sections = f"shards {source.resolve()}", shard_dir_sections(source, taxonomy)
    else:
        workdir = WorkDir(source)
        title, sections = f"work directory {workdir.root}", workdir_sections(workdir, taxonomy, recipe)
    atomic_write_bytes(Path(out), page(title, sections).encode())
    return Path(out)


# -- html -----------------------------------------------------------------------------------------
def esc(value) -> str:
    return html.escape(str(value))


def number(n) -> str:
    return f"{int(n):,}"


def data_attrs(data: dict) -> str:
    """data-* attributes: the numbers a reader (or a test) can take from the page as they are."""
    return "".join(f' data-{key.replace("_", "-")}="{esc(value)}"' for key, value in data.items())


def table(header: list[str], rows: list[tuple[list[str], dict]]) -> str:
    """Cells are HTML already; each row comes with its data-* attributes."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(f"<tr{data_attrs(data)}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                   for cells, data in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def pre_json(obj) -> str:
    return f"<pre>{esc(json.dumps(obj, indent=1, sort_keys=True, default=str))}</pre>"


def page(title: str, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mhmd report: {esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>mhmd dataset report</h1><p>{esc(title)}</p>"
            f"<nav>{nav}</nav>{body}</body></html>")


# -- images ---------------------------------------------------------------------------------------
def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # Agg: no display, no GUI toolkit
    return figure


def plot_img(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    # No "Software" text chunk: it would carry matplotlib's web address into the page.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" alt="{esc(alt)}">'


def small_image(data: bytes | None, side: int) -> np.ndarray | None:
    """A JPEG decoded at thumbnail size: JPEG's own 1/2, 1/4 or 1/8 downscaling while decoding (a
    fraction of a full decode), then resized so the longer side is at most THUMB."""
    if not data:
        return None
    flag = next((flag for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                           (2, cv2.IMREAD_REDUCED_COLOR_2)) if side // factor >= THUMB),
                cv2.IMREAD_COLOR)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    return None if image is None else fit_thumbnail(image)


def fit_thumbnail(image: np.ndarray) -> np.ndarray:
    scale = THUMB / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def thumbnail(image: np.ndarray | None, caption: str) -> str:
    if image is None:
        picture = '<div class="missing">not readable</div>'
    else:
        data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
        picture = f'<img src="data:image/jpeg;base64,{base64.b64encode(data).decode()}" alt="{esc(caption)}">'
    return f"<figure>{picture}<figcaption>{esc(caption)}</figcaption></figure>"


def in_threads(function, items: list) -> list:
    """cv2's decoding and ffmpeg's processes work outside the GIL: threads run them in parallel."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(function, items))


def evenly(total: int, n: int) -> np.ndarray:
    """The positions of at most n of `total` rows, spread evenly over them."""
    if total <= n:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, n).round().astype(int))


# -- funnel ---------------------------------------------------------------------------------------
STEPS = ("sampled", "kept after quality", "kept after persons", "labeled", "in shards")


def funnel_masks(frames: pd.DataFrame) -> dict[str, pd.Series]:
    """Per step, which frames reached it."""
    after_persons = passed_detection_mask(frames)
    return {
        "sampled": pd.Series(True, index=frames.index),
        "kept after quality": ~frames.reject_reason.isin(QUALITY_REASONS),
        "kept after persons": after_persons,
        "labeled": after_persons & frames.label.notna(),
        "in shards": frames.split.notna(),
    }


def funnel_section(workdir: WorkDir, tally: "Tally") -> Section:
    counts = {step: tally.total(step) for step in STEPS}
    sampled = counts["sampled"]
    ran = {"kept after persons": bool(workdir.done("detect")), "labeled": tally.any_label,
           "in shards": bool(workdir.done("shard"))}
    rows = [([esc(step), number(n), f"{100 * n / sampled:.1f}%", "" if ran.get(step, True) else "not run yet"],
             {"step": step, "frames": n}) for step, n in counts.items()]
    figure = new_figure(7, 2.4)
    axes = figure.add_subplot()
    axes.barh(STEPS[::-1], [counts[step] for step in STEPS[::-1]], color="#4a7ab5")
    for y, step in enumerate(STEPS[::-1]):
        axes.text(counts[step], y, f" {counts[step]:,}", va="center", fontsize=8)
    axes.set_xlabel("frames")
    body = table(["step", "frames", "of sampled", "note"], rows) + plot_img(figure, "the funnel")
    body += reasons_table(tally, sampled) + films_table(workdir, tally) + failures(workdir)
    return Section("funnel", "Funnel", body)


def reason_order(present: set[str]) -> list[str]:
    known = [r for r in QUALITY_REASONS + PERSON_REASONS if r in present]
    return known + sorted(present - set(known))


def reason_stage(reason: str) -> str:
    return "quality" if reason in QUALITY_REASONS else "persons" if reason in PERSON_REASONS else "other"


def reasons_table(tally: "Tally", sampled: int) -> str:
    counts = tally.reasons()
    rows = [([esc(r), esc(reason_stage(r)), number(counts[r]), f"{100 * counts[r] / sampled:.1f}%"],
             {"reason": r, "frames": counts[r]}) for r in reason_order(set(counts))]
    if not rows:
        return note("No frame was rejected.")
    return "<h3>Rejected frames per reason</h3>" + table(["reason", "stage", "frames", "of sampled"], rows)


def films_table(workdir: WorkDir, tally: "Tally") -> str:
    files = {movie: path.name for movie, path in movie_paths(workdir).items()}
    reasons = reason_order(set(tally.reasons()))
    rows = []
    for movie, steps in tally.steps.items():
        cells = [f"{esc(movie)}<br><small>{esc(files.get(movie, ''))}</small>"]
        cells += [number(steps[s]) for s in STEPS] + [number(tally.rejected[movie][r]) for r in reasons]
        rows.append((cells, {"movie": movie}))
    return "<h3>Per film</h3>" + table(["film", *STEPS, *reasons], rows)


def failures(workdir: WorkDir) -> str:
    failed = [(stage, pid, info.get("reason")) for stage in FUNNEL for pid, info in workdir.failed(stage).items()]
    if not failed:
        return ""
    rows = [([esc(stage), esc(pid), esc(reason)], {"stage": stage}) for stage, pid, reason in failed]
    return "<h3>Failed partitions</h3>" + table(["stage", "partition", "reason"], rows)


# -- the work directory's frames, movie by movie ----------------------------------------------------
# The manifest is read one movie at a time, twice: once to count (Tally), once to pick the example
# frames the counts place (spread_examples); never whole, so the page costs the same memory at any size.
REPORT_COLUMNS = ["frame_id", "movie_id", "timestamp", "width", "height", "kept", "reject_reason", "flags", "jpeg"]
HUE = ("hue",)  # the example group of kept frames with a JPEG, for the hue histogram


def movie_tables(workdir: WorkDir) -> Iterator[tuple[str, pa.Table]]:
    """Each movie's manifest rows (of the columns the page uses), in the manifest's order."""
    for table in manifest_by_movie(workdir, columns=REPORT_COLUMNS):
        if table.num_rows:
            yield table["movie_id"][0].as_py(), table


def movie_frames(workdir: WorkDir) -> Iterator[tuple[str, pd.DataFrame]]:
    for movie, table in movie_tables(workdir):
        yield movie, table.to_pandas()


def example_groups(frames: pd.DataFrame) -> dict[tuple, np.ndarray]:
    """Positions (ascending) in `frames` of the frames the page shows examples of: kept with a JPEG
    (HUE), those that passed detection per label ("label", name; None: not labeled) and the rejected
    per reason ("reason", r). Grouped once per kind, not compared once per label: a pass over a
    film's frames per label cost the report a third of its time."""
    passed = passed_detection_mask(frames).to_numpy()
    labeled = frames.label.notna().to_numpy()
    groups = {HUE: np.flatnonzero(frames.kept.fillna(False).astype(bool).to_numpy() & frames.jpeg.notna().to_numpy()),
              ("label", None): np.flatnonzero(passed & ~labeled)}
    for kind, column, rows in (("label", "label", passed & labeled),
                               ("reason", "reject_reason", frames.reject_reason.notna().to_numpy())):
        at = np.flatnonzero(rows)
        values = frames[column].iloc[at]
        positions = values.groupby(values.to_numpy(), sort=False).indices  # value -> positions in `values`
        groups.update({(kind, value): at[i] for value, i in positions.items()})
    return groups


@dataclass
class Tally:
    """What the page counts of a work directory's frames, summed movie by movie: per movie (in the
    manifest's order) the frames that reached each funnel step, that were rejected per reason and
    that fall in each example group (`example_groups`); the labels and label sources of the frames
    that passed detection; whether any frame has a label."""
    steps: dict[str, Counter] = field(default_factory=dict)
    rejected: dict[str, Counter] = field(default_factory=dict)
    groups: dict[str, Counter] = field(default_factory=dict)
    labels: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    any_label: bool = False

    @classmethod
    def of(cls, workdir: WorkDir) -> "Tally":
        tally = cls()
        for movie, frames in movie_frames(workdir):
            tally.add(movie, frames)
        return tally

    def add(self, movie: str, frames: pd.DataFrame) -> None:
        masks = funnel_masks(frames)
        self.steps[movie] = Counter({step: int(mask.sum()) for step, mask in masks.items()})
        self.rejected[movie] = Counter(frames.reject_reason.dropna())
        self.groups[movie] = Counter({key: len(at) for key, at in example_groups(frames).items()})
        labeled = frames[masks["labeled"]]
        self.labels.update(labeled.label)
        self.sources.update(labeled.label_source.dropna())
        self.any_label |= bool(frames.label.notna().any())

    def total(self, step: str) -> int:
        return sum(steps[step] for steps in self.steps.values())

    def reasons(self) -> Counter:
        """Frames rejected per reason, over every movie."""
        return sum(self.rejected.values(), Counter())

    def group_size(self, key: tuple) -> int:
        return sum(groups[key] for groups in self.groups.values())


def spread_examples(workdir: WorkDir, tally: Tally, wanted: dict[tuple, int]) -> dict[tuple, pd.DataFrame]:
    """Per example group, `wanted` of its frames spread evenly over the whole group in the manifest's
    order (over films, then time): their places come from the tally, their rows from a second pass."""
    places = {key: evenly(tally.group_size(key), n) for key, n in wanted.items()}
    found: dict[tuple, list[pa.Table]] = {key: [] for key in wanted}
    before = Counter()  # per group, its frames in the movies passed
    for movie, table in movie_tables(workdir):
        groups = example_groups(table.to_pandas())
        for key, at in places.items():
            size = tally.groups.get(movie, Counter())[key]
            here = at[(at >= before[key]) & (at < before[key] + size)] - before[key]
            if len(here) and key in groups:
                group = groups[key]
                # Taken in Arrow, which copies the rows: pandas' rows of list columns are views of the
                # whole film's buffers, which an example kept every film of (a few MB a film).
                found[key].append(table.take(group[here[here < len(group)]]))  # fewer: changed since the tally
            before[key] += size
    return {key: pd.concat([part.to_pandas() for part in parts]) if parts else pd.DataFrame(columns=REPORT_COLUMNS)
            for key, parts in found.items()}


# -- labels (the paper's Table 1) -----------------------------------------------------------------
def imbalance(counts) -> str:
    """Largest / smallest non-empty class, with the two counts."""
    present = [n for n in counts if n]
    if not present:
        return "no classes"
    return f"{max(present) / min(present):,.0f} ({max(present):,} / {min(present):,})"


def label_table(counts: Counter, taxonomy: Taxonomy) -> str:
    """Rows era, columns nationality, each cell its garments with this dataset's count and the
    paper's; an era total column; the imbalance ratio of both."""
    eras = list(dict.fromkeys(label.era for label in taxonomy.labels))
    nations = list(dict.fromkeys(label.nationality for label in taxonomy.labels))
    total = sum(counts[label.name] for label in taxonomy.labels)
    paper_total = sum(label.paper_count or 0 for label in taxonomy.labels)

    def share(n: int, of: int) -> str:
        return f" ({100 * n / of:.1f}%)" if of else ""

    def cls(label) -> str:
        n, paper = counts[label.name], label.paper_count
        paper_text = f"{paper:,}{share(paper, paper_total)}" if paper is not None else "-"
        attrs = data_attrs({"label": label.name, "frames": n, "paper": "" if paper is None else paper})
        return (f'<div class="cls"{attrs}>{esc(label.garment)} <b>{n:,}</b>{share(n, total)}<br>'
                f'<span class="paper">paper {paper_text}</span></div>')

    rows = []
    for era in eras:
        labels = [label for label in taxonomy.labels if label.era == era]
        cells = [esc(era)]
        for nation in nations:
            here = [cls(label) for label in labels if label.nationality == nation]
            cells.append("".join(here) or "-")
        era_n, era_paper = sum(counts[label.name] for label in labels), sum(label.paper_count or 0 for label in labels)
        cells.append(f'<b>{era_n:,}</b><br><span class="paper">paper {era_paper:,}</span>')
        rows.append((cells, {"era": era, "frames": era_n, "paper": era_paper}))
    unknown = sum(n for name, n in counts.items() if taxonomy.by_name(name) is None)
    text = (f"<p>{total:,} labeled frames in {sum(1 for label in taxonomy.labels if counts[label.name])} of "
            f"{len(taxonomy)} classes; the paper: {paper_total:,} images. Imbalance (largest / smallest "
            f"non-empty class): this dataset {imbalance(counts[label.name] for label in taxonomy.labels)}, "
            f"the paper {imbalance(label.paper_count or 0 for label in taxonomy.labels)}.</p>")
    if unknown:
        text += note(f"{unknown:,} frames carry labels that are not in {taxonomy.source}.")
    return table(["era", *nations, "era total"], rows) + text


def labels_section(tally: "Tally", taxonomy: Taxonomy, workdir: WorkDir) -> Section:
    if not tally.labels:
        human = read_human_labels(workdir)
        why = ("no frame is labeled yet: label the sample (`mhmd sample`, `mhmd labels import`) and run the labeler"
               if human is None else "human labels were imported, but none is on a frame that passed detection")
        return Section("labels", "Labels", note(why))
    text = (f"<p>By people: {tally.sources['human']:,}; by the labeler: {tally.sources['model']:,}. "
            f"Cells: garment, this dataset's frames (share), the paper's images (share); taxonomy "
            f"{esc(taxonomy.source)}.</p>")
    return Section("labels", "Labels (the paper's Table 1)", text + label_table(tally.labels, taxonomy))


# -- hue ------------------------------------------------------------------------------------------
def hue_histogram(images: list[np.ndarray | None]) -> tuple[np.ndarray, int]:
    """OpenCV's H (0..179, 2 degrees a bin) of every pixel, weighted by its saturation S/255 (grey
    pixels, whose hue means nothing, count for nothing); normalised to sum 1. Returns (histogram,
    images used)."""
    histogram, used = np.zeros(180), 0
    for image in images:
        if image is None:
            continue
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        histogram += np.bincount(hsv[..., 0].ravel(), weights=hsv[..., 1].ravel() / 255.0, minlength=180)[:180]
        used += 1
    return (histogram / histogram.sum() if histogram.sum() else histogram), used


def hue_section(images: list[np.ndarray | None], what: str) -> Section:
    histogram, used = hue_histogram(images)
    if not used:
        return Section("hue", "Hue", note("no kept frame could be read: nothing to measure"))
    figure = new_figure(8, 2.6)
    axes = figure.add_subplot()
    degrees = np.arange(180) * 2
    axes.bar(degrees, histogram, width=2, align="edge", color=hsv_to_rgb(np.stack(
        [np.arange(180) / 180, np.ones(180), np.full(180, 0.9)], axis=1)))
    axes.set_xlim(0, 360)
    axes.set_xlabel("hue (degrees)")
    axes.set_ylabel("share of saturation")
    text = (f"<p>HSV hue of {used:,} {esc(what)}, computed on {THUMB}-pixel thumbnails; every pixel is weighted "
            f"by its saturation (S / 255), so grey, black and white pixels count for nothing.</p>"
            + note("The paper compares this curve with ImageNet's. ImageNet's hue distribution is not shipped "
                   "and cannot be computed offline, so it is not drawn here."))
    return Section("hue", "Hue histogram", text + plot_img(figure, "hue histogram"))


# -- thumbnails -----------------------------------------------------------------------------------
def frame_image(workdir: WorkDir, films: dict[str, dict], row) -> np.ndarray | None:
    """A frame at thumbnail size: from its JPEG, or, for a frame that was never encoded (rejected
    for quality), decoded again from its film at its timestamp, cropped as extract cropped it."""
    side = int(max(row.width, row.height))
    if isinstance(row.jpeg, str):
        return small_image(read_bytes(workdir.root / row.jpeg), side)
    film = films.get(row.movie_id)
    if not film or not Path(film["path"]).is_file():
        return None
    scale = THUMB / side
    size = (max(2, int(row.width * scale / 2) * 2), max(2, int(row.height * scale / 2) * 2))
    crop = Crop(**film["crop"]) if film.get("crop") else None
    frames = decode_frames(Path(film["path"]), Sampling("fps", 1.0), size, crop, start=float(row.timestamp),
                           duration=1.0, demuxer=film["probe"].get("demuxer"))
    first = next(frames, None)
    frames.close()  # stops ffmpeg
    return None if first is None else first[1].copy()


def caption(row) -> str:
    if isinstance(row.label_source, str):
        return f"{row.frame_id} ({row.label_source} {float(row.label_confidence):.2f})"
    return str(row.frame_id)


def grid(workdir: WorkDir, films: dict[str, dict], rows: pd.DataFrame, captions) -> str:
    images = in_threads(lambda row: frame_image(workdir, films, row), list(rows.itertuples()))
    return '<div class="grid">' + "".join(thumbnail(image, captions(row))
                                          for image, row in zip(images, rows.itertuples())) + "</div>"


def samples_section(workdir: WorkDir, films: dict[str, dict], tally: "Tally", examples: dict[tuple, pd.DataFrame],
                    taxonomy: Taxonomy) -> Section:
    if not tally.total("kept after persons"):
        return Section("samples", "Samples per label", note("no frame has passed detection yet"))
    body = ""
    for label in shown_labels(tally, taxonomy):
        title = label or "not labeled"
        body += f"<h3>{esc(title)} ({tally.group_size(('label', label)):,} frames)</h3>" + grid(
            workdir, films, examples[("label", label)], caption)
    return Section("samples", "Samples per label", body)


def shown_labels(tally: "Tally", taxonomy: Taxonomy) -> list[str | None]:
    """The labels of the taxonomy that frames which passed detection carry, in its order, then None
    (not labeled) when such frames are left."""
    return [label for label in [*taxonomy.names, None] if tally.group_size(("label", label))]


def rejected_section(workdir: WorkDir, films: dict[str, dict], tally: "Tally",
                     examples: dict[tuple, pd.DataFrame]) -> Section:
    body = note("Frames rejected for quality have no JPEG (extract encodes only the frames it keeps): their "
                "thumbnails are decoded again from the film, when it is still where it was extracted from.")
    reasons = tally.reasons()
    for reason in reason_order(set(reasons)):
        body += f"<h3>{esc(reason)} ({reasons[reason]:,} frames)</h3>" + grid(
            workdir, films, examples[("reason", reason)], lambda row: f"{row.frame_id} at {row.timestamp:.2f} s")
    return Section("rejected", "Rejected frames", body)


# -- labeler --------------------------------------------------------------------------------------
def confusion_plot(confusion: np.ndarray, names: list[str]) -> str:
    """Rows true, columns predicted; only the classes that occur in either."""
    present = np.flatnonzero(confusion.sum(0) + confusion.sum(1))
    matrix = confusion[np.ix_(present, present)]
    side = 2.5 + 0.35 * len(present)
    figure = new_figure(side + 2.5, side + 2)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    labels = [names[i] for i in present]
    axes.set_xticks(range(len(present)), labels, rotation=90, fontsize=7)
    axes.set_yticks(range(len(present)), labels, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(present) <= 20:
        for (i, j), n in np.ndenumerate(matrix):
            axes.text(j, i, str(n), ha="center", va="center", fontsize=7,
                      color="white" if n > matrix.max() / 2 else "black")
    return plot_img(figure, "confusion matrix")


def labeler_section(checkpoint: Path) -> Section:
    if not config_path(checkpoint).is_file():
        return Section("labeler", "Labeler", note(f"no labeler checkpoint at {checkpoint}"))
    config = read_json(config_path(checkpoint))
    metrics = read_json(metrics_path(checkpoint)) if metrics_path(checkpoint).is_file() else config["metrics"]
    summary = (f"<p>{esc(checkpoint)}: {esc(config['arch'])}, {config['image_size']} px, initial weights "
               f"{esc(config['initial_weights'])}; trained on {config['train_frames']:,} human-labeled frames, "
               f"validated on {metrics['samples']:,} ({esc(metrics['split'])}), epoch {metrics['epoch']} kept"
               f"{' (' + esc(metrics['selected']) + ')' if 'selected' in metrics else ''}.</p>"
               f'<p{data_attrs({"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})}>'
               f"Validation accuracy <b>{metrics['accuracy']:.3f}</b>, macro-F1 <b>{metrics['macro_f1']:.3f}</b> "
               f"(the paper reports at least 0.98 accuracy, on random frames).{majority_note(metrics)}</p>")
    rows = [([esc(name), f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", number(m["support"])],
             {"class": name}) for name, m in metrics["per_class"].items()]
    body = summary + table(["label", "precision", "recall", "F1", "support"], rows)
    if "confusion" in metrics:
        body += confusion_plot(np.asarray(metrics["confusion"]), config["label_names"])
    return Section("labeler", "Labeler", body)


def majority_note(metrics: dict) -> str:
    """The trivial labeler's scores beside the labeler's (checkpoints of earlier versions lack them)."""
    majority = metrics.get("majority")
    if majority is None:
        return ""
    return (f" Labelling every frame {esc(majority['label'])} scores accuracy {majority['accuracy']:.3f}, "
            f"macro-F1 {majority['macro_f1']:.3f}.")


# -- settings -------------------------------------------------------------------------------------
def versions() -> dict:
    """Of this machine, the one making the report."""
    found = {"mhmd_builder": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    try:
        found["ffmpeg"] = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        found["ffmpeg"] = "not found"
    return found


def distinct(summaries: dict[str, dict], key: str) -> list[dict]:
    """The different values of summaries' `key`, each with how many partitions had it."""
    values = Counter(json.dumps(s.get(key), sort_keys=True) for s in summaries.values())
    return [{"partitions": n, key: json.loads(value)} for value, n in values.items()]


def settings_section(parts: dict[str, object], recipe: str | Path | None) -> Section:
    body = ""
    if recipe:
        body += f"<h3>Recipe {esc(recipe)}</h3><pre>{esc(Path(recipe).read_text())}</pre>"
    for name, value in parts.items():
        body += f"<h3>{esc(name)}</h3>" + (pre_json(value) if value else note("not recorded"))
    body += "<h3>Versions</h3>" + note("of the machine that made this report: the work directory does not "
                                       "record the versions it was built with") + pre_json(versions())
    return Section("settings", "Settings", body)


def sample_seed(recipe: str | Path | None):
    """`mhmd sample --seed` is not recorded in the work directory: only a recipe says it."""
    if not recipe:
        return "not recorded (give the recipe)"
    from .build import load_pipeline  # it imports every stage (and torch, seconds): only for a recipe

    return load_pipeline(recipe).sample.seed


def workdir_settings(workdir: WorkDir, taxonomy: Taxonomy, index: dict | None,
                     recipe: str | Path | None) -> dict[str, object]:
    checkpoint = default_checkpoint(workdir)
    labeler = read_json(config_path(checkpoint)) if config_path(checkpoint).is_file() else {}
    return {
        "extract": distinct(workdir.done("extract"), "settings"),
        "detect": {"settings": distinct(workdir.done("detect"), "settings"),
                   "detector": distinct(workdir.done("detect"), "detector")},
        "labeler": {key: labeler[key] for key in ("settings", "initial_weights", "labels_digest", "taxonomy_source")
                    if key in labeler},
        "shard": index and index["settings"],
        "seeds": {"sample": sample_seed(recipe), "labeler": labeler.get("seed"),
                  "shard": index and index["settings"]["seed"]},
        "taxonomy": {"source": taxonomy.source, "sha256": taxonomy.sha256},
    }


# -- the two kinds of report ----------------------------------------------------------------------
def shard_index(workdir: WorkDir) -> tuple[Path | None, dict | None]:
    """The shard folder the work directory's last `mhmd shard` wrote, and its index, when still there."""
    outputs = {s.get("output") for s in workdir.done("shard").values()} - {None}
    for folder in sorted(outputs):
        if has_index(folder):
            return Path(folder), read_index(folder)
    return None, None


def shards_section(folder: Path | None, index: dict | None) -> Section:
    if index is None:
        return Section("shards", "Shards", note("no shards yet: run `mhmd shard` (or `mhmd build` with labels)"))
    tars = Counter(entry["split"] for entry in index["shards"])
    rows = [([esc(split), number(info["samples"]), number(info["movies"]), number(tars[split])],
             {"split": split, "samples": info["samples"]}) for split, info in index["splits"].items()]
    text = f"<p>{esc(folder)}: {len(index['shards'])} tars.</p>"
    return Section("shards", "Shards", text + table(["split", "samples", "films", "tars"], rows))


def workdir_sections(workdir: WorkDir, taxonomy: Taxonomy, recipe: str | Path | None) -> list[Section]:
    tally = Tally.of(workdir)
    if not tally.steps:
        raise ReportError(f"{workdir.root}: no extracted frames here: run `mhmd extract` or `mhmd build` first "
                          "(or give a shard folder, one with index.json)")
    paths = movie_paths(workdir)  # where each film is now
    films = {movie: {**summary, "path": str(paths[movie])} for movie, summary in workdir.done(EXTRACT).items()}
    wanted = {HUE: HUE_FRAMES, **{("label", label): PER_LABEL for label in shown_labels(tally, taxonomy)},
              **{("reason", reason): PER_REASON for reason in tally.reasons()}}
    examples = spread_examples(workdir, tally, wanted)
    hue_images = in_threads(lambda row: small_image(read_bytes(workdir.root / row.jpeg), max(row.width, row.height)),
                            list(examples[HUE].itertuples()))
    folder, index = shard_index(workdir)
    return [
        funnel_section(workdir, tally),
        labels_section(tally, taxonomy, workdir),
        hue_section(hue_images, f"kept frames (evenly spread over the {tally.group_size(HUE):,} kept)"),
        samples_section(workdir, films, tally, examples, taxonomy),
        rejected_section(workdir, films, tally, examples),
        labeler_section(default_checkpoint(workdir)),
        shards_section(folder, index),
        settings_section(workdir_settings(workdir, taxonomy, index, recipe), recipe),
    ]


def first_shard(folder: Path, index: dict) -> list[tuple[dict, np.ndarray | None]]:
    """(json, thumbnail-size image) of up to HUE_FRAMES samples of the index's first tar."""
    if not index["shards"]:
        return []
    samples = []
    for sample in open_shard(folder / index["shards"][0]["name"]):  # imports webdataset, and torch (seconds)
        meta = json.loads(sample[JSON])
        samples.append((meta, small_image(sample.get(JPG), max(meta["width"], meta["height"]))))
        if len(samples) == HUE_FRAMES:
            break
    return samples


def shard_samples_section(samples: list[tuple[dict, np.ndarray | None]], name: str, taxonomy: Taxonomy) -> Section:
    by_label: dict[str | None, list] = {}
    for meta, image in samples:
        by_label.setdefault(meta.get("label"), []).append((meta, image))
    body = note(f"From the first tar, {name} (shards mix films, so its first samples are a fair draw).")
    known = [label for label in taxonomy.names if label in by_label]
    others = sorted(label for label in by_label if label not in known and label is not None)
    for label in known + others + ([None] if None in by_label else []):
        group = by_label[label]
        figures = "".join(thumbnail(image, f"{meta['frame_id']} ({meta.get('label_source')})")
                          for meta, image in group[:PER_LABEL])
        body += f"<h3>{esc(label or 'not labeled')} ({len(group)} in this tar)</h3><div class=\"grid\">{figures}</div>"
    return Section("samples", "Samples per label", body)


def split_labels_table(index: dict) -> str:
    splits = list(index["splits"])
    labels = sorted({name for info in index["splits"].values() for name in info["labels"]})
    rows = [([esc(name)] + [number(index["splits"][s]["labels"].get(name, 0)) for s in splits],
             {"split_label": name, **{s: index["splits"][s]["labels"].get(name, 0) for s in splits}})
            for name in labels]
    return "<h3>Per split</h3>" + table(["label", *splits], rows)


def shard_dir_sections(folder: Path, taxonomy: Taxonomy) -> list[Section]:
    index = read_index(folder)
    counts = sum((Counter(info["labels"]) for info in index["splits"].values()), Counter())
    labels = label_table(counts, taxonomy) + split_labels_table(index) if counts else note("the shards hold no labels")
    if index.get("taxonomy_sha256") != taxonomy.sha256:
        labels = note(f"{INDEX} was written with another taxonomy (SHA-256 {index.get('taxonomy_sha256')}) than "
                      f"{taxonomy.source}: give that one (--taxonomy)") + labels
    samples = first_shard(folder, index)
    name = index["shards"][0]["name"] if index["shards"] else "none"
    relabel = index.get("relabel")
    parts = {"shard": index["settings"], "taxonomy": {"sha256": index.get("taxonomy_sha256")}, "relabel": relabel}
    return [
        Section("funnel", "Funnel", note("The funnel (frames sampled, rejected for quality and for persons, labeled) "
                                         "needs the work directory: `mhmd report -w WORKDIR -o report.html`. "
                                         f"This page is made from {INDEX} and the shards alone.")),
        shards_section(folder, index),
        Section("labels", "Labels (the paper's Table 1)", labels),
        hue_section([image for _, image in samples], f"frames of the first tar, {name}"),
        shard_samples_section(samples, name, taxonomy),
        labeler_section(Path(relabel["checkpoint"])) if relabel else
        Section("labeler", "Labeler", note("the labeler's metrics are in the work directory (or, for relabelled "
                                           "shards, beside the checkpoint)")),
        settings_section(parts, None),
    ]
