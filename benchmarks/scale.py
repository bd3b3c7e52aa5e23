"""Whole-dataset commands at scale: time and peak memory of `mhmd status`, `manifest export`,
`filter`, `sample`, `labels import`, `shard` and `report` on synthetic work directories of N frames,
with a growth fit, and `mhmd shard` against two plain tar writes in the same run: `tar cf` of the
same JPEGs, and `tar cf members` of the same members (the bytes shard writes).

    uv run python benchmarks/scale.py [--sizes 20000 60000] [--films 20 | --frames-per-film K]
                                      [--jpeg-kb KB] [--keep DIR [--reuse]] [--commands shard "tar cf" ...]

The work directory is written through the stages' own table schemas (`tables.py`) and the work
directory's own commit (`WorkDir.commit`: table, then done marker with the stage's counts), as
extract, detect and labeler predict leave it: of every sampled frame 60% pass quality (the others
"grayscale"), and two thirds of those pass detection (the others "no_person"), about the paper's
1,353,166 kept of ~3.4 M sampled; every frame that passed detection has a model label. Every kept
JPEG is a hard link to one tiny real JPEG (a new one every 50,000 links: ext4 allows 65,000), so
the JPEG bytes are small and `tar cf --hard-dereference` (each link stored as a whole file, as shard
does) of the JPEGs the shards hold (listed from shard's records: not the frames detection rejected)
measures per-file costs, the part of shard that grows with N; `--jpeg-kb 60` links to a JPEG of a
real 640 px frame's size instead, where the bytes written weigh as they do in a real build.
`--films` is the same at every size (a film's frames grow with N); `--frames-per-film` makes the
films grow instead, as a collection of ever more films of a film's length does (23,130: the paper's
~3.4 M sampled frames over its 147 films).

`tar cf members` extracts each of shard's tars (untimed: a sample's jpg, json and cls as three
files) and times `tar cf` of those files in the tar's order, a tar a shard (`members_tars`): a plain
tar write of the bytes shard writes, three members of a header and padding each a sample where `tar
cf` of the JPEGs writes one (with 1 KB JPEGs, ~3.5 KB against ~1.5 KB a sample).

Peak memory: the largest sum of the proportional set sizes (PSS, Linux) of the command's process
and all its descendants, sampled every 50 ms with psutil: a page shared by forked writers counts
once in the sum (RSS would count it in each), so this is the memory the tree holds; a peak shorter
than 50 ms can be missed. CPU seconds: user + system of the command's whole process tree, from the
kernel's accounting of waited-for children (a loaded machine inflates them far less than wall time).
The fit: the exponent b of time ~ N^b and memory ~ N^b (least squares on logs) over
the sizes run (1 is linear, 0 flat; fixed costs flatten it at small N), and the value at the paper's
size on the least-squares straight line. `status` runs twice: on the fresh work directory, and
last, after a filter and the shards ("status, built").
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa

from mhmd_builder.detect import DetectSettings
from mhmd_builder.extract import ExtractSettings, frame_id
from mhmd_builder.tables import DETECT, DETECT_SCHEMA, EXTRACT, FRAME_SCHEMA, LABEL, PREDICTION_SCHEMA
from mhmd_builder.quality import SCORE_NAMES
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.workdir import WorkDir

MHMD = str(Path(sys.executable).parent / "mhmd")  # the command of this environment
PAPER = 3_400_000  # frames the paper sampled (1,353,166 kept)
LINKS_PER_JPEG = 50_000  # ext4 allows 65,000 links to one file
GOOD_SCORES = {"colorfulness": 30.0, "chroma": 20.0, "chroma_spread": 10.0, "hue_concentration": 0.3,
               "sharpness": 50.0, "blur_sigma": 1.0, "mean_luma": 120.0, "black_fraction": 0.05,
               "white_fraction": 0.02, "short_side": 480.0}
# The commands run at each size, in this order ("status, built": status again after filter and shard).
STEPS = ("status", "manifest export", "filter", "sample", "labels import", "shard", "report", "status, built")
# Shard's baselines, after the commands: `tar cf` of the JPEGs the shards hold, and of the members they
# hold (every sample's jpg, json and cls as files: the bytes shard writes).
BASELINES = ("tar cf", "tar cf members")


def tiny_jpeg() -> bytes:
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :, 2], image[:, 32:, 1] = 200, 120
    return cv2.imencode(".jpg", image)[1].tobytes()


def jpeg_of_size(kilobytes: float) -> bytes:
    """A real JPEG of about `kilobytes` (at least): seeded noise, the smallest 16:9 picture reaching it."""
    rng = np.random.default_rng(0)
    for height in range(16, 4096, 8):
        data = cv2.imencode(".jpg", rng.integers(0, 256, (height, height * 16 // 9, 3), np.uint8))[1].tobytes()
        if len(data) >= kilobytes * 1024:
            return data
    raise SystemExit(f"--jpeg-kb {kilobytes}: too large")


class Linker:
    """Hard links to one real JPEG, a new copy of it every LINKS_PER_JPEG links."""

    def __init__(self, folder: Path, data: bytes):
        self.folder, self.data, self.count = folder, data, 0
        folder.mkdir(parents=True, exist_ok=True)

    def link(self, path: Path) -> None:
        source = self.folder / f"{self.count // LINKS_PER_JPEG}.jpg"
        if self.count % LINKS_PER_JPEG == 0:
            source.write_bytes(self.data)
        os.link(source, path)
        self.count += 1


def make_workdir(root: Path, frames: int, films: int, seed: int = 0, data: bytes | None = None) -> WorkDir:
    """A work directory of `frames` sampled frames over `films` films, extracted, detected and labelled."""
    import xxhash

    work, rng, taxonomy = WorkDir(root / "work"), np.random.default_rng(seed), load_taxonomy()
    data = data or tiny_jpeg()
    linker, digest = Linker(root / "jpeg-sources", data), xxhash.xxh3_64_hexdigest(data)
    extract_settings, detect_settings = ExtractSettings().to_dict(), DetectSettings().to_dict()
    for f, n in enumerate(np.diff(np.linspace(0, frames, films + 1).astype(int))):
        movie = f"film{f:04d}"
        ids = [frame_id(movie, i * 0.25) for i in range(n)]
        passed = rng.random(n) < 0.6
        folder = work.frames_dir(movie)
        folder.mkdir(parents=True)
        jpegs = [f"frames/{movie}/{fid}.jpg" if ok else None for fid, ok in zip(ids, passed)]
        for jpeg in filter(None, jpegs):
            linker.link(work.root / jpeg)
        scores = {name: np.where(passed, value, 2.0 if name == "colorfulness" else value)
                  for name, value in GOOD_SCORES.items()}
        scores.update(phash_hi=rng.integers(0, 2**32, n).astype(float), phash_lo=rng.integers(0, 2**32, n).astype(float))
        columns = {"frame_id": ids, "movie_id": [movie] * n, "timestamp": np.arange(n) * 0.25,
                   "width": [640] * n, "height": [352] * n, "kept": passed,
                   "reject_reason": [None if ok else "grayscale" for ok in passed], "flags": [[]] * n,
                   "jpeg": jpegs, "jpeg_bytes": [len(data) if j else None for j in jpegs],
                   "jpeg_xxh3": [digest if j else None for j in jpegs]}
        table = pa.table({**{field.name: pa.array(columns[field.name], field.type) for field in FRAME_SCHEMA},
                          **{name: pa.array(scores[name], pa.float64()) for name in SCORE_NAMES}})
        path = f"/movies/{movie}.mp4"
        work.plan(EXTRACT, movie, {"path": path})
        work.commit(EXTRACT, movie, table, {"path": path, "movie_id": movie, "settings": extract_settings,
                                            **counts(passed, "grayscale")})

        detected = [fid for fid, ok in zip(ids, passed) if ok]
        persons = rng.integers(0, 3, len(detected))  # a third with no person
        kept = persons > 0
        table = pa.table({
            "frame_id": detected, "movie_id": [movie] * len(detected), "persons": persons.astype(np.int32),
            "boxes": [[[0.1, 0.1, 0.5, 0.9]] * p for p in persons], "confidences": [[0.8] * p for p in persons],
            "largest_person_area": np.where(kept, 0.3, 0.0).astype(np.float32), "kept": kept,
            "reject_reason": [None if k else "no_person" for k in kept], "mask": [None] * len(detected)},
            schema=DETECT_SCHEMA)
        work.plan(DETECT, movie, {"frames": len(detected), "inputs_digest": movie})
        work.commit(DETECT, movie, table, {"movie_id": movie, "inputs_digest": movie, "settings": detect_settings,
                                           **counts(kept, "no_person")})

        labelled = [fid for fid, k in zip(detected, kept) if k]
        picks = rng.integers(0, len(taxonomy.labels), len(labelled))
        names = [taxonomy.labels[i].name for i in picks]
        table = pa.table({
            "frame_id": labelled, "movie_id": [movie] * len(labelled), "label": names,
            "label_id": picks.astype(np.int32), "label_source": ["model"] * len(labelled),
            "label_confidence": np.full(len(labelled), 0.9, np.float32), "top3": [[name] * 3 for name in names],
            "top3_confidence": [[0.9, 0.05, 0.05]] * len(labelled)}, schema=PREDICTION_SCHEMA)
        work.plan(LABEL, movie, {"frames": len(labelled), "inputs_digest": movie})
        work.commit(LABEL, movie, table, {"movie_id": movie, "inputs_digest": movie, "checkpoint_sha256": "synthetic",
                                          "frames_in": len(labelled), "frames_out": len(labelled), "rejected": {}})
    return work


def counts(kept: np.ndarray, reason: str) -> dict:
    """A done marker's counts, as the stages write them."""
    rejected = int((~kept).sum())
    return {"frames_in": len(kept), "frames_out": int(kept.sum()), "rejected": {reason: rejected} if rejected else {}}


def tree_pss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:  # ended meanwhile
            pass
    return total


def children_cpu() -> float:
    """CPU seconds (user + system) of every ended process this one has waited for, and theirs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(args: list[str], cwd: Path) -> tuple[float, int, float]:
    """Run a command; its wall time (s), the peak PSS of its process tree (bytes) and the CPU seconds of
    the tree (its forked writers included: each waits for its own children, so their time reaches us)."""
    os.sync()  # the bytes an earlier command left in the page cache are written before this one is timed
    cpu_before, started = children_cpu(), time.perf_counter()
    child = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    process, peak = psutil.Process(child.pid), 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, tree_pss(process))
            except psutil.Error:
                pass
            stop.wait(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = child.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({child.returncode}):\n{stderr.decode()[-2000:]}")
    return seconds, peak, children_cpu() - cpu_before


def filled_labels(todo: Path, out: Path) -> None:
    """The sample with every `label` filled (a label name of the taxonomy), as a person would."""
    sample = pd.read_csv(todo)
    names = [label.name for label in load_taxonomy().labels]
    sample["label"] = [names[i % len(names)] for i in range(len(sample))]
    sample.to_csv(out, index=False)


def run_size(root: Path, frames: int, films: int, commands: list[str],
             jpeg: bytes | None = None) -> dict[str, tuple[float, int, float]]:
    """Time `commands` (every one of STEPS and BASELINES by default) on the work directory of `frames`
    frames in root/work, made unless it is there (--reuse)."""
    started = time.perf_counter()
    work = WorkDir(root / "work") if (root / "work").is_dir() else make_workdir(root, frames, films, data=jpeg)
    print(f"\n{frames} frames over {films} films: work directory ready in {time.perf_counter() - started:.0f} s")
    w = str(work.root)
    steps = dict(zip(STEPS, [
        ["status", "-w", w],
        ["manifest", "export", "-w", w, "-o", str(root / "manifest.parquet")],
        ["filter", "-w", w],
        ["sample", "-w", w, "--fraction", "0.01", "-o", str(root / "todo.csv")],
        ["labels", "import", str(root / "labelled.csv"), "-w", w],
        ["shard", "-w", w, "-o", str(root / "shards")],
        ["report", "-w", w, "-o", str(root / "report.html")],
        ["status", "-w", w],  # after a filter and the shards: what status reads then
    ]))
    results = {}
    for name, args in steps.items():
        if name not in commands:
            continue
        if name == "shard":  # written whole, even on a reused work directory
            shutil.rmtree(root / "shards", ignore_errors=True)
        if name == "labels import":
            filled_labels(root / "todo.csv", root / "labelled.csv")
        results[name] = measured([MHMD, "-q", *args], root)
        if name == "shard":
            results[name] += (sum(tar.stat().st_size for tar in (root / "shards").glob("*.tar")),)
        print(f"  {name:<16}{format_run(*results[name])}", flush=True)
    if "tar cf" in commands:
        listed = sharded_jpegs(work, root / "sharded.txt")
        results["tar cf"] = plain_tar(root, ["--hard-dereference", "-C", w], listed)
        print(f"  {'tar cf':<16}{format_run(*results['tar cf'])}", flush=True)
    if "tar cf members" in commands:
        results["tar cf members"] = members_tars(root, root / "shards")
        print(f"  {'tar cf members':<16}{format_run(*results['tar cf members'])} (a tar a shard)", flush=True)
    return results


def format_run(seconds: float, memory: int, cpu: float, written: int | None = None) -> str:
    return (f"{seconds:8.1f} s {memory / 2**20:8.0f} MiB {cpu:8.1f} CPU s"
            + ("" if written is None else f" {written / 2**30:8.2f} GiB written"))


def plain_tar(root: Path, options: list[str], listed: Path) -> tuple[float, int, float, int]:
    """`tar cf` of the files `listed` names, in that order, timed, and the bytes it wrote.
    --hard-dereference stores every file whole; it also spares tar the table of every file it
    archived that it keeps otherwise (75 MB at 900,000 files)."""
    plain = root / "plain.tar"
    seconds, memory, cpu = measured(["tar", "cf", str(plain), *options, "--verbatim-files-from", "-T", str(listed)], root)
    written = plain.stat().st_size
    plain.unlink()
    return seconds, memory, cpu, written


def members_tars(root: Path, shards: Path) -> tuple[float, int, float, int]:
    """A plain tar write of the bytes `mhmd shard` wrote: each of its tars extracted (untimed) into a
    folder of files, a sample's jpg, json and cls each a file, then `tar cf` of them in the tar's order
    timed, one tar a shard as a plain-tar shard writer works (the webdataset format is any tar whose
    samples' files lie together); the sums over the shards (memory: the largest). A shard at a time,
    in memory (/dev/shm where there is one), so that the files tar reads are in the page cache, as
    shard's inputs are: at the paper's size the extracted files of every shard (~4 M, 4 KB a file on
    disk) do not fit in this machine's memory, and ext4 made files at ~0.7 ms each after a few
    million had been removed."""
    listed, total = root / "members.txt", [0.0, 0, 0.0, 0]
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else root) as scratch:
        for number, tar in enumerate(sorted(shards.glob("*.tar"))):
            folder = Path(scratch) / str(number)
            folder.mkdir()
            names = subprocess.run(["tar", "xvf", str(tar), "-C", str(folder)], check=True,
                                   capture_output=True, text=True).stdout
            listed.write_text(names)
            run = plain_tar(root, ["--hard-dereference", "-C", str(folder)], listed)
            total = [total[0] + run[0], max(total[1], run[1]), total[2] + run[2], total[3] + run[3]]
            shutil.rmtree(folder)
    return tuple(total)


def sharded_jpegs(work: WorkDir, out: Path) -> Path:
    """The JPEGs the last `mhmd shard` wrote into its tars (its records), one path a line relative to
    the work directory, written to `out`: what `tar cf` is timed on (the frames detection rejected
    have JPEGs too, which shard does not write)."""
    records = work.read_arrow("shard", columns=["frame_id", "movie_id"])
    if records is None:
        raise SystemExit("tar cf: run shard first (it tars the JPEGs the shards hold)")
    jpegs = pa.table({"frame_id": records["frame_id"], "movie_id": records["movie_id"]}).join(
        pa.concat_tables(work.read_partition(EXTRACT, movie, columns=["frame_id", "jpeg"])
                         for movie in sorted(set(records["movie_id"].to_pylist()))), "frame_id")
    out.write_text("".join(f"{jpeg}\n" for jpeg in sorted(jpegs["jpeg"].to_pylist())))
    return out


def exponent(sizes: list[int], values: list[float]) -> float:
    """b of value ~ N^b, least squares on logs."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0]) if len(sizes) > 1 else math.nan


def linear(sizes: list[int], values: list[float]) -> float:
    """value at the paper's size on the straight line through the sizes run (least squares): fixed
    costs (imports, worker start) dominate small N and flatter the exponent; this does not."""
    return float(np.polyval(np.polyfit(sizes, values, 1), PAPER)) if len(sizes) > 1 else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 60_000], help="Sampled frames per run.")
    parser.add_argument("--films", type=int, default=20, help="Films at every size.")
    parser.add_argument("--frames-per-film", type=int, default=None,
                        help="Films in proportion to the size instead: N / this, rounded (at least 1).")
    parser.add_argument("--jpeg-kb", type=float, default=None, help="Link JPEGs of about this size (default ~1 KB).")
    parser.add_argument("--keep", type=Path, default=None, help="Make the work directories here and keep them.")
    parser.add_argument("--reuse", action="store_true",
                        help="Use the work directories --keep holds from an earlier run.")
    parser.add_argument("--commands", nargs="+", default=[*STEPS, *BASELINES], choices=[*STEPS, *BASELINES],
                        help="Run only these (a command that needs an earlier one's output needs it run too).")
    args = parser.parse_args()
    jpeg = jpeg_of_size(args.jpeg_kb) if args.jpeg_kb else None
    runs = {}
    for n in args.sizes:
        films = max(1, round(n / args.frames_per_film)) if args.frames_per_film else args.films
        if args.keep:
            root = args.keep / f"n{n}"
            if not args.reuse:
                shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
            runs[n] = run_size(root, n, films, args.commands, jpeg)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                runs[n] = run_size(Path(tmp), n, films, args.commands, jpeg)
    sizes = list(runs)
    print(f"\n| command | {' | '.join(f'N={n:,}: s / CPU s / MiB' for n in sizes)} | time ~ N^b | memory ~ N^b "
          f"| at N={PAPER:,} (linear): s / CPU s / MiB |")
    print(f"|---|{'---:|' * len(sizes)}---:|---:|---:|")
    for name in runs[sizes[0]]:
        seconds, memory = [runs[n][name][0] for n in sizes], [runs[n][name][1] / 2**20 for n in sizes]
        cpu = [runs[n][name][2] for n in sizes]
        cells = [f"{t:.1f} / {c:.1f} / {m:.0f}" for t, c, m in zip(seconds, cpu, memory)]
        print(f"| {name} | {' | '.join(cells)} | {exponent(sizes, seconds):.2f} | {exponent(sizes, memory):.2f} "
              f"| {linear(sizes, seconds):.0f} / {linear(sizes, cpu):.0f} / {linear(sizes, memory):.0f} |")
    for n in sizes:
        for baseline in BASELINES if "shard" in runs[n] else ():
            if baseline in runs[n]:
                shard, tar = runs[n]["shard"], runs[n][baseline]
                print(f"N={n:,}: shard / {baseline} = {shard[0] / tar[0]:.2f}x wall, "
                      f"{shard[2] / max(tar[2], 1e-3):.2f}x CPU, {shard[3] / tar[3]:.2f}x the bytes")

if __name__ == "__main__":
    main()
