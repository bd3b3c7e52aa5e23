"""Human parsing maps made elsewhere (the paper used a CIHP-style parser: hair, face, upper
clothes, coat...): a folder of PNGs named by frame id, checked and attached to the work directory.

Either every map is valid and all are attached, or nothing is: a bad folder never leaves half a
set behind. Attached maps live in WORKDIR/parsing/<movie>/<frame_id>.png and are listed in
WORKDIR/parsing/attached.parquet; shards use them as parsing targets.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import pandas as pd
import pyarrow as pa

from .errors import MhmdError, listing
from .images import ImageError, open_image
from .manifest import manifest
from .tables import LABEL, PARSING, parsing_table_path
from .workdir import WorkDir, atomic_write_table, writes


class ParsingError(MhmdError):
    """Some maps are invalid: `problems` lists each as 'file: what is wrong'."""

    def __init__(self, problems: list[str]):
        super().__init__(f"{len(problems)} invalid parsing maps, nothing attached:\n" + listing(problems))
        self.problems = problems


def check_maps(folder: Path, frames: pd.DataFrame) -> list[str]:
    """Problems of the PNGs in `folder` against the extracted frames (frame_id, width, height, kept)."""
    known = frames.set_index("frame_id")
    problems = []
    pngs = sorted(folder.glob("*.png"))
    if not pngs:
        problems.append(f"{folder}: no .png files")
    for png in pngs:
        if png.stem not in known.index:
            problems.append(f"{png.name}: no extracted frame has the id {png.stem}")
            continue
        frame = known.loc[png.stem]
        if not frame.kept:
            problems.append(f"{png.name}: frame {png.stem} was rejected ({frame.reject_reason})")
            continue
        problem = _map_problem(png, frame.width, frame.height)
        if problem:
            problems.append(problem)
    return problems


def _map_problem(png: Path, width: int, height: int) -> str | None:
    """What is wrong with one map: its size is read from its header and compared before decoding."""
    try:
        image = open_image(png)
        if (image.width, image.height) != (width, height):
            return f"{png.name}: {image.width}x{image.height}, but the frame is {width}x{height}"
        image.decode(cv2.IMREAD_UNCHANGED)
    except ImageError as e:
        return str(e)
    return None


@writes("workdir")
def attach_parsing(workdir: WorkDir, folder: str | Path) -> int:
    """Check every map in `folder`, then copy them all into the work directory; returns how many."""
    folder = Path(folder)
    frames = manifest(workdir, before=LABEL)
    problems = check_maps(folder, frames)
    if problems:
        raise ParsingError(problems)
    staging = workdir.stage_dir(PARSING) / "tmp"
    shutil.rmtree(staging, ignore_errors=True)
    movie_of = frames.set_index("frame_id").movie_id
    rows = []
    for png in sorted(folder.glob("*.png")):
        movie = movie_of[png.stem]
        (staging / movie).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, staging / movie / png.name)
        rows.append({"frame_id": png.stem, "movie_id": movie, "parsing": f"parsing/{movie}/{png.name}"})
    # Merge with maps attached before; a map given again replaces the old one.
    for movie_dir in staging.iterdir():
        final = workdir.stage_dir(PARSING) / movie_dir.name
        final.mkdir(parents=True, exist_ok=True)
        for png in movie_dir.iterdir():
            os.replace(png, final / png.name)
    shutil.rmtree(staging)
    index = parsing_table_path(workdir)
    table = pd.DataFrame(rows)
    if index.exists():
        table = pd.concat([pd.read_parquet(index), table]).drop_duplicates("frame_id", keep="last")
    atomic_write_table(index, pa.Table.from_pandas(table.sort_values("frame_id"), preserve_index=False))
    return len(rows)
