"""Every CUDA path of mhmd, run once on a GPU machine and checked against its CPU path, then the
headline throughputs beside their targets.

    uv run python benchmarks/gpu_check.py [--json results.json] [--only extract detect ...] [--dry-run]

Checks (each in its own try/except with its own time limit: a failure is one line and the next
check runs; expected to take about 5 minutes on one H200 with 16 cores, not yet run there):
  extract      NVDEC frames (`--decoder cuda`) against the CPU's on a 1080p H.264 film made here:
               same timestamps, pixels within a level; then `mhmd extract --decoder cuda` of 4 films
               at once against `ffmpeg -hwaccel cuda -f null` and against the CPU's decode on every core
  detect       `mhmd detect` on CUDA (JPEGs decoded on the GPU) against ultralytics' own predict on
               the same GPU: the persons per frame, then frames/s of both (yolo11n at 640, fp16)
  labeler      the labeler (ResNet-50, 224) on CUDA in fp16 against the CPU: top-1 confidences; img/s
  historynet   one bf16 and one fp32 training step at 224 from the same weights (the L2(ab) terms
               agree); train img/s at 224, batch 64, bf16
  ray          `extract --decoder cuda` through the Ray runner: actors holding a share of a GPU
  torchrun     one process under torchrun: an NCCL process group, an all-reduce, one DDP step

YOLO weights: yolo11n.pt from ../shared/samples, the mhmd weights cache or ultralytics' weights folder
when one is there and matches its pinned SHA-256, else yolo11n.yaml with random weights (the same
compute, but few or no persons: the detection comparison then says so). The labeler and HistoryNet
run with random weights: their throughput does not depend on them.

`--dry-run` runs on a CPU-only machine in well under a minute: every check runs its CPU side, small,
and reports "skipped: no CUDA" for its CUDA side. `--json PATH` also writes every result, for
RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks, when imported by a test

from detect import make_frames  # noqa: E402  (benchmarks/detect.py)
from extract import make_film as make_1080p_film  # noqa: E402  (benchmarks/extract.py)

SHARED_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
TARGETS = {"extract_vs_cpu_decode": 3.0, "detect_frames_per_s": 2000.0, "detect_vs_ultralytics": 1.0,
           "historynet_img_per_s": 1000.0}


class Skipped(Exception):
    """The CUDA side of a check cannot run here; its CPU side has run."""


@dataclass
class Check:
    name: str
    run: object  # (Context) -> dict of metrics; raises Skipped after its CPU side on a machine without CUDA
    timeout_s: float


@dataclass
class Context:
    dry_run: bool
    root: Path
    cuda: bool
    metrics: dict = field(default_factory=dict)  # the check's numbers so far: kept when it fails or is skipped

    def note(self, **values) -> None:
        self.metrics.update(values)


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run_all(commands: list[list[str]]) -> float:
    """Seconds to run the commands at once, each to its end; CalledProcessError if one fails."""
    started = time.perf_counter()
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for c in commands]
    for command, proc in zip(commands, procs):
        _, err = proc.communicate()
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, command, stderr=err)
    return time.perf_counter() - started


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- extract --------------------------------------------------------------------------------------
def films(ctx: Context) -> list[Path]:
    """One 1080p H.264 film (40 s) and three copies of its stream with other metadata: four films of
    different content hashes, so extract takes each. A dry run: the film alone, 1 s long."""
    folder = ctx.root.parent / "films"  # made once for the checks that use them
    folder.mkdir(exist_ok=True)
    first = make_1080p_film(folder, 1 if ctx.dry_run else 40)
    copies = [first]
    for i in range(1, 1 if ctx.dry_run else 4):
        copies.append(folder / f"copy{i}.mp4")
        if not copies[-1].exists():
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(first), "-c", "copy",
                            "-metadata", f"title=copy {i}", str(copies[-1])], check=True)
    return copies


def decoded(film: Path, decoder: str) -> list[tuple[float, np.ndarray]]:
    """The film's frames at 2 per second from `decoder`; RuntimeError when ffmpeg failed or NVDEC refused it."""
    from mhmd_builder.media import DecodeStats, Sampling, decode_frames, output_size, probe

    info, stats = probe(film), DecodeStats()
    frames = list(decode_frames(film, Sampling("fps", 2.0), output_size(info, None, 640), stats=stats,
                                demuxer=info.demuxer, decoder=decoder))
    if stats.returncode or stats.gpu_refused:
        raise RuntimeError(f"decoding with {decoder}: ffmpeg exit {stats.returncode}, NVDEC refused: "
                           f"{stats.gpu_refused}, {stats.error}")
    return frames


def extracted_seconds(paths: list[Path], work: Path, decoder: str) -> float:
    """Wall seconds of `mhmd extract` (one worker per film) with `decoder`; every film must be done with it."""
    from mhmd_builder.extract import ExtractSettings, extract
    from mhmd_builder.runners import LocalRunner

    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    outcomes = extract(paths, work, ExtractSettings(decoder=decoder), LocalRunner(len(paths)))
    seconds = time.perf_counter() - started
    bad = [f"{o.path}: {o.status} {o.reason or ''} decoder {o.summary.get('decoder')}" for o in outcomes
           if o.status != "done" or o.summary.get("decoder") != decoder]
    if bad:
        raise RuntimeError(f"extract --decoder {decoder}: {bad[0]}")
    return seconds


def check_extract(ctx: Context) -> dict:
    from mhmd_builder.media import cuda_decoding_problem, probe

    paths = films(ctx)
    film_seconds = sum(probe(p).duration for p in paths)
    cpu = decoded(paths[0], "cpu")
    cores = os.cpu_count()
    cpu_decode = run_all([["ffmpeg", "-nostdin", "-v", "error", "-i", str(p), "-f", "null", "-"] for p in paths])
    ctx.note(films=len(paths), film_seconds=film_seconds, sampled_frames=len(cpu), cores=cores,
             cpu_decode_film_s_per_s=film_seconds / cpu_decode)
    ctx.note(extract_cpu_film_s_per_s=film_seconds / extracted_seconds(paths, ctx.root / "work-cpu", "cpu"))
    problem = cuda_decoding_problem()
    if problem:
        raise Skipped(f"no CUDA ({problem})")
    gpu = decoded(paths[0], "cuda")
    if [t for t, _ in gpu] != [t for t, _ in cpu]:
        raise RuntimeError(f"NVDEC sampled other frames: {len(gpu)} frames, {len(cpu)} on the CPU")
    differences = [np.abs(a.astype(np.int16) - b).mean() for (_, a), (_, b) in zip(gpu, cpu)]
    ctx.note(nvdec_mean_abs_difference=float(np.mean(differences)), nvdec_worst_frame=float(np.max(differences)))
    if max(differences) > 1.0:
        raise RuntimeError(f"NVDEC pixels differ from the CPU's by {max(differences):.2f} levels on average in a frame")
    gpu_null = run_all([["ffmpeg", "-nostdin", "-v", "error", "-hwaccel", "cuda", "-i", str(p), "-f", "null", "-"]
                        for p in paths])
    extract_gpu = extracted_seconds(paths, ctx.root / "work-cuda", "cuda")
    ctx.note(ffmpeg_hwaccel_null_film_s_per_s=film_seconds / gpu_null, extract_cuda_film_s_per_s=film_seconds / extract_gpu,
             extract_vs_ffmpeg_hwaccel=gpu_null / extract_gpu, extract_vs_cpu_decode=cpu_decode / extract_gpu)
    return ctx.metrics


# -- detect ---------------------------------------------------------------------------------------
def yolo_weights() -> tuple[str, str]:
    """(model, where it came from): yolo11n.pt wherever a checked copy lies, else its config."""
    from mhmd_builder.weights import PINNED_SHA256, WeightsError, verify_sha256, weights_cache

    places = [*SHARED_SAMPLES.rglob("yolo11n.pt"), weights_cache() / "yolo11n.pt"]
    try:
        from ultralytics.utils import SETTINGS

        places.append(Path(SETTINGS["weights_dir"]) / "yolo11n.pt")
    except Exception:  # noqa: BLE001 - an ultralytics without that setting: look no further
        pass
    for place in places:
        if place.is_file():
            try:
                return str(verify_sha256(place, PINNED_SHA256["yolo11n.pt"])), f"yolo11n.pt ({place})"
            except WeightsError:
                continue
    return "yolo11n.yaml", "yolo11n.yaml, random weights (no yolo11n.pt here): few or no persons found"


def detect_rows(work, model: str, device: str, imgsz: int, batch: int):
    """(frame id -> persons, seconds the partition took) from `mhmd detect`, done afresh; on CUDA its
    JPEGs must have been decoded there."""
    from mhmd_builder.detect import DetectSettings, detect
    from mhmd_builder.runners import LocalRunner

    shutil.rmtree(work.stage_dir("detect"), ignore_errors=True)
    (result,) = detect(work, DetectSettings(model=model, device=device, imgsz=imgsz, batch=batch), LocalRunner(1))
    if not result.ok:
        raise RuntimeError(f"detect on {device}: {result.reason}")
    if device.startswith("cuda") and not result.summary["jpeg_decoder"].startswith("torchvision on cuda"):
        raise RuntimeError(f"detect on {device} decoded its JPEGs with {result.summary['jpeg_decoder']}")
    rows = work.read_table("detect")
    return dict(zip(rows.frame_id, rows.persons)), result.summary["seconds"]


def ultralytics_persons(model: str, paths: list[Path], device: str, imgsz: int, batch: int) -> tuple[list[int], float]:
    """Persons per image from ultralytics' own predict (fp16 on CUDA, as mhmd), and its seconds after a warm-up."""
    from ultralytics import YOLO

    yolo = YOLO(model)
    precision = {"quantize": 16} if device.startswith("cuda") else {}  # fp16 on CUDA, as mhmd detect
    options = dict(imgsz=imgsz, batch=batch, device=device, classes=[0], stream=True, verbose=False, **precision)
    for _ in yolo.predict([str(p) for p in paths[:batch]], **options):
        pass
    started = time.perf_counter()
    counts = [len(r.boxes) for r in yolo.predict([str(p) for p in paths], **options)]
    return counts, time.perf_counter() - started


def persons_agreement(ours: dict, theirs: list[int], paths: list[Path]) -> float:
    """The share of frames in which mhmd and ultralytics find as many persons."""
    return float(np.mean([ours[path.stem] == count for path, count in zip(paths, theirs, strict=True)]))


def jpeg_difference(paths: list[Path], device: str) -> float:
    """The largest mean difference (levels) of a frame decoded by `decode_jpegs` on `device` from OpenCV's."""
    from mhmd_builder.images import decode_jpegs, load_frame, read_frame

    decoded_there = decode_jpegs([read_frame(p) for p in paths], device)
    return max(float(np.abs(image.cpu().numpy().astype(np.int16) - load_frame(p)[:, :, ::-1].transpose(2, 0, 1)).mean())
               for image, p in zip(decoded_there, paths, strict=True))


def check_detect(ctx: Context) -> dict:
    imgsz, batch = (160, 8) if ctx.dry_run else (640, 64)
    model, source = ("yolo11n.yaml", "yolo11n.yaml, random weights (dry run)") if ctx.dry_run else yolo_weights()
    small = make_frames(ctx.root / "cpu", 16)  # the CPU side on a few frames: its speed is not in question
    small_paths = sorted(small.root.glob("frames/*/*.jpg"))
    ours, _ = detect_rows(small, model, "cpu", imgsz, batch)
    theirs, _ = ultralytics_persons(model, small_paths, "cpu", imgsz, batch)
    ctx.note(model=source, imgsz=imgsz, batch=batch, cpu_persons_agreement=persons_agreement(ours, theirs, small_paths),
             torchvision_cpu_jpeg_difference=jpeg_difference(small_paths, "cpu"))
    if not ctx.cuda:
        raise Skipped("no CUDA")
    work = make_frames(ctx.root / "cuda", 2048)
    paths = sorted(work.root.glob("frames/*/*.jpg"))
    ctx.note(nvjpeg_difference=jpeg_difference(paths[:64], "cuda:0"))
    if ctx.metrics["nvjpeg_difference"] > 1.0:
        raise RuntimeError(f"nvjpeg's pixels differ from OpenCV's by {ctx.metrics['nvjpeg_difference']:.2f} levels on average in a frame")
    ours, seconds = detect_rows(work, model, "cuda:0", imgsz, batch)
    theirs, their_seconds = ultralytics_persons(model, paths, "cuda:0", imgsz, batch)
    agreement = persons_agreement(ours, theirs, paths)
    ctx.note(frames=len(paths), persons_found=int(sum(theirs)), cuda_persons_agreement=agreement,
             detect_frames_per_s=len(paths) / seconds, ultralytics_frames_per_s=len(paths) / their_seconds,
             detect_vs_ultralytics=their_seconds / seconds)
    if agreement < 0.9:  # fp16 on both sides, nvjpeg against OpenCV's decode: a borderline person may come or go
        raise RuntimeError(f"mhmd detect on CUDA finds as many persons as ultralytics in only {agreement:.0%} of the frames")
    return ctx.metrics


# -- labeler --------------------------------------------------------------------------------------
def labeler_checkpoint(path: Path, arch: str, image_size: int) -> Path:
    import torch

    from mhmd_builder.labeler import build_model, save_checkpoint
    from mhmd_builder.taxonomy import load_taxonomy

    taxonomy = load_taxonomy()
    torch.manual_seed(0)
    save_checkpoint(build_model(arch, len(taxonomy)).eval(), {"arch": arch, "image_size": image_size,
                    "taxonomy_sha256": taxonomy.sha256, "label_names": taxonomy.names}, path)
    return path


def confidences(labeler, images: list[np.ndarray]) -> np.ndarray:
    frames = [{"frame_id": str(i), "movie_id": "m"} for i in range(len(images))]
    return np.array([r["label_confidence"] for r in labeler.predict_batch(list(zip(frames, images)), None)])


def check_labeler(ctx: Context) -> dict:
    from mhmd_builder.labeler import Labeler
    from mhmd_builder.taxonomy import load_taxonomy

    arch, size = ("resnet18", 64) if ctx.dry_run else ("resnet50", 224)
    checkpoint = labeler_checkpoint(ctx.root / f"labeler-{arch}.safetensors", arch, size)
    images = list(np.random.default_rng(0).integers(0, 256, (4 if ctx.dry_run else 64, size, size, 3), np.uint8))
    cpu = confidences(Labeler(checkpoint, load_taxonomy(), "cpu"), images[:4])
    ctx.note(arch=arch, image_size=size, cpu_images=4)
    if not ctx.cuda:
        raise Skipped("no CUDA")
    labeler = Labeler(checkpoint, load_taxonomy(), "cuda:0")
    difference = float(np.abs(confidences(labeler, images[:4]) - cpu).max())
    ctx.note(fp16_confidence_difference=difference)
    if difference > 0.01:
        raise RuntimeError(f"top-1 confidences on CUDA (fp16) differ from the CPU's by {difference:.4f}")
    confidences(labeler, images)  # warm-up: cuDNN picks its kernels
    batches = 40
    seconds = timed(lambda: [confidences(labeler, images) for _ in range(batches)])
    ctx.note(labeler_img_per_s=batches * len(images) / seconds)
    return ctx.metrics


# -- HistoryNet -----------------------------------------------------------------------------------
def train_batch(size: int, batch: int, device: str) -> dict:
    """A batch as train.batch_tensors gives it: L, ab and parsing in 0..1, labels, half of them known."""
    import torch

    g = torch.Generator().manual_seed(0)
    memory = torch.channels_last if device.startswith("cuda") else torch.contiguous_format
    image = lambda channels: torch.rand(batch, channels, size, size, generator=g).to(device).contiguous(memory_format=memory)  # noqa: E731
    return {"l": image(1), "ab": image(2), "labels": torch.randint(0, 42, (batch,), generator=g).to(device),
            "has_label": (torch.arange(batch) % 2 == 0).to(device), "parsing": image(1),
            "has_parsing": (torch.arange(batch) % 3 == 0).to(device)}


class Trainer:
    """HistoryNet's networks, optimisers and loss scalers as `mhmd historynet train` makes them."""

    def __init__(self, nets, device: str, precision: str):
        from mhmd_builder.historynet import train

        self.train, self.device = train, device
        self.models = train.wrap(nets, device, train.Process())
        settings = train.with_preset_defaults(train.TrainSettings(shards=[], out=""))
        self.optimizers = train.make_optimizers(nets, settings)
        self.scalers = train.loss_scalers(nets, device, precision)
        self.autocast = train.precision_autocast(device, precision)
        self.weights, self.info_term = train.loss_weights(settings), settings.info_term

    def step(self, x: dict) -> dict[str, float]:
        terms = self.train.train_step(self.models, self.optimizers, self.scalers, x, self.weights, self.info_term,
                                      self.autocast)
        return {k: float(v) for k, v in terms.items()}


def check_historynet(ctx: Context) -> dict:
    import torch

    from mhmd_builder.historynet.model import build_networks

    size, batch, width = (32, 2, 0.25) if ctx.dry_run else (224, 64, 1.0)
    device = "cuda:0" if ctx.cuda else "cpu"
    torch.manual_seed(0)
    nets = build_networks("historynet", 42, size, width)
    x = train_batch(size, batch, device)
    l2 = {precision: Trainer(copy.deepcopy(nets), device, precision).step(x)["generator/l2_ab"]
          for precision in ("fp32", "bf16")}
    ctx.note(device=device, image_size=size, batch=batch, width=width, first_step_l2_ab=l2)
    if not all(np.isfinite(v) for v in l2.values()) or abs(l2["bf16"] - l2["fp32"]) > 0.05 * abs(l2["fp32"]):
        raise RuntimeError(f"the first step's L2(ab) in bf16 and fp32 disagree: {l2}")
    if not ctx.cuda:
        raise Skipped("no CUDA")
    trainer = Trainer(nets, device, "bf16")
    for _ in range(3):  # warm-up: cuDNN's autotuner
        trainer.step(x)
    synchronize()
    steps = 10
    seconds = timed(lambda: ([trainer.step(x) for _ in range(steps)], synchronize()))
    ctx.note(historynet_img_per_s=steps * batch / seconds)
    return ctx.metrics


# -- Ray and torchrun -----------------------------------------------------------------------------
def check_ray(ctx: Context) -> dict:
    from mhmd_builder.extract import ExtractSettings, ExtractStage, extract
    from mhmd_builder.media import cuda_decoding_problem
    from mhmd_builder.runners import RayRunner
    from mhmd_builder.workdir import WorkDir

    gpus = ExtractStage(WorkDir(ctx.root / "ray"), ExtractSettings(decoder="cuda")).resources.gpus
    ctx.note(gpus_per_extract_worker=gpus)
    if not 0 < gpus < 1:
        raise RuntimeError(f"extract --decoder cuda asks Ray for {gpus} GPUs a worker: films would not share a GPU")
    if cuda_decoding_problem():
        raise Skipped("no CUDA")
    paths = films(ctx)[:2]
    outcomes = extract(paths, ctx.root / "ray", ExtractSettings(decoder="cuda"), RayRunner(workers=2))
    decoders = sorted({o.summary.get("decoder") for o in outcomes})
    ctx.note(ray_outcomes=[o.status for o in outcomes], decoders=decoders)
    if [o.status for o in outcomes] != ["done"] * len(paths) or decoders != ["cuda"]:
        raise RuntimeError(f"extract through Ray GPU actors: {[(o.status, o.reason) for o in outcomes]}, decoders {decoders}")
    return ctx.metrics


def nccl_worker() -> None:
    """Run by torchrun: an NCCL group of this one process, an all-reduce and one DDP step of G."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mhmd_builder.historynet.model import build_networks

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    total = torch.ones(1, device="cuda")
    dist.all_reduce(total)
    generator = DistributedDataParallel(build_networks("historynet", 42, 64, 0.25).generator.cuda(),
                                        device_ids=[torch.cuda.current_device()])
    out = generator(torch.rand(2, 1, 64, 64, device="cuda"))
    sum(t.float().mean() for t in vars(out).values() if torch.is_tensor(t)).backward()  # every output: no unused weights
    finite = all(torch.isfinite(p.grad).all() for p in generator.parameters() if p.grad is not None)
    print(f"nccl world {dist.get_world_size()} all_reduce {total.item():g} ddp_step_finite {finite}", flush=True)
    dist.destroy_process_group()


def check_torchrun(ctx: Context) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(Path(__file__).resolve()), "--nccl-worker"]
    ctx.note(torchrun=importlib.util.find_spec(command[2]) is not None)
    if not ctx.metrics["torchrun"]:
        raise RuntimeError(f"no {command[2]} in this environment")
    if not ctx.cuda:
        raise Skipped("no CUDA")
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("nccl ")), "")
    ctx.note(worker=line)
    if out.returncode or line != "nccl world 1 all_reduce 1 ddp_step_finite True":
        raise RuntimeError(f"torchrun exit {out.returncode}: {line or out.stderr.strip().splitlines()[-1:]}")
    return ctx.metrics


CHECKS = [Check("extract", check_extract, 150), Check("detect", check_detect, 120),
          Check("labeler", check_labeler, 45), Check("historynet", check_historynet, 60),
          Check("ray", check_ray, 60), Check("torchrun", check_torchrun, 45)]


# -- running --------------------------------------------------------------------------------------
def run_check(check: Check, ctx: Context) -> dict:
    """The check's status (ok, skipped, failed), its one-line detail and its numbers; a check past its
    time limit is left running in its thread (the script ends with os._exit) and reported failed."""
    outcome: dict = {}

    def target() -> None:
        try:
            check.run(ctx)
            outcome.update(status="ok", detail="")
        except Skipped as e:
            outcome.update(status="skipped", detail=f"skipped: {e}")
        except Exception as e:  # noqa: BLE001 - every failure is one line, and the next check runs
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            outcome.update(status="failed", detail=f"{type(e).__name__}: {detail}"[:300],
                           traceback=traceback.format_exc())

    started = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(check.timeout_s)
    if thread.is_alive():
        outcome = {"status": "failed", "detail": f"timed out after {check.timeout_s:g} s"}
    return {**outcome, "seconds": round(time.perf_counter() - started, 1), "metrics": dict(ctx.metrics)}


def headlines(results: dict) -> list[tuple[str, float | None, str]]:
    m = {name: r["metrics"] for name, r in results.items()}
    get = lambda check, key: m.get(check, {}).get(key)  # noqa: E731
    return [
        ("extract --decoder cuda / ffmpeg -hwaccel cuda -f null", get("extract", "extract_vs_ffmpeg_hwaccel"), "-"),
        (f"extract --decoder cuda / CPU decode ({get('extract', 'cores')} cores)", get("extract", "extract_vs_cpu_decode"),
         f">= {TARGETS['extract_vs_cpu_decode']:g}x"),
        ("detect frames/s (yolo11n, 640)", get("detect", "detect_frames_per_s"), f">= {TARGETS['detect_frames_per_s']:g}"),
        ("detect / ultralytics predict", get("detect", "detect_vs_ultralytics"), f">= {TARGETS['detect_vs_ultralytics']:g}x"),
        ("labeler predict img/s (resnet50, 224, fp16)", get("labeler", "labeler_img_per_s"), "-"),
        ("HistoryNet train img/s (224, batch 64, bf16)", get("historynet", "historynet_img_per_s"),
         f">= {TARGETS['historynet_img_per_s']:g}"),
    ]


def machine() -> str:
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        gpu = query.stdout.strip().replace("\n", "; ") or gpu
    return f"{platform.node()}: {os.cpu_count()} cores, {gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU sides only, small: for a machine without CUDA")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], help="run these checks only")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (films are reused)")
    parser.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nccl_worker:
        return nccl_worker()

    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    root = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check{' (dry run)' if args.dry_run else ''} on {machine()}, {datetime.datetime.now():%Y-%m-%d %H:%M}",
          flush=True)
    results = {}
    for check in CHECKS:
        if args.only and check.name not in args.only:
            continue
        ctx = Context(args.dry_run, root / check.name, cuda)
        ctx.root.mkdir(exist_ok=True)
        results[check.name] = result = run_check(check, ctx)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in result["metrics"].items()}
        print(f"{check.name:<11} {result['status']:<8} {result['seconds']:6.1f} s  {result['detail']}  {shown}", flush=True)
    print("\nheadline                                              value      target")
    lines = headlines(results)
    for name, value, target in lines:
        print(f"{name:<53} {'-' if value is None else f'{value:9.2f}':>9}  {target}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                         "dry_run": args.dry_run, "checks": results,
                                         "headlines": [{"name": n, "value": v, "target": t} for n, v, t in lines]},
                                        indent=1, default=str))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    sys.stdout.flush()
    # A check that timed out may still hold its thread: end without waiting for it.
    os._exit(1 if any(r["status"] == "failed" for r in results.values()) else 0)


if __name__ == "__main__":
    main()
