"""Benchmark: `mhmd extract --chunk-seconds` against an undivided extract of the same film.

    uv run python benchmarks/chunked_extract.py [--seconds 600] [--chunks 60] [--workers 1 2] [--repeats 1]
        [--height 720] [--preset ultrafast] [--keep DIR]

Makes a film with ffmpeg (testsrc2, 16:9 at `--height` lines (1280x720 unless told), 24 fps, H.264
at x264's `--preset` with a 10 s GOP, a minute encoded once and repeated), then runs each
of these `--repeats` times, round-robin, each in a fresh work directory:
  1. `mhmd extract F -w W --workers 1 --chunk-seconds 0`      the undivided film
  2. `mhmd extract F -w W --workers 1 --chunk-seconds C`       goal: <= 1.05 x (1), wall and CPU
  3. `mhmd extract F -w W --workers 2 --chunk-seconds C`       the chunks of one film on two workers
(2 and 3 for each of `--workers`, 1 and 2 unless told)
and checks that every run made the same rows and JPEGs as (1). Prints the median wall and CPU
seconds (user + system of the whole process tree) and the ratios to (1): of the medians, the median
of each round's ratio, and of the sums.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from commands import mhmd, timed

FPS = 24
# A 10 s GOP (240 frames) as benchmarks/extract.py encodes. ultrafast by default, since making the
# film at veryfast takes longer than every extract below on 2 shared cores; it also makes the
# cheapest stream to decode (no CABAC, no B-frames), where a chunk's fixed costs weigh most.
ENCODE = ["-pix_fmt", "yuv420p", "-c:v", "libx264", "-crf", "20", "-g", "240", "-an"]


def make_film(folder: Path, seconds: int, height: int = 720, preset: str = "ultrafast") -> Path:
    """A minute of film encoded once and copied end to end (`-c copy`) to `seconds`: the decoder's
    work per second is the same as for a film encoded whole, in a tenth of the time to make it."""
    path = folder / f"film-{height}p-{preset}-{seconds}s.mp4"
    if not path.exists():
        print(f"generating {path.name} ...", flush=True)
        minute, listing, part = folder / "minute.mp4", folder / "minutes.txt", path.with_suffix(".part.mp4")
        subprocess.run(["ffmpeg", "-y", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                        f"testsrc2=size={height * 16 // 9}x{height}:rate={FPS}", "-t", "60", *ENCODE, "-preset", preset,
                        str(minute)], check=True)
        listing.write_text(f"file '{minute.name}'\n" * -(-seconds // 60))
        subprocess.run(["ffmpeg", "-y", "-nostdin", "-v", "error", "-f", "concat", "-i", str(listing), "-c", "copy",
                        "-t", str(seconds), str(part)], check=True)
        part.rename(path)
    return path


def rows(work: Path) -> pd.DataFrame:
    """The film's every row and column: frames, decisions and every score."""
    [table] = work.glob("extract/parts/*.parquet")
    return pd.read_parquet(table)


def jpegs(work: Path) -> str:
    digest = hashlib.sha256()
    for jpeg in sorted(work.glob("frames/*/*.jpg")):
        digest.update(jpeg.name.encode() + jpeg.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600, help="the film's length")
    parser.add_argument("--chunks", type=float, nargs="+", default=[60.0], help="--chunk-seconds values to time")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--workers of the chunked runs")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--height", type=int, default=720, help="the film's lines (16:9)")
    parser.add_argument("--preset", default="ultrafast", help="x264's preset for the film")
    parser.add_argument("--keep", type=Path, help="a folder to keep the film in (reused when there)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mhmd-chunks-"))
    film = make_film(args.keep or scratch, args.seconds, args.height, args.preset)
    runs = {"undivided, 1 worker": ["--workers", "1", "--chunk-seconds", "0"]}
    for chunk in args.chunks:
        for workers in args.workers:
            runs[f"chunks of {chunk:g} s, {workers} worker{'s' * (workers > 1)}"] = [
                "--workers", str(workers), "--chunk-seconds", str(chunk)]
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    reference = None
    for i in range(args.repeats):
        for k, (name, options) in enumerate(runs.items()):
            work = scratch / f"work-{i}-{k}"
            timing, cpu = {}, {}
            timed(timing, name, mhmd, "extract", str(film), "-w", str(work), "--fps", "1", *options, cpu=cpu)
            walls[name].append(timing[name])
            cpus[name].append(cpu[name])
            print(f"{name}: {cpu[name]:.2f} CPU s", flush=True)
            made = (rows(work), jpegs(work))
            reference = reference or made
            if not (made[0].equals(reference[0]) and made[1] == reference[1]):
                raise SystemExit(f"{name}: not the rows and JPEGs of the undivided extract")
            shutil.rmtree(work)
    base = "undivided, 1 worker"
    base_wall, base_cpu = statistics.median(walls[base]), statistics.median(cpus[base])
    print(f"\n{args.seconds} s film, {args.height * 16 // 9}x{args.height} {FPS} fps H.264 ({args.preset}), --fps 1, "
          f"median of {args.repeats}; "
          f"rows and JPEGs identical in every run")
    # The load of a shared machine moves one run's CPU seconds by 10% either way: each round's ratio
    # to the undivided run of the same round, and the sums, say more than the medians alone.
    print(f"{'run':<28}{'wall s':>8}{'x':>7}{'CPU s':>8}{'x':>7}{'rounds x':>10}{'sum x':>7}")
    for name in runs:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        rounds = statistics.median(c / b for c, b in zip(cpus[name], cpus[base]))
        print(f"{name:<28}{wall:8.1f}{wall / base_wall:7.3f}{cpu:8.1f}{cpu / base_cpu:7.3f}{rounds:10.3f}"
              f"{sum(cpus[name]) / sum(cpus[base]):7.3f}")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
