"""HistoryNet learning: does HistoryNet, trained on shards this project builds, colour films it has never
seen better than grey, and better than a plain L2 regression?

    uv run python benchmarks/historynet_learning.py [--quick] [--steps N] [--lr LR] [--only TEXT ...] [--keep DIR]

The task is made here, so that colour follows from what lightness shows: films of the two photos of
persons inside ultralytics' package (mhmd_builder.demo's `Segment` and `make_film`), each shot its own
crop, zoom, position and mirroring, on a backdrop whose colour follows from its lightness (`backdrop`:
a dark one is blue, a middle one green, a light one orange, as sky, grass and sand would), each film
its own lightness. The persons' colours are the photos' own; a model that learns skin, clothes, bus,
street and backdrop from their lightness and texture can colour the held-out films; grey cannot.

Then the real commands, as a user types them: `mhmd extract`, `filter`, `detect --detector opencv`
(YOLO's weights cannot be downloaded here), `shard` (whole films go to the test split), and for each
configuration `mhmd historynet train` (64 px, networks of width 0.25, G0 from random weights: VGG-16's
ImageNet weights cannot be downloaded here and fit width 1 only) and `mhmd historynet evaluate --json`
on the test split (the official protocol). The grey baseline is evaluate's own `grey` block; the
train-mean baseline is a generator that outputs the train split's mean ab everywhere, evaluated the same
way. L2(ab) is the training loss's measure (ab / 255, squared) at 64 px on the same held-out frames.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from commands import mhmd, mhmd_json, timed
from mhmd_builder.demo import Segment, make_film
from mhmd_builder.devices import machine_cores
from mhmd_builder.historynet.checkpoint import load_generator, save_checkpoint
from mhmd_builder.historynet.data import eval_loader, unit_float
from mhmd_builder.historynet.model import build_networks
from mhmd_builder.historynet.train import validation_l2
from mhmd_builder.taxonomy import load_taxonomy

SIZE = "400x224"  # the smallest 16:9 frame whose short side (224) passes quality's low_resolution check
FRAME_STEP = 6  # the shots' filters run on every 6th frame of the photo source's 24 a second
EXTRACT_FPS = 2
SHOT_SECONDS = (1.5, 2.0, 2.5)
PHOTOS = ("photo:zidane.jpg", "photo:bus.jpg")
IMAGE_SIZE, WIDTH = 64, 0.25
TRAIN_OPTIONS = ("--image-size", str(IMAGE_SIZE), "--width", str(WIDTH), "--vgg-weights", "none",
                 "--batch-size", "16", "--workers", "1", "--device", "cpu", "--log-every", "50", "--seed", "0")
# name -> `historynet train` options: the regression baseline, the full model with each preset, the ablations
CONFIGURATIONS = {
    "L2 only (--preset l2)": ("--preset", "l2"),
    "HistoryNet, --preset recommended (the default)": ("--preset", "recommended"),
    "HistoryNet, --preset paper": ("--preset", "paper"),
    "HistoryNet, --preset official": ("--preset", "official"),
    "HistoryNet, paper, --warmup-steps 200": ("--preset", "paper", "--warmup-steps", "200"),
    "HistoryNet, paper, --info-term softmax": ("--preset", "paper", "--info-term", "softmax"),
    "no parsing (paper)": ("--preset", "paper", "--no-parsing"),
    "no classifier (paper)": ("--preset", "paper", "--no-classifier"),
    "ChromaGAN baseline (paper)": ("--preset", "paper", "--no-parsing", "--no-classifier"),
}


@dataclass(frozen=True)
class Scale:
    films: int
    film_seconds: float
    steps: int
    lr: float = 2e-4  # not the paper's 2e-5: ten times it suits these small networks from random weights (RESULTS.md)


# FULL: the target's budget, about 20 CPU-minutes per configuration on a 2-core x86_64 (all nine: about three
# hours; --steps 400 takes a fifth, --only fewer configurations)
FULL, QUICK = Scale(12, 30, 2000), Scale(6, 12, 20)


# -- films --------------------------------------------------------------------------------------------
def backdrop(lightness: int) -> str:
    """ffmpeg's 0xRRGGBB of the colour at 8-bit Lab `lightness` (60..200) whose ab follows from it: the
    hue turns from blue (dark) through green to orange (light) at chroma 30."""
    turn = np.pi * (1.4 - 1.2 * (lightness - 60) / 140)  # 252 degrees (blue) .. 36 degrees (orange)
    lab = np.array([[[lightness, 128 + 30 * np.cos(turn), 128 + 30 * np.sin(turn)]]], dtype=np.uint8)
    r, g, b = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)[0, 0]
    return f"0x{r:02x}{g:02x}{b:02x}"


def shots(rng: np.random.Generator, seconds: float) -> list[Segment]:
    """About `seconds` of shots of the photos on the film's own backdrop."""
    w, h = map(int, SIZE.split("x"))
    background = backdrop(int(rng.integers(60, 201)))
    film, total = [], 0.0
    while total < seconds:
        cw, ch = (int(side * rng.uniform(0.7, 1.0)) // 2 * 2 for side in (w, h))  # crop: the zoom into the photo
        zoom = rng.uniform(0.75, 1.0)  # the photo's size on the background
        sw, sh = int(w * zoom) // 2 * 2, int(h * zoom) // 2 * 2
        filters = [("framestep", {"step": FRAME_STEP}),
                   ("crop", {"w": cw, "h": ch, "x": int(rng.integers(w - cw + 1)), "y": int(rng.integers(h - ch + 1))}),
                   ("scale", {"w": sw, "h": sh}),
                   ("pad", {"w": w, "h": h, "x": int(rng.integers(w - sw + 1)), "y": int(rng.integers(h - sh + 1)),
                            "color": background})]
        if rng.random() < 0.5:
            filters.append(("hflip", {}))
        film.append(Segment(PHOTOS[rng.integers(len(PHOTOS))], float(rng.choice(SHOT_SECONDS)), tuple(filters)))
        total += film[-1].seconds
    return film


def make_films(folder: Path, scale: Scale) -> list[Path]:
    planned = [(folder / f"film{i:02d}.mp4", shots(np.random.default_rng(i), scale.film_seconds))
               for i in range(scale.films)]
    with ThreadPoolExecutor(machine_cores()) as pool:  # each film is one ffmpeg process
        list(pool.map(lambda p: make_film(p[0], p[1], size=SIZE), planned))
    return [path for path, _ in planned]


# -- the baselines and L2(ab) -------------------------------------------------------------------------
def split_batches(shards: Path, split: str):
    return eval_loader(str(shards), len(load_taxonomy().names), batch_size=32, num_workers=0, split=split,
                       image_size=IMAGE_SIZE)


def train_mean_ab(shards: Path) -> torch.Tensor:
    """(2,) the train split's mean a and b, in [0, 1] (ab / 255)."""
    total, pixels = torch.zeros(2, dtype=torch.float64), 0
    for batch in split_batches(shards, "train"):
        ab = unit_float(batch["ab"]).double()
        total += ab.sum(dim=(0, 2, 3))
        pixels += ab[:, 0].numel()
    return (total / pixels).float()


def constant_checkpoint(path: Path, ab: torch.Tensor) -> Path:
    """A generator whose every output pixel is `ab` (its last colour convolution: weights 0, bias logit(ab))."""
    names = load_taxonomy().names
    networks = build_networks("chromagan", len(names), IMAGE_SIZE, WIDTH)
    last = networks.generator.g1.out_2[1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.logit(ab))
    config = {"variant": "chromagan", "num_classes": len(names), "image_size": IMAGE_SIZE, "width": WIDTH,
              "label_names": names}
    return save_checkpoint(path, networks, config)


def held_out_l2(shards: Path, checkpoint: Path) -> dict[str, float]:
    """The checkpoint's generator and grey scored on the test split's frames as training validates
    (train.validation_l2: each frame's mean squared ab error, ab / 255, at IMAGE_SIZE)."""
    generator, _ = load_generator(checkpoint)
    return validation_l2(generator, list(split_batches(shards, "test")), "cpu", nullcontext)


# -- the runs -----------------------------------------------------------------------------------------
def evaluated(shards: Path, checkpoint: Path) -> dict:
    return mhmd_json("historynet", "evaluate", "--shards", str(shards), "--checkpoint", str(checkpoint),
                     "--workers", "0")


def row(name: str, mean: dict, l2: float, wall: float | None = None, cpu: float | None = None) -> dict:
    return {"name": name, "psnr": mean["psnr"], "ssim": mean["ssim"], "colorfulness": mean["colorfulness"],
            "l2_ab": l2, "wall_s": wall, "cpu_s": cpu}


def run(root: Path, scale: Scale, configurations: dict[str, tuple[str, ...]]) -> None:
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    work, films_dir, shards, runs = root / "work", root / "films", root / "shards", root / "runs"
    if not (shards / "index.json").is_file():  # a kept DIR's shards are reused: only the training runs again
        timed(timings, "make films", make_films, films_dir, scale)
        timed(timings, "extract", mhmd, "extract", str(films_dir), "-w", str(work), "--fps", str(EXTRACT_FPS))
        timed(timings, "filter", mhmd, "filter", "-w", str(work))
        timed(timings, "detect", mhmd, "detect", "-w", str(work), "--detector", "opencv")
        timed(timings, "shard", mhmd, "shard", "-w", str(work), "-o", str(shards), "--test-fraction", "0.25")

    first = evaluated(shards, constant_checkpoint(root / "train-mean.safetensors", train_mean_ab(shards)))
    train_mean = held_out_l2(shards, root / "train-mean.safetensors")
    rows = [row("grey (ab = 0)", first["grey"]["mean"], train_mean["validation/grey_l2_ab"]),
            row("train-mean ab", first["mean"], train_mean["validation/l2_ab"])]
    for baseline in rows:
        print(table_line(baseline, rows[0]), flush=True)
    for name, options in configurations.items():
        rundir = runs / slug(name)
        shutil.rmtree(rundir, ignore_errors=True)  # a kept DIR's earlier run of it
        step, checkpoint = f"train {name}", rundir / "last.safetensors"
        timed(timings, step, mhmd, "historynet", "train", "--shards", str(shards), "-o", str(rundir),
              "--steps", str(scale.steps), "--save-every", str(scale.steps), "--lr", str(scale.lr), *TRAIN_OPTIONS,
              *options, cpu=cpu)
        l2 = held_out_l2(shards, checkpoint)["validation/l2_ab"]
        rows.append(row(name, evaluated(shards, checkpoint)["mean"], l2, timings[step], cpu[step]))
        print(table_line(rows[-1], rows[0]), flush=True)  # each result as it comes: a full run takes hours
    report(rows, first, scale, timings)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def table_line(r: dict, grey: dict) -> str:
    times = f"{r['wall_s']:.0f} | {r['cpu_s']:.0f}" if r["wall_s"] is not None else "- | -"
    return (f"| {r['name']} | {r['psnr']:.2f} | {r['psnr'] - grey['psnr']:+.2f} | {r['ssim']:.4f} "
            f"| {r['colorfulness']:.2f} | {1000 * r['l2_ab']:.3f} | {times} |")


def report(rows: list[dict], first: dict, scale: Scale, timings: dict[str, float]) -> None:
    grey = rows[0]
    print(f"\nheld-out frames (test split, whole films): {first['images']}; {scale.steps} steps of 16 images at "
          f"{IMAGE_SIZE} px, width {WIDTH}, lr {scale.lr}, on the CPU")
    print("| model | PSNR dB | vs grey dB | SSIM | colourfulness | L2(ab) x1e3 | train wall s | train CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(table_line(r, grey))
    print(f"(original frames' colourfulness: {first['mean']['colorfulness_original']:.2f})")
    print("\n| step | wall s |\n|---|---|")
    for step, seconds in timings.items():
        print(f"| {step} | {seconds:.0f} |")
    print(f"| total | {sum(timings.values()):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter films and fewer steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per configuration")
    parser.add_argument("--lr", type=float, default=Scale.lr, help="every configuration's learning rate "
                        "(default: 2e-4; the paper's is 2e-5)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="only the configurations whose name contains one of these")
    parser.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it (default: a temporary one)")
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    scale = Scale(scale.films, scale.film_seconds, args.steps or scale.steps, args.lr)
    configurations = {name: options for name, options in CONFIGURATIONS.items()
                      if args.only is None or any(text in name for text in args.only)}
    root = args.keep or Path(tempfile.mkdtemp(prefix="historynet-learning-"))
    try:
        run(root, scale, configurations)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
