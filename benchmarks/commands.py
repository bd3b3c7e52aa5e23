"""What the learning benchmarks share: running `mhmd` as a user types it, and timing each step."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import time

UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a command's lines as they are printed, not when it ends


def mhmd(*args: str) -> None:
    """`uv run mhmd ARGS`, its output shown (indented) as it comes; exits if it fails."""
    command = ["uv", "run", "mhmd", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=UNBUFFERED) as process:
        for line in process.stdout:
            print(f"    {line}", end="", flush=True)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {process.returncode})")


def mhmd_json(*args: str) -> dict:
    """`uv run mhmd ARGS --json`: what it prints on stdout, parsed (its notices go to the terminal)."""
    command = ["uv", "run", "mhmd", *args, "--json"]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=UNBUFFERED)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode})")
    return json.loads(result.stdout)


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(timings: dict[str, float], step: str, work, *args, cpu: dict[str, float] | None = None):
    """Run work(*args), record and print its wall time (and, given `cpu`, its child processes' CPU time)."""
    print(f"{step} ...", flush=True)
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    result = work(*args)
    timings[step] = time.perf_counter() - started
    if cpu is not None:
        cpu[step] = children_cpu_seconds() - cpu_started
    print(f"{step}: {timings[step]:.0f} s", flush=True)
    return result
