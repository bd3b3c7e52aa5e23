"""Benchmark: `mhmd extract` against the bare decoder, in one run, on one generated 1080p film.

    uv run python benchmarks/extract.py [--seconds 120] [--repeats 3] [--keep] [--pieces]

Times (wall clock, median of --repeats runs, each a fresh subprocess and a fresh work directory):
  1. `ffmpeg -i F -f null -`              the decoder alone: the physical limit of the stage
  2. `mhmd extract F -w W --fps 1`         goal: <= 1.10 x (1)
  3. `mhmd extract F -w W --keyframes`     goal: (2) / (3) >= 5
and peak memory (RSS) of each command's whole process tree. (1) and (2) also run on a film half
as long: peak memory must not grow with the film's length (issue 2, "Performance"), and the
difference between the two lengths is the per-second cost without start-up costs.
`--pieces` then times the parts of one extract in this process (import, probe, letterbox probe,
decode loop, quality scoring, JPEG encoding), to see where the time goes.

Peak RSS is measured by polling /proc every 50 ms and summing the resident size of the child and
all its descendants (Python + ffmpeg together); /usr/bin/time only reports the largest single
process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FPS = 24
# Film-like content that makes the encoder and decoder work realistically: testsrc2's moving,
# detailed, colourful pattern, its hue slowly rotating (colour variety), light temporal luma grain
# (film grain: every frame differs), framed at 2.40:1 with black letterbox bars as most films are
# (so the crop path of extract runs too). About 5.5 Mbit/s, like a 1080p web or Blu-ray rip.
CONTENT = (f"testsrc2=size=1920x800:rate={FPS},hue=H=2*PI*t/20:s=1.3,noise=c0s=3:allf=t,"
           "pad=1920:1080:0:140:black")
# A 10 s GOP (240 frames), as in the issue; no audio so both sides decode the same single stream.
ENCODE = ["-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-g", "240", "-an"]
RECIPE_VERSION = "v1"  # bump when CONTENT or ENCODE change, so cached films are regenerated
POLL_SECONDS = 0.05


def make_film(cache: Path, seconds: int) -> Path:
    """Generate the film once; later runs reuse it from the cache (generation takes about real time)."""
    path = cache / f"film-1080p-{seconds}s-{RECIPE_VERSION}.mp4"
    if not path.exists():
        print(f"generating {path.name} ({seconds} s of 1080p H.264) ...", flush=True)
        tmp = path.with_suffix(".part.mp4")
        subprocess.run(["ffmpeg", "-y", "-nostdin", "-v", "error", "-f", "lavfi", "-i", CONTENT,
                        "-t", str(seconds), *ENCODE, str(tmp)], check=True)
        tmp.rename(path)
    return path


def frame_count(path: Path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_frames", "-of", "json", str(path)], check=True, capture_output=True).stdout
    return int(json.loads(out)["streams"][0]["nb_frames"])


# -- measuring a command ---------------------------------------------------------------------------
def _processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, virtual size, resident pages) for every process
    (this kernel has no /proc/PID/task/*/children)."""
    procs = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # exited meanwhile
                continue
            # the command name may hold spaces and parentheses: fields resume after the last ')'
            fields = stat[stat.rindex(b")") + 2:].split()
            procs[int(entry.name)] = (int(fields[1]), int(fields[20]), int(fields[21]))
    return procs


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants, summed. A child caught between fork and
    exec (Python starting ffmpeg) still shows its parent's memory: it is not counted twice."""
    procs = _processes()
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, (ppid, _, _) in procs.items() if ppid in frontier and pid not in tree]
        tree.update(frontier)
    pages = 0
    for pid in tree:
        ppid, vsize, rss = procs.get(pid, (0, 0, 0))
        if pid != root and procs.get(ppid, (0, 0, 0))[1:] == (vsize, rss):
            continue  # same memory as its parent: a fork not yet exec'd
        pages += rss
    return pages * os.sysconf("SC_PAGE_SIZE")


def measure(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, peak RSS of the process tree in bytes, stdout) of one run of `cmd`.
    CPU time (user + system of the child and its descendants) moves much less than wall time when
    something else loads the machine, so both are reported."""
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: a chatty child cannot block
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4: the child tree's rusage
            if pid:
                break
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(POLL_SECONDS)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{stdout}")
    return wall, usage.ru_utime + usage.ru_stime, peak, stdout


def bench(commands: dict[str, object], repeats: int) -> dict[str, dict]:
    """Run every command `repeats` times, round-robin (so a burst of load from elsewhere hits all
    of them alike); median wall time and largest peak RSS of each. Each value of `commands` is a
    function of the run index giving a fresh command (a fresh work directory)."""
    results = {name: {"walls": [], "cpus": [], "peaks": []} for name in commands}
    for i in range(repeats):
        for name, cmd_for_run in commands.items():
            wall, cpu, peak, stdout = measure(cmd_for_run(i))
            results[name]["walls"].append(wall)
            results[name]["cpus"].append(cpu)
            results[name]["peaks"].append(peak)
            results[name]["out"] = stdout.strip().splitlines()[-1] if stdout.strip() else ""
            print(f"  run {i + 1}  {name:<26} wall {wall:6.2f} s  CPU {cpu:6.2f} s  "
                  f"peak RSS {peak / 2**20:4.0f} MiB  load {os.getloadavg()[0]:.1f}", flush=True)
    for r in results.values():
        r["median"], r["cpu"], r["peak"] = statistics.median(r["walls"]), statistics.median(r["cpus"]), max(r["peaks"])
    return results


def time_pieces(film: Path) -> None:
    """Where one `--fps 1` extract spends its time, piece by piece, in this process."""
    import cv2

    def clock(label: str, seconds: float) -> None:
        print(f"  {label:<60} {seconds:7.2f} s", flush=True)

    base = min(measure([sys.executable, "-c", "pass"])[0] for _ in range(3))
    imp = min(measure([sys.executable, "-c", "import mhmd_builder.cli"])[0] for _ in range(3))
    clock("import mhmd_builder.cli (beyond bare python)", imp - base)
    from mhmd_builder import media
    from mhmd_builder.extract import ExtractSettings
    from mhmd_builder.quality import QualityFilter

    settings = ExtractSettings()
    t = time.perf_counter()
    info = media.probe(film)
    clock("media.probe", time.perf_counter() - t)
    t = time.perf_counter()
    crop = media.detect_letterbox(film, info, 0.0, info.duration)
    clock(f"media.detect_letterbox -> {crop}", time.perf_counter() - t)
    size = media.output_size(info, crop, settings.max_side)
    for sampling in (settings.sampling, media.Sampling("keyframes")):
        quality, scoring, encoding, n = QualityFilter(settings.quality), 0.0, 0.0, 0
        t = time.perf_counter()
        for timestamp, frame in media.decode_frames(film, sampling, size, crop, 0.0, info.duration):
            t1 = time.perf_counter()
            quality.push(frame, {"frame_id": str(n), "timestamp": timestamp, "source_size": size})
            t2 = time.perf_counter()
            cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, settings.jpeg_quality])
            scoring, encoding, n = scoring + t2 - t1, encoding + time.perf_counter() - t2, n + 1
        total = time.perf_counter() - t
        clock(f"decode loop, {sampling.mode}: {n} frames of {size[0]}x{size[1]}", total - scoring - encoding)
        clock(f"  quality scoring ({n} frames)", scoring)
        clock(f"  JPEG encoding ({n} frames)", encoding)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=120, help="length of the generated film")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per command; the median is reported")
    ap.add_argument("--keep", action="store_true", help="keep the work directories (films stay cached anyway)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mhmd-bench",
                    help="where generated films are cached by name")
    ap.add_argument("--pieces", action="store_true", help="also time the parts of one extract in this process")
    args = ap.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    film = make_film(args.cache, args.seconds)
    half = make_film(args.cache, args.seconds // 2)
    frames = frame_count(film)
    work = Path(tempfile.mkdtemp(prefix="mhmd-bench-work-"))
    # The package's own interpreter, without `uv run`'s start-up in the timing.
    mhmd = [sys.executable, "-m", "mhmd_builder.cli", "extract"]

    def extract_cmd(path: Path, tag: str, *mode: str):
        return lambda i: [*mhmd, str(path), "-w", str(work / f"{tag}-{i}"), *mode]

    short = f"{args.seconds // 2} s film"
    decode_cmd = lambda path: lambda i: ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"]
    commands = {
        "ffmpeg -f null": decode_cmd(film),
        "extract --fps 1": extract_cmd(film, "fps1"),
        "extract --keyframes": extract_cmd(film, "keys", "--keyframes"),
        # The same on a film half as long: peak memory must not depend on the length, and the
        # difference of the two lengths gives the per-second cost without fixed start-up costs.
        f"ffmpeg -f null ({short})": decode_cmd(half),
        f"extract --fps 1 ({short})": extract_cmd(half, "half"),
    }
    print(f"film: {film} ({args.seconds} s, {frames} frames, {film.stat().st_size / 2**20:.0f} MiB); "
          f"work dirs under {work}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    try:
        res = bench(commands, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} (anything else running skews the times)")

    print()
    print("| command | median wall (s) | wall, each run (s) | median CPU (s) | peak RSS, process tree (MiB) |")
    print("|---|---:|---|---:|---:|")
    for name, r in res.items():
        runs = ", ".join(f"{w:.2f}" for w in r["walls"])
        print(f"| {name} | {r['median']:.2f} | {runs} | {r['cpu']:.2f} | {r['peak'] / 2**20:.0f} |")
    print()
    dec, fps1, keys = (res[k]["median"] for k in ("ffmpeg -f null", "extract --fps 1", "extract --keyframes"))
    ratio, speedup = fps1 / dec, fps1 / keys
    print(f"decoder: {frames / dec:.0f} frames/s decoded ({frames} frames in {dec:.2f} s)")
    print(f"extract --fps 1 / ffmpeg null decode = {ratio:.2f}  (goal <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'})")
    print(f"extract --fps 1 / --keyframes        = {speedup:.2f}x (goal >= 5x: {'met' if speedup >= 5 else 'MISSED'})")
    cpu = {k: res[k]["cpu"] for k in ("ffmpeg -f null", "extract --fps 1", "extract --keyframes")}
    print(f"same ratios in CPU time: {cpu['extract --fps 1'] / cpu['ffmpeg -f null']:.2f} and "
          f"{cpu['extract --fps 1'] / cpu['extract --keyframes']:.2f}x")
    # Cost of the second half of the film only: what a long film pays per second, once start-up
    # costs (import, probe, letterbox probe) are paid. In wall and in CPU time.
    for key, unit in (("median", "wall"), ("cpu", "CPU")):
        e_full, e_half = res["extract --fps 1"][key], res[f"extract --fps 1 ({short})"][key]
        d_full, d_half = res["ffmpeg -f null"][key], res[f"ffmpeg -f null ({short})"][key]
        print(f"second half of the film only ({unit}): extract {e_full - e_half:.2f} s / decode {d_full - d_half:.2f} s "
              f"= {(e_full - e_half) / (d_full - d_half):.2f}; fixed cost of extract beyond the decoder "
              f"~ {(e_full - d_full) - ((e_full - e_half) - (d_full - d_half)):.2f} s")
    print(f"peak RSS --fps 1: {args.seconds} s film {res['extract --fps 1']['peak'] / 2**20:.0f} MiB, "
          f"{short} {res[f'extract --fps 1 ({short})']['peak'] / 2**20:.0f} MiB")
    print(f"extract output (--fps 1): {res['extract --fps 1']['out']}")
    print(f"extract output (--keyframes): {res['extract --keyframes']['out']}")
    if args.pieces:
        print(f"\npieces of one extract of {film.name}, in this process:")
        time_pieces(film)


if __name__ == "__main__":
    main()
