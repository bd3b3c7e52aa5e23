"""Shard writing throughput: `mhmd shard` against `tar cf` of the same JPEG files, in one run.

    uv run python benchmarks/shard.py [--frames 6000] [--repeats 3] [--workers N]

The frames come from a film of zooms over ultralytics' sample photos, extracted by the project at
24 fps with duplicates kept (no detection: every frame that passed quality is sharded). `tar cf`
reads the JPEG files and writes one tar; `mhmd shard` also reads the work directory's tables, writes
the json of each sample, shuffles, splits into tars of 1,000 and writes them in parallel (one process
per core unless --workers). Both write to the same disk; each `mhmd shard` run starts from an empty
output folder and work directory records (no tar is kept from an earlier run).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from detect import make_frames  # benchmarks/detect.py: the same frames

from mhmd_builder.devices import machine_cores
from mhmd_builder.runners import LocalRunner
from mhmd_builder.shard import STAGE, shard


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=machine_cores())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        work = make_frames(root, args.frames)
        jpegs = sorted(work.root.glob("frames/*/*.jpg"))
        megabytes = sum(p.stat().st_size for p in jpegs) / 1e6
        print(f"{len(jpegs)} JPEGs, {megabytes:.0f} MB; mhmd shard with {args.workers} workers")
        runner = LocalRunner(args.workers)
        rows = []
        for _ in range(args.repeats):
            shutil.rmtree(root / "shards", ignore_errors=True)
            shutil.rmtree(work.stage_dir(STAGE), ignore_errors=True)
            baseline = timed(lambda: subprocess.run(["tar", "cf", str(root / "plain.tar"), "-C", str(work.root),
                                                     "frames"], check=True))
            ours = timed(lambda: shard(work, root / "shards", runner=runner))
            rows.append((baseline, ours))
            print(f"tar cf {len(jpegs) / baseline:8.0f} files/s   mhmd shard {len(jpegs) / ours:8.0f} samples/s")
        baseline, ours = (sorted(column)[len(column) // 2] for column in zip(*rows))
        print(f"median: tar cf {baseline:.2f} s, mhmd shard {ours:.2f} s, "
              f"throughput ratio (mhmd / tar) {baseline / ours:.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
