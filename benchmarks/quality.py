"""Quality scoring: its cost against decoding, and the calibration of the default thresholds.

    uv run python benchmarks/quality.py speed      # scoring cost / decode cost, 1080p H.264 source
    uv run python benchmarks/quality.py calibrate  # score distributions and decisions per kind of frame
    uv run python benchmarks/quality.py refilter   # `mhmd filter`'s decisions on 1M recorded rows

`speed` generates a 1080p H.264 clip, times `ffmpeg -i clip -f null -` (plain decode, all cores),
decodes the frames that 1-fps sampling picks at the working size (<= 640 px, as `mhmd extract`
does), and times the quality filter on them (one thread, as an extract worker runs). The ratio it
prints is: scoring time per sampled frame / decode time of the source frames that one sample
spans (1 s of video at 1 fps). It also prints the much stricter per-decoded-frame ratio.

`calibrate` encodes clips of known kinds (colour, grey, tinted, blurred, dark, overexposed,
low-resolution, grainy, frozen) from real colour video (../shared/samples, when present) and
generated colour scenes with persons, decodes them at 1 fps like extract, and prints Markdown
tables: score percentiles and the share of frames kept or rejected per kind, then the real
black-and-white photos, then duplicate runs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import ffmpeg
import numpy as np
import pandas as pd

from mhmd_builder.demo import person_scene
from mhmd_builder.filter import decide
from mhmd_builder.quality import REASONS, SCORE_NAMES, QualityFilter, QualityThresholds, judge, score_frame

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
WORKING_SIDE = 640


def run_ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    no_input = [] if stdin is not None else ["-nostdin"]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *no_input, *args], input=stdin, check=True)


def decode(path: Path, fps: float = 1.0, max_side: int = WORKING_SIDE) -> list[np.ndarray]:
    """Frames sampled at `fps`, scaled down (area) so the longer side is at most max_side, like extract."""
    video = next(s for s in ffmpeg.probe(str(path))["streams"] if s["codec_type"] == "video")
    w, h = int(video["width"]), int(video["height"])
    scale = min(1.0, max_side / max(w, h))
    w, h = int(w * scale / 2) * 2, int(h * scale / 2) * 2
    out, _ = (ffmpeg.input(str(path)).video.filter("fps", fps).filter("scale", w, h, flags="area")
              .output("pipe:", format="rawvideo", pix_fmt="bgr24").global_args("-v", "error", "-nostdin")
              .run(capture_stdout=True))
    return list(np.frombuffer(out, np.uint8).reshape(-1, h, w, 3))


# -- speed ----------------------------------------------------------------------------------------
def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def speed(seconds: int, rate: int, repeats: int) -> None:
    cv2.setNumThreads(1)  # as in an extract worker
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        run_ffmpeg("-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate={rate}", "-t", str(seconds),
                   "-c:v", "libx264", "-preset", "medium", "-crf", "20", "-pix_fmt", "yuv420p", str(clip))
        decode_s = best_of(repeats, lambda: run_ffmpeg("-i", str(clip), "-f", "null", "-"))
        frames = decode(clip)

        def score_all() -> None:
            qf = QualityFilter()
            for i, frame in enumerate(frames):
                qf.push(frame, {"frame_id": str(i), "timestamp": float(i), "source_size": (1920, 1080)})
            qf.flush()

        score_s = best_of(repeats, score_all)
    decoded = seconds * rate
    per_decoded = decode_s / decoded
    per_sample = score_s / len(frames)
    h, w = frames[0].shape[:2]
    print(f"source: {seconds} s of 1920x1080 H.264 at {rate} fps ({decoded} frames), testsrc2, crf 20")
    print(f"decode (ffmpeg -i clip -f null -): {decode_s:.2f} s = {per_decoded * 1e3:.2f} ms per frame")
    print(f"quality filter on {len(frames)} frames sampled at 1 fps, {w}x{h}: {per_sample * 1e3:.2f} ms per frame")
    print(f"RATIO scoring / decode of the {rate} frames one 1-fps sample spans: "
          f"{per_sample / (per_decoded * rate):.1%}  (target <= 10%)")
    print(f"strict ratio, scoring one frame / decoding one frame: {per_sample / per_decoded:.1%}")


def refilter_speed(rows: int, per_movie: int) -> None:
    """decide() (the core of `mhmd filter`) on synthetic recorded scores: no decoding, pure table work."""
    rng = np.random.default_rng(0)
    index = np.arange(rows)
    frames = pd.DataFrame({"frame_id": [f"m{i // per_movie}_{i}" for i in index],
                           "movie_id": [f"m{i // per_movie}" for i in index],
                           "timestamp": (index % per_movie).astype(float)})
    for name in SCORE_NAMES:
        frames[name] = rng.random(rows) * 100
    frames["phash_hi"] = rng.integers(0, 2 ** 32, rows).astype(float)
    frames["phash_lo"] = frames["phash_hi"]  # every frame unrelated to the next: runs of one
    seconds = best_of(1, lambda: decide(frames, QualityThresholds()))
    print(f"decide() on {rows} recorded frames ({rows // per_movie} movies): {seconds:.1f} s "
          f"= {seconds / rows * 1e6:.1f} us per frame")


# -- calibration ----------------------------------------------------------------------------------
def tint(r: float, g: float, b: float) -> str:
    """Monochrome with a coloured white point: each channel is a multiple of the luma."""
    luma = (0.299, 0.587, 0.114)
    return "colorchannelmixer=" + ":".join(f"{k * c:.4f}" if i < 3 else "0"
                                           for k in (r, g, b) for i, c in enumerate((*luma, 0)))


SEPIA = "colorchannelmixer=.393:.769:.189:0:.349:.686:.168:0:.272:.534:.131"
GRAIN = "noise=alls=16:allf=t"  # on every plane: luma grain and chroma noise, the hard case for grey
BLUR = "scale=512:-2,gblur=sigma={}:steps=4"  # steps=4: close to a true Gaussian (steps=1 is not)
VARIANTS = {
    "colour": None,
    "colour+grain": GRAIN,
    "grey": "hue=s=0",
    "grey+grain": f"hue=s=0,{GRAIN}",
    "sepia": SEPIA,
    "sepia+grain": f"{SEPIA},{GRAIN}",
    "cyan": tint(0.65, 0.95, 1.0),
    "amber": tint(1.0, 0.75, 0.35),
    "blue night": tint(0.55, 0.75, 1.0),
    "blur 3 @512": BLUR.format(3),
    "blur 3 @512+grain": f"{BLUR.format(3)},{GRAIN}",
    "blur 2 @512": BLUR.format(2),
    "fade to black (x0.12)": "colorlevels=romax=0.12:gomax=0.12:bomax=0.12",
    "fade to white (>=0.85)": "colorlevels=romin=0.85:gomin=0.85:bomin=0.85",
    "blown out (>=45% white)": "curves=all='0/0.3 0.45/1 1/1'",
    "low res (192 px)": "scale=192:-2",
}
SHOWN = ["colorfulness", "chroma_spread", "hue_concentration", "blur_sigma", "sharpness", "mean_luma",
         "black_fraction", "white_fraction"]


def sources(tmp: Path) -> dict[str, Path]:
    """Colour clips with persons (real when ../shared is here, and generated), plus testsrc2."""
    found = {}
    if (SAMPLES / "videos").is_dir():
        found["vtest (real)"] = SAMPLES / "videos" / "vtest_pets2009_480x360_h264.avi"
        found["dancer (real)"] = SAMPLES / "videos" / "dancer.avi"
    rng = np.random.default_rng(7)
    scenes = np.stack([person_scene(rng) for _ in range(60)])
    found["scenes (generated)"] = tmp / "scenes.mp4"
    run_ffmpeg("-f", "rawvideo", "-pix_fmt", "bgr24", "-s", "640x360", "-r", "1", "-i", "pipe:", "-c:v", "libx264",
               "-crf", "18", "-pix_fmt", "yuv420p", str(found["scenes (generated)"]), stdin=scenes.tobytes())
    found["testsrc2"] = tmp / "testsrc2.mp4"
    run_ffmpeg("-f", "lavfi", "-i", "testsrc2=size=640x360:rate=24", "-t", "60", "-c:v", "libx264",
               "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", str(found["testsrc2"]))
    return found


def kind_rows(tmp: Path, clips: dict[str, Path]) -> pd.DataFrame:
    thresholds = QualityThresholds()
    rows = []
    for source, path in clips.items():
        for kind, vf in VARIANTS.items():
            clip = tmp / "variant.mp4"
            # Only the frames 1-fps sampling will pick are encoded (H.264, 4:2:0, like a film).
            run_ffmpeg("-i", str(path), "-an", "-vf", ",".join(["fps=1", *([vf] if vf else [])]), "-c:v", "libx264",
                       "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", str(clip))
            for frame in decode(clip):
                scores = score_frame(frame)
                rows.append({"kind": kind, "source": source, **scores, "flags": ",".join(judge(scores, thresholds))})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no tabulate dependency for a benchmark printout)."""
    lines = ["| " + " | ".join([str(df.index.name or ""), *map(str, df.columns)]) + " |",
             "|" + "---|" * (len(df.columns) + 1)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples()]
    return "\n".join(lines)


def score_table(rows: pd.DataFrame) -> pd.DataFrame:
    """p1 / p50 / p99 of each shown score per kind."""
    def cell(s: pd.Series) -> str:
        p1, p50, p99 = np.percentile(s, [1, 50, 99])
        return f"{p1:.3g} / {p50:.3g} / {p99:.3g}"
    return rows.groupby("kind", sort=False)[SHOWN].agg(cell)


def decision_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per kind: % of frames kept, and % carrying each flag (a frame may carry several)."""
    by_kind = rows.groupby("kind", sort=False)
    table = pd.DataFrame({"frames": by_kind.size(), "kept %": by_kind["flags"].apply(lambda f: 100 * (f == "").mean())})
    for reason in REASONS[:-1]:
        table[reason] = by_kind["flags"].apply(lambda f: 100 * f.str.contains(reason).mean())
    return table.round(1)


def photo_table() -> pd.DataFrame | None:
    folder = SAMPLES / "photos" / "bw"
    if not folder.is_dir():
        return None
    thresholds = QualityThresholds()
    rows = []
    for path in sorted(folder.glob("*.jpg")):
        image = cv2.imread(str(path))
        scale = min(1.0, WORKING_SIDE / max(image.shape[:2]))
        frame = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        scores = score_frame(frame, image.shape[1::-1])
        rows.append({"photo": path.name, **{k: round(scores[k], 2) for k in SHOWN[:4]},
                     "flags": ",".join(judge(scores, thresholds)) or "kept"})
    return pd.DataFrame(rows).set_index("photo")


def duplicate_table(tmp: Path, clips: dict[str, Path]) -> pd.DataFrame:
    """Share of 1-fps frames flagged duplicate, per clip and hash distance."""
    clips = dict(clips)
    clips["frozen frame + grain"] = tmp / "frozen.mp4"
    run_ffmpeg("-f", "lavfi", "-i", "testsrc2=size=640x360:rate=24", "-vf", f"trim=end_frame=1,loop=719:1,{GRAIN}",
               "-t", "30", "-c:v", "libx264", "-crf", "20", "-pix_fmt", "yuv420p", str(clips["frozen frame + grain"]))
    table = {}
    for name, path in clips.items():
        frames = decode(path)
        table[name] = {"frames": len(frames)}
        for distance in (-1, 2, 4, 6, 8):
            qf = QualityFilter(QualityThresholds(max_hash_distance=distance))
            verdicts = [v for i, f in enumerate(frames) for v in qf.push(f, {"frame_id": str(i)})] + qf.flush()
            table[name][f"d={distance}"] = round(100 * np.mean(["duplicate" in v.flags for v in verdicts]), 1)
    return pd.DataFrame.from_dict(table, orient="index")


def calibrate() -> None:
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        clips = sources(Path(tmp))
        rows = kind_rows(Path(tmp), clips)
        print("### Score percentiles per kind (p1 / p50 / p99), all sources\n")
        print(markdown(score_table(rows)), "\n")
        print("### Decisions per kind (% of frames kept, and carrying each flag; duplicates off)\n")
        print(markdown(decision_table(rows)), "\n")
        colour = rows[rows.kind == "colour"]
        print("### Colour frames kept, per source\n")
        print(markdown(colour.groupby("source")["flags"].apply(lambda f: f"{(f == '').mean():.1%} of {len(f)}")
                       .to_frame("kept")), "\n")
        photos = photo_table()
        if photos is not None:
            print("### Real black-and-white photos (../shared/samples/photos/bw)\n")
            print(markdown(photos), "\n")
        print("### Frames flagged duplicate (%) by max_hash_distance (-1: off)\n")
        print(markdown(duplicate_table(Path(tmp), clips)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("speed", help="scoring cost against decode cost")
    sp.add_argument("--seconds", type=int, default=20)
    sp.add_argument("--rate", type=int, default=24)
    sp.add_argument("--repeats", type=int, default=3)
    sub.add_parser("calibrate", help="score distributions and decisions per kind of frame")
    rf = sub.add_parser("refilter", help="mhmd filter's decisions on recorded scores")
    rf.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.command == "speed":
        speed(args.seconds, args.rate, args.repeats)
    elif args.command == "refilter":
        refilter_speed(args.rows, per_movie=5000)
    else:
        calibrate()


if __name__ == "__main__":
    sys.exit(main())
