"""`mhmd demo`: make short films with ffmpeg from photos that ship inside ultralytics' package
(nothing downloaded) and build a dataset from them with pipelines/demo.yaml.

The films mix what a history film holds: colour scenes worth keeping, and black-and-white
flashbacks, sepia grading, fades to black, out-of-focus shots and letterbox bars that must go.
The demo plays the person who labels the sample: it knows what each second of its films shows.
"""
from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import ffmpeg
import numpy as np

from .build import PIPELINES, BuildResult, build, load_pipeline
from .detect import DetectSettings
from .media import require_ffmpeg
from .persons import DetectorError, resolve_weights
from .report import write_report
from .workdir import WorkDir, locked

log = logging.getLogger(__name__)

SIZE, RATE = "640x360", 24
SEPIA = dict(rr=0.393, rg=0.769, rb=0.189, gr=0.349, gg=0.686, gb=0.168, br=0.272, bg=0.534, bb=0.131)


@dataclass(frozen=True)
class Segment:
    """`seconds` of a source passed through `filters` [(name, kwargs), ...]. The source is a lavfi
    generator (`testsrc2`, `color=c=black`) or `photo:NAME`, a photo shipped inside ultralytics'
    package, filmed with a slow zoom. `label`: what a person labelling the segment's frames says."""

    source: str
    seconds: float
    filters: tuple = ()
    label: str | None = None


def photo_path(name: str) -> Path:
    from ultralytics.utils import ASSETS

    return Path(ASSETS) / name


def _source(segment: Segment, size: str):
    """The segment's pictures before its own filters."""
    w, h = size.split("x")
    if not segment.source.startswith("photo:"):
        return ffmpeg.input(f"{segment.source}:size={size}:rate={RATE}", f="lavfi", t=segment.seconds)
    frames = round(segment.seconds * RATE)
    return (ffmpeg.input(str(photo_path(segment.source[6:])), loop=1, framerate=RATE, t=segment.seconds)
            .filter("scale", w, h, force_original_aspect_ratio="decrease")
            .filter("pad", w, h, "(ow-iw)/2", "(oh-ih)/2", color="gray")
            .filter("zoompan", z=f"1+0.5*on/{frames}", x="iw/2-iw/zoom/2", y="ih/2-ih/zoom/2", d=1,
                    s=size, fps=RATE))


def make_film(path: Path, segments: list[Segment], size: str = SIZE, pad_to: str | None = None) -> Path:
    """Concatenate the segments into one H.264 film; `pad_to` adds letterbox bars."""
    # ffmpeg-python merges identical sources into one node: a source used twice must be split.
    outputs = {}
    for key, n in Counter((s.source, s.seconds) for s in segments).items():
        source = _source(Segment(*key), size)
        outputs[key] = iter([source] if n == 1 else [source.split()[i] for i in range(n)])
    rendered = []
    for segment in segments:
        stream = next(outputs[(segment.source, segment.seconds)])
        for name, kwargs in segment.filters:
            stream = stream.filter(name, **kwargs)
        rendered.append(stream.filter("setsar", 1))
    stream = ffmpeg.concat(*rendered)
    if pad_to:
        w, h = pad_to.split("x")
        stream = stream.filter("pad", w, h, "(ow-iw)/2", "(oh-ih)/2", color="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    # bitexact: no random container ids or dates, so the same film is the same bytes (and movie id)
    (stream.output(str(path), vcodec="libx264", pix_fmt="yuv420p", preset="veryfast", g=RATE * 2, fflags="+bitexact")
     .global_args("-nostdin", "-hide_banner", "-loglevel", "error").overwrite_output().run())
    return path


def person_scene(rng: np.random.Generator, w: int = 640, h: int = 360) -> np.ndarray:
    """A colourful generated scene: a two-colour backdrop, coloured blocks, and a few 'persons'
    (skin-toned head, coloured clothes), slightly soft and noisy like a camera picture."""
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    top, bottom = rng.integers(30, 230, (2, 3))
    img = np.ascontiguousarray(np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).astype(np.uint8))
    for _ in range(10):
        p, q = rng.integers(0, (w, h), (2, 2))
        cv2.rectangle(img, tuple(map(int, p)), tuple(map(int, q)), tuple(map(int, rng.integers(0, 256, 3))), -1)
    for _ in range(rng.integers(1, 4)):
        x, y, s = (int(v) for v in rng.integers((w // 8, h // 3, h // 8), (7 * w // 8, h // 2, h // 4)))
        cv2.rectangle(img, (x - s // 3, y), (x + s // 3, y + 2 * s), tuple(map(int, rng.integers(0, 256, 3))), -1)
        skin = tuple(int(c) for c in rng.integers((70, 100, 150), (140, 170, 235)))
        cv2.ellipse(img, (x, y - s // 3), (s // 4, s // 3), 0, 0, 360, skin, -1)
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


FORMAL, INFORMAL = "during_ww2/britain_france/formal", "during_ww2/britain_france/informal"
DEMO_FILMS = {
    "Colour, flashback and fades (1944).mp4": [
        Segment("photo:zidane.jpg", 4, label=FORMAL),  # colour, two persons close up
        Segment("photo:bus.jpg", 3, (("hue", {"s": 0}),)),  # black-and-white flashback
        Segment("photo:zidane.jpg", 3, (("colorchannelmixer", SEPIA),)),  # sepia grading
        Segment("color=c=black", 2),  # fade
        Segment("photo:bus.jpg", 3, (("gblur", {"sigma": 8}),)),  # out of focus
        Segment("photo:bus.jpg", 4, label=INFORMAL),  # colour, persons walking
    ],
    "Scope. Ära – letterboxed.mkv": [
        Segment("mandelbrot=maxiter=64", 4),  # colourful, sharp, nobody in it
        Segment("photo:zidane.jpg", 4, label=FORMAL),
    ],
    "Street, 1945.mp4": [
        Segment("photo:bus.jpg", 4, (("hue", {"h": 25}),), label=INFORMAL),  # another grading
        Segment("photo:zidane.jpg", 3, (("eq", {"saturation": 1.4}),), label=FORMAL),
    ],
}


def make_demo_films(folder: Path) -> list[Path]:
    require_ffmpeg()
    films = []
    for name, segments in DEMO_FILMS.items():
        pad = "640x360" if "letterboxed" in name else None
        films.append(make_film(folder / name, segments, size="640x272" if pad else SIZE, pad_to=pad))
    return films


def demo_detector(settings: DetectSettings) -> DetectSettings:
    """YOLO when its weights can be had (downloaded, or in the cache), else OpenCV's detector."""
    try:
        return replace(settings, model=resolve_weights(settings.model))
    except DetectorError as e:
        log.info(f"notice: {e}; this demo uses the OpenCV detector instead")
        return replace(settings, detector="opencv")


def segment_at(segments: list[Segment], timestamp: float) -> Segment:
    end = 0.0
    for segment in segments:
        end += segment.seconds
        if timestamp < end:
            return segment
    return segments[-1]


def label_sample(todo: Path, workdir: WorkDir, labelled: Path) -> Path:
    """Fill the sample's label column with what the demo films show at each frame's time."""
    films = {movie: DEMO_FILMS[Path(s["path"]).name] for movie, s in workdir.done("extract").items()}
    with open(todo, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["label"] = segment_at(films[row["movie_id"]], float(row["timestamp"])).label or ""
    with open(labelled, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labelled


def run_demo(out: Path, workers: int | None = None) -> BuildResult:
    """Make the films in OUT/films and build: work directory OUT/work, shards OUT/shards. The first
    build stops at the sample to label; the demo labels it (OUT/labels.csv) and builds again; then
    the dataset report, OUT/report.html. The work directory stays locked throughout: another
    command writing it between the two builds would change what the demo labels."""
    workdir = WorkDir(out / "work")
    with locked(workdir.root):
        films = make_demo_films(out / "films")
        pipeline = load_pipeline(PIPELINES / "demo.yaml")
        pipeline = replace(pipeline, detect=demo_detector(pipeline.detect))
        result = build(pipeline, films, workdir, out / "shards", workers=workers)
        if result.needs_labels:
            labels = label_sample(result.needs_labels, workdir, out / "labels.csv")
            result = build(pipeline, films, workdir, out / "shards", workers=workers, labels=str(labels))
        write_report(workdir.root, out / "report.html", recipe=PIPELINES / "demo.yaml")
    return result
