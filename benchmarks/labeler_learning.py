"""Labeler learning: does the labeler, trained on 1% of the frames, beat the majority class on films
it has never seen?

    uv run python benchmarks/labeler_learning.py [--quick] [--keep DIR | --rerun DIR] [--fraction 0.01]
                                                 [--seed S] [--input frame|persons] [--epochs N]
                                                 [--image-size PX] [--pseudo-label-rounds N]
                                                 [--pseudo-label-per-class N] [--pseudo-label-confidence P]
                                                 [--weights none|imagenet|FILE]

The task is made here, so every frame's truth is known. Films are made with ffmpeg from the photos
of persons inside ultralytics' package (mhmd_builder.demo's `Segment` and `make_film`), one MHMD
label per film. A label shows in the garments: the photos' dark suits and clothes are recoloured in
the label's colour (ffmpeg's colorbalance on the shadows). Each film has its own background,
brightness and saturation, each of its shots its own photo, crop, zoom, position and mirroring, so
the films of a label share only the garments' colour. Film seconds per label are imbalanced about
15x (MHMD's largest label has 829x the images of its rarest).

Then the real commands, as a user types them: `mhmd extract`, `filter`, `detect --detector opencv`
(YOLO's weights cannot be downloaded here), `sample --fraction 0.01`; the sample's label column is
filled from the films' truth except for one film per label, held out (never labelled); `labeler
train` (ResNet-18 from random weights: no ImageNet download here), `labeler predict`, `manifest
export`. The table: accuracy and macro-F1 on every frame of the held-out films (the honest measure)
and on the frames nobody labelled of the labelled films (the paper's way: random frames, which
near-duplicates of the labelled ones flatter), each beside the majority class of the human labels
predicted for every frame. `--rerun DIR` trains, predicts and scores again on the films, work
directory and labels a `--keep DIR` run left, to compare labelers (`--input`, `--seed`) on one task.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from commands import mhmd, timed
from mhmd_builder.demo import Segment, make_film
from mhmd_builder.devices import machine_cores
from mhmd_builder.labeler_train import classification_metrics
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.workdir import WorkDir, read_json

SIZE = "400x224"  # the smallest 16:9 frame whose short side (224) passes quality's low_resolution check
# The shots' filters run on every 6th frame of the photo source's 24 a second (colorbalance is slow).
# framestep counts frames; ffmpeg's fps filter, which goes by timestamps, now and then picked another
# source frame on a busy machine (1 film in 16), and a film must be the same bytes in every run.
FRAME_STEP = 6
EXTRACT_FPS = 2
SHOT_SECONDS = (1.5, 2.0, 2.5)
PHOTOS = ("photo:zidane.jpg", "photo:bus.jpg")
# label (in the order of the paper's counts), garment colour (colorbalance's shadows: red, green,
# blue), share of the film seconds (16:1; whole shots make it about 15:1).
LABELS = (
    ("after_ww2/china/communist_military", (-0.4, 0.4, -0.4), 16),  # green
    ("during_ww2/china/informal", (0.4, -0.4, -0.4), 8),  # red
    ("after_ww2/usa/informal", (-0.4, -0.4, 0.4), 4),  # blue
    ("during_ww2/japan/military", (0.3, 0.3, -0.3), 2),  # yellow, weaker: at 0.4 faces leave the skin range
                                                          # of the OpenCV detector, which then finds no person
    ("during_ww2/usa/military", (-0.4, 0.4, 0.4), 1.5),  # cyan
    ("during_ww2/britain_france/military", (0.4, -0.4, 0.4), 1),  # magenta
)


@dataclass(frozen=True)
class Scale:
    share_seconds: float  # film seconds per unit of a label's share
    films_per_label: int  # one of them held out
    epochs: int


FULL, QUICK = Scale(32, 4, 30), Scale(8, 3, 15)
TRAIN_OPTIONS = ("--arch", "resnet18", "--weights", "none", "--image-size", "112", "--batch-size", "16")


@dataclass(frozen=True)
class Film:
    path: Path
    label: str
    held_out: bool
    seconds: float


# -- films --------------------------------------------------------------------------------------------
def shots(rng: np.random.Generator, seconds: float, colour: tuple[float, float, float]) -> list[Segment]:
    """About `seconds` of shots of the photos, the garments in `colour`, on the film's background."""
    w, h = map(int, SIZE.split("x"))
    background = "0x{:02x}{:02x}{:02x}".format(*rng.integers(60, 230, 3))
    look = {"brightness": round(rng.uniform(-0.08, 0.08), 3), "saturation": round(rng.uniform(0.85, 1.2), 3)}
    garments = dict(zip(("rs", "gs", "bs"), colour))
    film, total = [], 0.0
    while total < seconds:
        cw, ch = (int(side * rng.uniform(0.8, 1.0)) // 2 * 2 for side in (w, h))  # crop: the zoom into the photo
        zoom = rng.uniform(0.7, 1.0)  # the photo's size on the background
        sw, sh = int(w * zoom) // 2 * 2, int(h * zoom) // 2 * 2
        filters = [("framestep", {"step": FRAME_STEP}), ("colorbalance", garments),
                   ("crop", {"w": cw, "h": ch, "x": int(rng.integers(w - cw + 1)), "y": int(rng.integers(h - ch + 1))}),
                   ("scale", {"w": sw, "h": sh}),
                   ("pad", {"w": w, "h": h, "x": int(rng.integers(w - sw + 1)), "y": int(rng.integers(h - sh + 1)),
                            "color": background}),
                   ("eq", look)]
        if rng.random() < 0.5:
            filters.append(("hflip", {}))
        film.append(Segment(PHOTOS[rng.integers(len(PHOTOS))], float(rng.choice(SHOT_SECONDS)), tuple(filters)))
        total += film[-1].seconds
    return film


def plan_films(folder: Path, scale: Scale) -> list[tuple[Film, list[Segment]]]:
    """Every label's films, the last of each label held out, each with its shots (seeded per film)."""
    planned = []
    for i, (label, colour, share) in enumerate(LABELS):
        seconds = share * scale.share_seconds / scale.films_per_label
        for j in range(scale.films_per_label):
            segments = shots(np.random.default_rng([i, j]), seconds, colour)
            film = Film(folder / f"label{i}-film{j}.mp4", label, j == scale.films_per_label - 1,
                        sum(s.seconds for s in segments))
            planned.append((film, segments))
    return planned


def make_films(folder: Path, scale: Scale) -> list[Film]:
    planned = plan_films(folder, scale)
    with ThreadPoolExecutor(machine_cores()) as pool:  # each film is one ffmpeg process
        list(pool.map(lambda p: make_film(p[0].path, p[1], size=SIZE), planned))
    return [film for film, _ in planned]


# -- the commands -------------------------------------------------------------------------------------
def label_sample(todo: Path, labelled: Path, truth: dict[str, str], held_out: set[str]) -> list[dict]:
    """Play the person who labels: each sampled frame gets its film's label, except the frames of
    the held-out films, left blank (never labelled). Returns the labelled rows."""
    with open(todo, newline="") as f:
        rows = list(csv.DictReader(f))
    # sample takes at least one frame of every film that kept any: a film missing kept none
    empty = sorted(set(truth) - {row["movie_id"] for row in rows})
    if empty:
        raise SystemExit(f"no frame of {', '.join(empty)} passed quality and detection: its label cannot be "
                         "learnt or measured")
    for row in rows:
        row["label"] = "" if row["movie_id"] in held_out else truth[row["movie_id"]]
    with open(labelled, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [row for row in rows if row["label"]]


# -- measures -----------------------------------------------------------------------------------------
def scores(frames: pd.DataFrame, truth: dict[str, str], majority: str, names: list[str]) -> dict:
    """The labeler's and the majority class's metrics on `frames` (the manifest's rows)."""
    ids = {name: i for i, name in enumerate(names)}
    y_true = frames.movie_id.map(truth).map(ids).to_numpy()
    return {"frames": len(frames),
            "labeler": classification_metrics(y_true, frames.label.map(ids).to_numpy(), names),
            "majority": classification_metrics(y_true, np.full(len(frames), ids[majority]), names)}


def ratio(labeler: dict, majority: dict) -> str:
    return f"{labeler['macro_f1'] / majority['macro_f1']:.2f}x" if majority["macro_f1"] else "-"


def results_table(results: dict[str, dict]) -> str:
    lines = ["| frames | n | labeler accuracy | labeler macro-F1 | majority accuracy | majority macro-F1 "
             "| macro-F1 difference | macro-F1 ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        labeler, majority = r["labeler"], r["majority"]
        lines.append(f"| {name} | {r['frames']} | {labeler['accuracy']:.3f} | {labeler['macro_f1']:.3f} "
                     f"| {majority['accuracy']:.3f} | {majority['macro_f1']:.3f} "
                     f"| {labeler['macro_f1'] - majority['macro_f1']:+.3f} | {ratio(labeler, majority)} |")
    return "\n".join(lines)


def label_table(films: list[Film], movies: dict[str, Film], manifest: pd.DataFrame, human: list[dict],
                split: list[dict], held_out_scores: dict) -> str:
    """Per label: films, film seconds, frames sampled and kept, human labels (and how many of them
    train validated on instead of training: `split`, the checkpoint's split per label), and the
    labeler's recall and F1 on the held-out films."""
    label_of = manifest.movie_id.map(lambda m: movies[m].label)
    sampled, kept = Counter(label_of), Counter(label_of[manifest.kept.fillna(False).astype(bool)])
    labelled = Counter(movies[row["movie_id"]].label for row in human)
    validated = {row["label"]: row["val_frames"] for row in split}
    per_class = held_out_scores["labeler"]["per_class"]
    lines = ["| label | films | film s | sampled | kept | human labels | of them validating | held-out frames "
             "| held-out recall | held-out F1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, _, _ in LABELS:
        own = [f for f in films if f.label == label]
        m = per_class.get(label, {"recall": 0.0, "f1": 0.0, "support": 0})
        lines.append(f"| {label} | {len(own)} | {sum(f.seconds for f in own):.0f} | {sampled[label]} | {kept[label]} "
                     f"| {labelled[label]} | {validated.get(label, 0)} | {m['support']} | {m['recall']:.3f} "
                     f"| {m['f1']:.3f} |")
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------------
def run(root: Path, scale: Scale, fraction: float, train_options: tuple[str, ...]) -> None:
    """Make the films, run every command up to the labelled sample, then `train_and_score`."""
    timings: dict[str, float] = {}
    work, films_dir, todo = root / "work", root / "films", root / "todo.csv"
    films = timed(timings, "make films", make_films, films_dir, scale)
    timed(timings, "extract", mhmd, "extract", str(films_dir), "-w", str(work), "--fps", str(EXTRACT_FPS))
    timed(timings, "filter", mhmd, "filter", "-w", str(work))
    timed(timings, "detect", mhmd, "detect", "-w", str(work), "--detector", "opencv")
    timed(timings, "sample", mhmd, "sample", "-w", str(work), "--fraction", str(fraction), "-o", str(todo))
    movies = films_by_movie(work, films)
    held_out = {m for m, film in movies.items() if film.held_out}
    human = timed(timings, "label the sample", label_sample, todo, root / "labels.csv",
                  {m: film.label for m, film in movies.items()}, held_out)
    print(f"    {len(human)} frames labelled; the {len(held_out)} held-out films' sampled frames left blank")
    train_and_score(root, films, human, scale, train_options, timings)


def rerun(root: Path, scale: Scale, train_options: tuple[str, ...]) -> None:
    """Train, predict and score again on a folder an earlier run kept (`--keep`): the same films,
    work directory and labels, so that labelers trained otherwise are compared on the same task."""
    with open(root / "labels.csv", newline="") as f:
        human = [row for row in csv.DictReader(f) if row["label"]]
    films = [film for film, _ in plan_films(root / "films", scale)]
    train_and_score(root, films, human, scale, train_options, {})


def films_by_movie(work: Path, films: list[Film]) -> dict[str, Film]:
    by_path = {film.path.name: film for film in films}
    extracted = {m: Path(s["path"]).name for m, s in WorkDir(work).done("extract").items()}
    if not set(extracted.values()) <= set(by_path):
        raise SystemExit(f"{work} holds other films than this scale's (--quick for a folder kept with --quick)")
    return {m: by_path[name] for m, name in extracted.items()}


def train_and_score(root: Path, films: list[Film], human: list[dict], scale: Scale, train_options: tuple[str, ...],
                    timings: dict[str, float]) -> None:
    work, labelled, exported = root / "work", root / "labels.csv", root / "manifest.parquet"
    checkpoint = work / "label" / "labeler.safetensors"
    timed(timings, "labeler train", mhmd, "labeler", "train", "-w", str(work), "--labels", str(labelled),
          *TRAIN_OPTIONS, "--epochs", str(scale.epochs), *train_options, "-o", str(checkpoint))
    timed(timings, "labeler predict", mhmd, "labeler", "predict", "-w", str(work), "--checkpoint", str(checkpoint))
    timed(timings, "manifest export", mhmd, "manifest", "export", "-w", str(work), "-o", str(exported))

    movies = films_by_movie(work, films)
    held_out = {m for m, film in movies.items() if film.held_out}
    manifest = pd.read_parquet(exported)
    config = read_json(checkpoint.with_suffix(".json"))
    print(f"labeler's initial weights: {config['initial_weights']}")
    report(films, movies, manifest, human, held_out, config, timings)


def report(films: list[Film], movies: dict[str, Film], manifest: pd.DataFrame, human: list[dict],
           held_out: set[str], config: dict, timings: dict[str, float]) -> None:
    names = load_taxonomy().names
    truth = {m: film.label for m, film in movies.items()}
    majority = Counter(row["label"] for row in human).most_common(1)[0][0]
    predicted = manifest[manifest.label_source == "model"]
    results = {"held-out films, every frame": scores(predicted[predicted.movie_id.isin(held_out)], truth,
                                                      majority, names),
               "labelled films, unlabelled frames": scores(predicted[~predicted.movie_id.isin(held_out)], truth,
                                                           majority, names)}
    kept = int(manifest.kept.fillna(False).sum())
    print(f"\nframes kept {kept}, labelled {len(human)} ({len(human) / kept:.2%}); majority class of the human "
          f"labels: {majority}; train validated on {config['val_frames']} of them "
          f"({len(config['val_movies'])} films held out whole), trained on {config['train_frames']}")
    print(results_table(results))
    print()
    print(label_table(films, movies, manifest, human, config["split"], results["held-out films, every frame"]))
    print("\n| step | wall s |\n|---|---|")
    print("\n".join(f"| {step} | {seconds:.0f} |" for step, seconds in timings.items()))
    print(f"| total | {sum(timings.values()):.0f} |")


def passed_on(args: argparse.Namespace, *names: str) -> tuple[str, ...]:
    """labeler train's options for the arguments among `names` that were given."""
    given = [(name, getattr(args, name)) for name in names if getattr(args, name) is not None]
    return tuple(part for name, value in given for part in ("--" + name.replace("_", "-"), str(value)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the film seconds, 3 films per label")
    parser.add_argument("--keep", type=Path, help="work here and keep films, work directory and label files")
    parser.add_argument("--rerun", type=Path, help="a folder kept by an earlier run (--keep): only train, predict "
                        "and score again, on the same films and labels (with its --quick)")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of the frames sampled to label "
                        "(the paper's 1%%); more shows what the labeler learns with more labels")
    parser.add_argument("--seed", type=int, default=0, help="labeler train's seed: its validation films and "
                        "initialisation")
    parser.add_argument("--input", choices=("frame", "persons"), help="labeler train's --input (default: its own)")
    parser.add_argument("--epochs", type=int, help="labeler train's --epochs (default: the scale's)")
    parser.add_argument("--image-size", type=int, help="labeler train's --image-size (default: 112)")
    parser.add_argument("--weights", help="labeler train's --weights (default none, random: ImageNet's cannot be "
                        "downloaded here): imagenet, or a local copy of torchvision's file")
    parser.add_argument("--pseudo-label-rounds", type=int, help="labeler train's --pseudo-label-rounds")
    parser.add_argument("--pseudo-label-per-class", type=int, help="labeler train's --pseudo-label-per-class")
    parser.add_argument("--pseudo-label-confidence", type=float, help="labeler train's --pseudo-label-confidence")
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    train_options = ("--seed", str(args.seed), *(("--input", args.input) if args.input else ()),
                     *(("--epochs", str(args.epochs)) if args.epochs else ()),
                     *(("--image-size", str(args.image_size)) if args.image_size else ()),
                     *passed_on(args, "weights", "pseudo_label_rounds", "pseudo_label_per_class",
                               "pseudo_label_confidence"))
    if args.rerun:
        rerun(args.rerun, scale, train_options)
        return
    if args.keep:
        if args.keep.exists() and any(args.keep.iterdir()):
            raise SystemExit(f"{args.keep} is not empty: --keep wants a new or empty folder")
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args.keep, scale, args.fraction, train_options)
        return
    root = Path(tempfile.mkdtemp(prefix="labeler-learning-"))
    try:
        run(root, scale, args.fraction, train_options)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
