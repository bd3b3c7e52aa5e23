"""Near-duplicate films at scale: `footage.duplicate_groups` (the piece index) on synthetic
fingerprints of F films, against comparing every pair of films (`reaches` both ways), in one run.

    uv run python benchmarks/near_duplicates.py [--films 147 441 1470] [--hashes 9250] [--pairs-up-to 147]

Each film is `--hashes` random 64-bit hashes (the paper-size benchmark's films hold about 9,250
distinct ones); one film in 50 has a re-encoded copy (every hash 3 bits off), which must come out as
a group. Each size runs in its own process: wall and CPU seconds and the process's peak memory
(maxrss, the fingerprints included), the growth exponents over the sizes, and, up to
`--pairs-up-to` films, every pair compared (`reaches` both ways: what the index spares), whose
groups must be the same.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import numpy as np

from mhmd_builder.footage import duplicate_groups, reaches


def fingerprints(films: int, hashes: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prints = {f"film{i:05d}": np.unique(rng.integers(0, 2**64, hashes, dtype=np.uint64)) for i in range(films)}
    for i in range(0, films, 50):
        prints[f"film{i:05d}b"] = np.sort(prints[f"film{i:05d}"] ^ np.uint64(0b10101 << 30))
    return prints


def every_pair(prints: dict[str, np.ndarray]) -> list[list[str]]:
    """The groups comparing every pair finds (connected pairs that reach each other both ways)."""
    movies = sorted(prints)
    group = {movie: {movie} for movie in movies}
    for i, a in enumerate(movies):
        for b in movies[i + 1:]:
            if reaches(prints[a], prints[b]) and reaches(prints[b], prints[a]):
                merged = group[a] | group[b]
                group.update({movie: merged for movie in merged})
    return [list(g) for g in sorted({tuple(sorted(g)) for g in group.values() if len(g) > 1})]


def measure(films: int, hashes: int, pairs: bool) -> dict:
    """One size, in this process: the index, then (if `pairs`) every pair compared."""
    prints = fingerprints(films, hashes)
    wall, cpu = time.perf_counter(), time.process_time()
    groups = duplicate_groups(prints)
    result = {"films": films, "hashes": sum(map(len, prints.values())), "s": time.perf_counter() - wall,
              "cpu": time.process_time() - cpu, "mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "groups": len(groups)}
    if pairs:
        wall, cpu = time.perf_counter(), time.process_time()
        same = every_pair(prints) == groups
        result.update(pairs_s=time.perf_counter() - wall, pairs_cpu=time.process_time() - cpu, same=same)
    return result


def exponent(sizes: list[float], values: list[float]) -> float:
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0]) if len(sizes) > 1 else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", type=int, nargs="+", default=[147, 441, 1470])
    parser.add_argument("--hashes", type=int, default=9250, help="Hashes a film.")
    parser.add_argument("--pairs-up-to", type=int, default=147, help="Compare every pair up to this many films.")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single size, in a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.hashes, args.one <= args.pairs_up_to)))
        return
    rows = []
    for films in args.films:
        child = subprocess.run([sys.executable, __file__, "--one", str(films), "--hashes", str(args.hashes),
                                "--pairs-up-to", str(args.pairs_up_to)], capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout))
        row = rows[-1]
        pairs = (f", every pair {row['pairs_s']:.1f} s / {row['pairs_cpu']:.1f} CPU s "
                 f"({row['pairs_s'] / row['s']:.1f}x the index; same groups: {row['same']})" if "same" in row else "")
        print(f"{films} films ({row['hashes']:,} hashes): {row['s']:.1f} s / {row['cpu']:.1f} CPU s / "
              f"{row['mib']:.0f} MiB, {row['groups']} groups{pairs}", flush=True)
    sizes = [row["hashes"] for row in rows]
    print(f"growth over the hashes: time ~ N^{exponent(sizes, [r['s'] for r in rows]):.2f}, "
          f"CPU ~ N^{exponent(sizes, [r['cpu'] for r in rows]):.2f}, memory ~ N^{exponent(sizes, [r['mib'] for r in rows]):.2f}")
    if any(row.get("same") is False for row in rows):
        raise SystemExit("the index's groups differ from every pair's")


if __name__ == "__main__":
    main()
