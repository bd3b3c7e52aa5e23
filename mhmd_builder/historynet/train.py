"""Train HistoryNet from shards as the paper does: one generator, one critic (D1) and one info-classifier
(D2) step per batch, each with its own Adam, checkpoints to resume from, TensorBoard and a json log.

    summary = train(TrainSettings(shards="shards/", out="runs/h1"))            # 8 epochs, the paper's
    summary = train(TrainSettings(shards="shards/", out="runs/h1", steps=20_000, resume=True))

RUNDIR (`out`) holds:
- `checkpoints/step-00001234.safetensors`: every `save_every` steps and at the end of every epoch (those
  of epoch ends are all kept, of the others the newest `keep_checkpoints`): the networks, config and
  progress, what evaluate and colorize need (0.78 GB at 224 and width 1);
- `last.safetensors`: the newest of them with the Adam states besides, what `resume` continues from
  (2.3 GB at 224: the states of Adam are twice the networks);
- `best.safetensors`: the networks of the checkpoint with the lowest validation L2(ab) so far;
  with `ema` every checkpoint also holds G's exponential moving average, which validation, evaluate and
  colorize then use;
- `tensorboard/`: the loss terms every `log_every` steps, and at every checkpoint a grid of validation
  samples (L | predicted colour | ground truth) and the validation L2(ab) of G in eval mode on the first
  `val_samples` validation samples beside grey's (ab = 0) on the same samples (`validation/l2_ab`,
  `validation/grey_l2_ab`; also in each checkpoint's progress);
- `train.log.jsonl`: one line per logged step: step, epoch (0-based), images_per_second and the terms
  (`generator/l2_ab`, `critic/gradient_penalty`, `info_classifier/loss`...), unweighted.

Steps count batches (one G, one D1 and one D2 update each). An epoch is `epoch_samples` samples (the
train shards' count in their folder's index.json by default) drawn from the resampled, shuffled shard
stream (data.train_loader). Resuming restores the networks, the optimisers, the step and the epoch, but
not the data order: the stream of a resumed run is drawn with a seed made of (seed, epoch, step in the
epoch) at the restart, so an interrupted epoch is finished with fresh draws, not with the batches the
interrupted run would have seen; finished epochs are not repeated.

`precision` (PRECISIONS) is the forward passes' autocast dtype: fp32 (no autocast), bf16, or fp16 with a
loss scaler per network (CUDA only). Its default is fp32 with the `official` preset (the official code
trains in float32) and on the CPU (where bf16's speed depends on the CPU: measured 1.4x faster for G's
forward and backward at 64 px on an EPYC with avx512_bf16, and it is slower than float32 on CPUs
without bf16 instructions, while fp32 gives the same numbers on every CPU); bf16 on CUDA (float32's
range, so no loss scaling, and the tensor cores' speed), or fp16 on GPUs without bf16. The precision a run used is in its checkpoints' config. On CUDA the tensors are
channels_last.
Under `torchrun` (WORLD_SIZE > 1) every process trains on one GPU (LOCAL_RANK) with G, D1 and D2 wrapped
in DistributedDataParallel, and draws its own share of each epoch; only rank 0 writes. Batches are per
process and BatchNorm statistics stay per process (no SyncBatchNorm), as with the paper's one GPU.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models import VGG16_Weights

from ..devices import fixed_cpu_threads, pick_device
from ..errors import InputError, first_line
from ..logs import bars_disable
from ..shards import folder_indexes, indexed_samples, shard_urls, split_beside
from ..taxonomy import Taxonomy, load_taxonomy
from ..weights import WeightsError
from ..workdir import atomic_write_bytes
from .checkpoint import (Checkpoint, CheckpointError, colouring_generator, load_checkpoint, read_progress,
                         save_checkpoint)
from .data import eval_loader, rgb_from_lab, train_loader, unit_float
from .losses import INFO_TERMS, LOSS_PRESETS, LossWeights, critic_loss, generator_loss, info_classifier_loss
from .model import (VARIANTS, GeneratorOutput, Networks, build_networks, check_image_size, check_width,
                    load_vgg16_backbone)

log = logging.getLogger(__name__)

VGG16_FILE = Path(VGG16_Weights.IMAGENET1K_V1.url).name  # vgg16-397923af.pth
LAST = "last.safetensors"
BEST = "best.safetensors"
GREY_AB = 128 / 255  # ab = 0 in OpenCV's 8-bit Lab, as unit_float scales it
LOG = "train.log.jsonl"
# the three networks as checkpoint.py names them, and their optimisers
NETWORKS = ("generator", "critic", "info_classifier")


class HistoryNetError(InputError):
    """Training cannot start; the message is one line and says why."""


@dataclass(frozen=True)
class TrainSettings:
    shards: str | list[str]  # a brace pattern, a glob, a folder (its train split) or a list of these
    out: str  # RUNDIR
    variant: str = "historynet"  # one of model.VARIANTS
    preset: str = "recommended"  # loss weights (losses.LOSS_PRESETS), info term and warm-up (PRESET_SCHEDULES)
    warmup_steps: int | None = None  # G's first steps with its supervised terms only; None: the preset's
    # losses.INFO_TERMS: the official clipped KL on raw vectors, or softmax; None: the preset's
    info_term: str | None = None
    critic_weight: float | None = None  # G's weight on D1's term; None: the preset's (not the paper's otherwise)
    info_weight: float | None = None  # G's weight on D2's term; None: the preset's (not the paper's otherwise)
    ema: float = 0.0  # the decay of G's moving average kept for colouring; 0: none (not the paper's: it keeps none)
    epochs: int = 8  # the paper's
    steps: int | None = None  # when given, stop after this many steps instead (however many epochs that is)
    epoch_samples: int | None = None  # default: the train shards' count in their folder's index.json
    batch_size: int = 16  # per process
    lr: float = 2e-5
    betas: tuple[float, float] = (0.5, 0.999)
    image_size: int = 224
    width: float = 1.0  # the networks' channels, as a fraction of the paper's (model.scaled)
    device: str = "auto"
    workers: int = 4  # DataLoader processes
    shuffle_buffer: int = 1000
    seed: int = 0
    save_every: int = 5000  # steps; a checkpoint is also written at the end of every epoch
    keep_checkpoints: int | None = 3  # the newest step checkpoints kept besides the epoch ends; None: all
    log_every: int = 50  # steps
    vgg_weights: str = "imagenet"  # imagenet (torchvision's download) | none (random) | a local .pth
    val_shards: str | list[str] | None = None  # for the image grid; default: the test split beside the shards
    val_images: int = 8  # in the image grid
    val_samples: int = 64  # the validation L2(ab) at every checkpoint is measured on the first this many
    taxonomy: str | None = None  # a taxonomy CSV; default: the shipped MHMD labels
    resume: bool = False  # continue from RUNDIR/last.safetensors
    precision: str | None = None  # one of PRECISIONS; None: default_precision for the preset and device

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


# -- the shards ------------------------------------------------------------------------------------
def train_shards(settings: TrainSettings) -> list[str]:
    try:
        return shard_urls(settings.shards, "train")
    except FileNotFoundError as e:
        raise HistoryNetError(str(e)) from None


def check_shard_taxonomy(indexes: dict[Path, dict], taxonomy: Taxonomy) -> None:
    for path, index in indexes.items():
        sha = index.get("taxonomy_sha256")
        if sha and sha != taxonomy.sha256:
            raise HistoryNetError(f"{path}: the shards were labelled with another taxonomy (SHA-256 {sha[:12]}...) "
                                  f"than {taxonomy.source} (SHA-256 {taxonomy.sha256[:12]}...): give --taxonomy "
                                  "the taxonomy they were made with")


def validation_shards(settings: TrainSettings, urls: list[str]) -> list[str]:
    """The given validation shards, else the test split beside the first train shard, else none."""
    if settings.val_shards is not None:
        try:
            return shard_urls(settings.val_shards, "test")
        except FileNotFoundError as e:
            raise HistoryNetError(f"--val-shards: {e}") from None
    return split_beside(urls[0], "test")


# -- precision -------------------------------------------------------------------------------------
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> autocast dtype


def default_precision(preset: str, device: str) -> str:
    """fp32 for the official preset and on the CPU; on CUDA bf16, or fp16 where the GPU has no bf16."""
    if preset == "official" or not device.startswith("cuda"):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def run_precision(settings: TrainSettings, device: str) -> str:
    """The precision the run trains in; fp16 on the CPU is refused (autocast has no loss scaling there)."""
    precision = settings.precision or default_precision(settings.preset, device)
    if precision == "fp16" and not device.startswith("cuda"):
        raise HistoryNetError("--precision fp16 needs a CUDA device (float16 with loss scaling): on the CPU "
                              "use --precision bf16 or fp32")
    return precision


def precision_autocast(device: str, precision: str) -> Callable[[], AbstractContextManager]:
    """The autocast the forward passes run under (none for fp32). On CUDA cuDNN's autotuner is on: the
    input sizes are fixed, so it picks its fastest kernels once."""
    device_type = torch.device(device).type
    torch.backends.cudnn.benchmark = device_type == "cuda"
    if PRECISIONS[precision] is None:
        return nullcontext
    return partial(torch.autocast, device_type, dtype=PRECISIONS[precision])


def loss_scalers(nets: Networks, device: str, precision: str) -> dict[str, torch.amp.GradScaler]:
    """A GradScaler per network, enabled for fp16 only (a disabled one passes losses and steps through).
    Not in checkpoints: a resumed fp16 run finds its scale again within a few steps."""
    return {name: torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
            for name in NETWORKS if getattr(nets, name) is not None}


# -- processes and devices -------------------------------------------------------------------------
@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes(device: str) -> tuple[Process, str]:
    """(this process, its device). Under torchrun: one process group, one GPU per process (LOCAL_RANK).
    The tests run two CPU processes over gloo; the NCCL / CUDA path has not run on more than one GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process(), device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Process(dist.get_rank(), world_size), device


def stop_processes(process: Process) -> None:
    if process.world_size > 1:
        dist.destroy_process_group()


# -- networks and optimisers -----------------------------------------------------------------------
@dataclass
class Models:
    nets: Networks  # the modules: checkpoints, the validation grid, and D1 / D2 inside the G step
    generator: nn.Module  # what the training steps call: the modules, or their DDP wrappers
    critic: nn.Module
    info_classifier: nn.Module | None


def load_backbone(nets: Networks, vgg_weights: str) -> str:
    """Put the VGG-16 weights into G0; returns where they came from."""
    if vgg_weights == "none":
        return "random (--vgg-weights none)"
    if vgg_weights == "imagenet":
        try:
            load_vgg16_backbone(nets.generator.g0)
        except (OSError, RuntimeError) as e:  # offline (URLError is an OSError), or a download with another hash
            # refused rather than trained from random weights: a run without its ImageNet start is another model
            raise WeightsError(f"--vgg-weights imagenet: cannot get torchvision's ImageNet VGG-16 weights "
                               f"({first_line(e)}): give a local copy of {VGG16_FILE} with --vgg-weights PATH, "
                               "or train G0 from random weights with --vgg-weights none") from None
        return "imagenet"
    if not Path(vgg_weights).is_file():
        raise HistoryNetError(f"--vgg-weights {vgg_weights}: no such file (or use imagenet / none)")
    try:
        load_vgg16_backbone(nets.generator.g0, vgg_weights)
    except Exception as e:  # noqa: BLE001 - whatever the file holds, it is not torchvision's VGG-16 weights
        raise HistoryNetError(f"--vgg-weights {vgg_weights}: not a torchvision VGG-16 state dict "
                              f"({first_line(e)})") from None
    return vgg_weights


def wrap(nets: Networks, device: str, process: Process) -> Models:
    """The networks on the device (channels_last on CUDA), in DDP wrappers under torchrun."""
    cuda = device.startswith("cuda")
    for net in (nets.generator, nets.critic, nets.info_classifier, nets.generator_ema):
        if net is not None:
            net.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format).train()
    if process.world_size == 1:
        return Models(nets, nets.generator, nets.critic, nets.info_classifier)
    # broadcasts rank 0's weights to every rank, which is why only rank 0 loads the VGG weights
    ddp = partial(DistributedDataParallel, device_ids=[torch.device(device).index] if cuda else None)
    return Models(nets, ddp(nets.generator), ddp(nets.critic),
                  ddp(nets.info_classifier) if nets.info_classifier is not None else None)


def make_optimizers(nets: Networks, settings: TrainSettings) -> dict[str, torch.optim.Adam]:
    return {name: torch.optim.Adam(getattr(nets, name).parameters(), settings.lr, betas=settings.betas)
            for name in NETWORKS if getattr(nets, name) is not None}


# -- one step --------------------------------------------------------------------------------------
def batch_tensors(batch: dict, device: str) -> dict[str, torch.Tensor]:
    """The batch on the device, images scaled to 0..1 there; class indices from the one-hot labels."""
    memory = torch.channels_last if device.startswith("cuda") else torch.contiguous_format
    move = partial(torch.Tensor.to, device=device, non_blocking=True)
    return {"l": unit_float(batch["lightness"], device).contiguous(memory_format=memory),
            "ab": unit_float(batch["ab"], device).contiguous(memory_format=memory),
            "labels": move(batch["onehot"].argmax(1)), "has_label": move(batch["has_label"]),
            "parsing": unit_float(batch["parsing"], device), "has_parsing": move(batch["has_parsing"])}


def update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor) -> None:
    """One optimiser step on `loss`, through the network's loss scaler (a pass-through but for fp16)."""
    optimizer.zero_grad(set_to_none=True)  # also drops what the G loss left on D1 and D2
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skipped when fp16 gradients overflowed
    scaler.update()


def generator_step(models: Models, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: dict,
                   weights: LossWeights, info_term: str, autocast) -> tuple[GeneratorOutput, dict[str, torch.Tensor]]:
    """G's update against D1 and D2 as they stand; G's output (what D1 and D2 learn from next) and its terms."""
    judges = [net for net in (models.nets.critic, models.nets.info_classifier) if net is not None]
    # In the G step D1 and D2 are plain functions of the colours: their weights need no gradient (less work),
    # and the bare modules are called (a DDP wrapper would all-reduce gradients that are thrown away).
    for net in judges:
        net.requires_grad_(False)
    with autocast():
        out = models.generator(x["l"])
        total, terms = generator_loss(out, x["l"], x["ab"], models.nets.critic, labels=x["labels"],
                                      has_label=x["has_label"], parsing=x["parsing"],
                                      has_parsing=x["has_parsing"], info_classifier=models.nets.info_classifier,
                                      weights=weights, info_term=info_term)
    update(optimizer, scaler, total)
    for net in judges:
        net.requires_grad_(True)
    return out, terms


def critic_step(models: Models, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: dict,
                fake_ab: torch.Tensor, autocast) -> dict[str, torch.Tensor]:
    """D1's update, WGAN-GP on the true colours and `fake_ab`; its terms."""
    with autocast():
        total, terms = critic_loss(models.critic, x["l"], x["ab"], fake_ab, loss_scale=scaler.get_scale())
    update(optimizer, scaler, total)
    return terms


def info_classifier_step(models: Models, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                         out: GeneratorOutput, info_term: str, autocast) -> torch.Tensor:
    """D2's update, recovering G's z from G's colours; its loss, detached."""
    with autocast():
        loss = info_classifier_loss(models.info_classifier, out.ab, out.z, info_term)
    update(optimizer, scaler, loss)
    return loss.detach()


def train_step(models: Models, optimizers: dict, scalers: dict, x: dict, weights: LossWeights, info_term: str,
               autocast) -> dict[str, torch.Tensor]:
    """One G, one D1 and (with D2) one D2 update; the unweighted terms, detached."""
    out, g_terms = generator_step(models, optimizers["generator"], scalers["generator"], x, weights, info_term,
                                  autocast)
    # D1 and D2 learn from the colours G made before its update, as in the official code
    d1_terms = critic_step(models, optimizers["critic"], scalers["critic"], x, out.ab, autocast)
    terms = {**{f"generator/{k}": v for k, v in g_terms.items()}, **{f"critic/{k}": v for k, v in d1_terms.items()}}
    if models.info_classifier is not None:
        terms["info_classifier/loss"] = info_classifier_step(models, optimizers["info_classifier"],
                                                             scalers["info_classifier"], out, info_term, autocast)
    return terms


# -- what rank 0 writes ---------------------------------------------------------------------------
def validation_batch(urls: list[str], num_classes: int, settings: TrainSettings) -> dict | None:
    """The first `val_images` validation samples, or None without validation shards."""
    if not urls or settings.val_images < 1:
        return None
    loader = eval_loader(urls, num_classes, batch_size=settings.val_images, num_workers=0, split="test",
                         image_size=settings.image_size)
    return next(iter(loader), None)


def validation_batches(urls: list[str], num_classes: int, settings: TrainSettings) -> list[dict]:
    """The first `val_samples` validation samples in batches of `batch_size` (none without validation shards)."""
    if not urls or settings.val_samples < 1:
        return []
    loader = eval_loader(urls, num_classes, batch_size=settings.batch_size, num_workers=0, split="test",
                         image_size=settings.image_size)
    batches, left = [], settings.val_samples
    for batch in loader:
        batches.append({key: value[:left] for key, value in batch.items()})
        left -= len(batches[-1]["key"])
        if left <= 0:
            break
    return batches


def validation_l2(generator: nn.Module, batches: list[dict], device: str, autocast) -> dict[str, float]:
    """G's mean squared ab error (ab / 255) in eval mode over the validation samples, and grey's (ab = 0,
    the level 128) on the same samples: G has learnt colour only where it is below grey's."""
    generator.eval()
    model = grey = 0.0
    samples = 0
    with torch.no_grad(), autocast():
        for batch in batches:
            x = batch_tensors(batch, device)
            model += (generator(x["l"]).ab.float() - x["ab"]).square().mean(dim=(1, 2, 3)).sum().item()
            grey += (x["ab"] - GREY_AB).square().mean(dim=(1, 2, 3)).sum().item()
            samples += len(x["ab"])
    generator.train()
    return {"validation/l2_ab": model / samples, "validation/grey_l2_ab": grey / samples}


def validation_grid(generator: nn.Module, batch: dict, device: str, autocast) -> torch.Tensor:
    """(N, 3, S, 3S) uint8: each sample's L, predicted colours and true colours side by side."""
    generator.eval()  # BatchNorm's running statistics, as at inference
    with torch.no_grad(), autocast():
        predicted = generator(batch_tensors(batch, device)["l"]).ab.float().cpu().numpy()
    generator.train()
    rows = []
    for lightness, ab, true_ab in zip(batch["lightness"][:, 0].numpy(), predicted, batch["ab"].numpy() / 255):
        panels = [np.repeat(lightness[..., None], 3, axis=2), rgb_from_lab(lightness, ab),
                  rgb_from_lab(lightness, true_ab)]
        rows.append(np.concatenate(panels, axis=1))
    return torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2)


def best_validation_l2(rundir: Path) -> float | None:
    """The validation L2(ab) of RUNDIR/best.safetensors, None when there is none."""
    path = rundir / BEST
    return read_progress(path).get("validation/l2_ab") if path.is_file() else None


def trim_log(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` (logged after the checkpoint a resumed run starts from)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        atomic_write_bytes(path, "".join(lines).encode())


class Recorder:
    """RUNDIR's checkpoints, TensorBoard events and json log (rank 0's; other ranks record nothing)."""

    def __init__(self, settings: TrainSettings, resume_step: int, val_batch: dict | None, val_batches: list[dict],
                 device: str, autocast):
        from torch.utils.tensorboard import SummaryWriter

        self.rundir, self.keep = Path(settings.out), settings.keep_checkpoints
        self.val_batch, self.val_batches, self.device, self.autocast = val_batch, val_batches, device, autocast
        self.best = best_validation_l2(self.rundir) if settings.resume else None
        self.rundir.mkdir(parents=True, exist_ok=True)
        if settings.resume:
            trim_log(self.rundir / LOG, resume_step)
        # purge_step: TensorBoard hides the events of steps after the checkpoint, as trim_log does
        self.writer = SummaryWriter(str(self.rundir / "tensorboard"),
                                    purge_step=resume_step + 1 if settings.resume else None)
        self.log = open(self.rundir / LOG, "a" if settings.resume else "w")
        self.intermediate: list[Path] = []  # this process's step checkpoints that are not at an epoch end

    def scalars(self, step: int, epoch: int, terms: dict[str, float], images_per_second: float) -> None:
        for tag, value in {**terms, "images_per_second": images_per_second}.items():
            self.writer.add_scalar(tag, value, step)
        line = {"step": step, "epoch": epoch, "images_per_second": images_per_second, **terms}
        self.log.write(json.dumps(line) + "\n")
        self.log.flush()

    def validate(self, nets: Networks, config: dict, progress: dict) -> dict:
        """`progress` with the validation L2(ab) of G and of grey (TensorBoard too); best.safetensors when G's
        is the lowest so far."""
        if not self.val_batches:
            return progress
        measured = validation_l2(colouring_generator(nets), self.val_batches, self.device, self.autocast)
        for tag, value in measured.items():
            self.writer.add_scalar(tag, value, progress["step"])
        progress = {**progress, **measured}
        if self.best is None or measured["validation/l2_ab"] < self.best:
            self.best = measured["validation/l2_ab"]
            save_checkpoint(self.rundir / BEST, nets, config, progress=progress)
        return progress

    def checkpoint(self, nets: Networks, config: dict, optimizers: dict, progress: dict) -> Path:
        """The validation L2(ab) (and best.safetensors), checkpoints/step-N.safetensors (the networks), then
        last.safetensors (with the optimisers' states: only resuming needs them, and only from the newest).
        Then the validation grid, and the step checkpoints beyond the newest `keep_checkpoints` go."""
        step = progress["step"]
        progress = self.validate(nets, config, progress)
        path = save_checkpoint(self.rundir / "checkpoints" / f"step-{step:08d}.safetensors", nets, config,
                               progress=progress)
        save_checkpoint(self.rundir / LAST, nets, config, optimizers, progress)
        if self.val_batch is not None:
            grid = validation_grid(colouring_generator(nets), self.val_batch, self.device, self.autocast)
            self.writer.add_images("validation/L_predicted_truth", grid, step)
        if progress["epoch_step"] and self.keep is not None:
            self.intermediate.append(path)
            while len(self.intermediate) > self.keep:
                self.intermediate.pop(0).unlink(missing_ok=True)
        return path

    def close(self) -> None:
        self.writer.close()
        self.log.close()


# -- the run ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PresetSchedule:
    info_term: str
    warmup_steps: int


# What a preset sets besides its loss weights. The paper and the official code score D2 with the clipped
# KL on raw vectors and have no warm-up; the recommended preset scores it between softmax distributions
# and lets the critics' terms join after 200 steps of the supervised terms alone (RESULTS.md).
PRESET_SCHEDULES = {"paper": PresetSchedule("official", 0), "official": PresetSchedule("official", 0),
                    "l2": PresetSchedule("official", 0), "recommended": PresetSchedule("softmax", 200)}


def with_preset_defaults(settings: TrainSettings) -> TrainSettings:
    """`settings` with the preset's info term and warm-up where none was given."""
    schedule = PRESET_SCHEDULES.get(settings.preset)
    if schedule is None:  # an unknown preset: check_settings names it
        return settings
    return replace(settings, info_term=settings.info_term or schedule.info_term,
                   warmup_steps=schedule.warmup_steps if settings.warmup_steps is None else settings.warmup_steps)


def check_settings(settings: TrainSettings) -> None:
    if settings.variant not in VARIANTS:
        raise HistoryNetError(f"unknown variant {settings.variant!r} (available: {', '.join(VARIANTS)})")
    if settings.preset not in LOSS_PRESETS:
        raise HistoryNetError(f"unknown loss preset {settings.preset!r} (available: {', '.join(LOSS_PRESETS)})")
    if settings.precision is not None and settings.precision not in PRECISIONS:
        raise HistoryNetError(f"unknown precision {settings.precision!r} (available: {', '.join(PRECISIONS)})")
    try:  # the model's own checks, before anything is read or built
        check_image_size(settings.image_size)
        check_width(settings.width)
    except InputError as e:
        raise HistoryNetError(str(e)) from None
    if settings.width != 1 and settings.vgg_weights != "none":
        raise HistoryNetError(f"--vgg-weights {settings.vgg_weights}: VGG-16 weights fit width 1 only; "
                              f"at width {settings.width} train G0 from random weights with --vgg-weights none")
    counts = {"epochs": settings.epochs, "batch_size": settings.batch_size, "save_every": settings.save_every,
              "log_every": settings.log_every, "steps": settings.steps, "epoch_samples": settings.epoch_samples}
    for name, value in counts.items():
        if value is not None and value < 1:
            raise HistoryNetError(f"{name} must be at least 1 (got {value})")
    if settings.info_term not in INFO_TERMS:
        raise HistoryNetError(f"unknown info term {settings.info_term!r} (available: {', '.join(INFO_TERMS)})")
    for name in ("critic_weight", "info_weight"):
        if getattr(settings, name) is not None and getattr(settings, name) < 0:
            raise HistoryNetError(f"{name} must be 0 or more (got {getattr(settings, name)})")
    if not 0 <= settings.ema < 1:
        raise HistoryNetError(f"ema is a decay in [0, 1) (got {settings.ema}): 0 keeps no moving average")
    if settings.warmup_steps < 0:
        raise HistoryNetError(f"warmup_steps must be 0 or more (got {settings.warmup_steps})")
    if settings.keep_checkpoints is not None and settings.keep_checkpoints < 0:
        raise HistoryNetError(f"keep_checkpoints must be 0 or more (got {settings.keep_checkpoints})")


def resumed(settings: TrainSettings, config: dict) -> Checkpoint | None:
    """RUNDIR/last.safetensors with `resume` (refused when of another variant, label set or size), else
    None (refused when RUNDIR holds a run already: a fresh start would overwrite it)."""
    last = Path(settings.out) / LAST
    if not settings.resume:
        if last.is_file():
            raise HistoryNetError(f"{settings.out} holds a run already ({last}): resume it, "
                                  "or train into another RUNDIR")
        return None
    if not last.is_file():
        raise HistoryNetError(f"{last}: no checkpoint to resume from")
    try:
        checkpoint = load_checkpoint(last)
    except CheckpointError as e:
        raise HistoryNetError(str(e)) from None
    for key in ("variant", "num_classes", "image_size", "width", "taxonomy_sha256"):
        if checkpoint.config.get(key) != config[key]:
            raise HistoryNetError(f"{last} has {key} {checkpoint.config.get(key)!r}, these settings {config[key]!r}: "
                                  "resume with the run's own settings, or train into another RUNDIR")
    return checkpoint


def run_config(settings: TrainSettings, taxonomy: Taxonomy, epoch_samples: int) -> dict:
    """What a checkpoint records of its run."""
    return {"variant": settings.variant, "num_classes": len(taxonomy), "image_size": settings.image_size,
            "width": settings.width,
            "label_names": taxonomy.names, "taxonomy_sha256": taxonomy.sha256, "preset": settings.preset,
            "loss_weights": asdict(loss_weights(settings)), "epoch_samples": epoch_samples,
            "settings": settings.to_dict()}


def loss_weights(settings: TrainSettings) -> LossWeights:
    """The preset's loss weights, with `critic_weight` and `info_weight` instead of its D1 and D2 weights when given."""
    weights = LOSS_PRESETS[settings.preset]
    if settings.critic_weight is not None:
        weights = replace(weights, wgan=settings.critic_weight)
    if settings.info_weight is not None:
        weights = replace(weights, info_kl=settings.info_weight)
    return weights


def stream_seed(seed: int, epoch: int, epoch_step: int) -> int:
    """The data stream's seed for a run that starts at (epoch, epoch_step): a resumed run draws afresh."""
    return int(np.random.SeedSequence([seed, epoch, epoch_step]).generate_state(1)[0])


def train(settings: TrainSettings) -> dict:
    """Train (or, with `resume`, continue) a run; returns a summary: final step and epoch, checkpoints."""
    with fixed_cpu_threads():
        return _train(settings)


def epoch_sample_count(settings: TrainSettings, urls: list[str], indexes: dict[Path, dict]) -> int:
    """`epoch_samples`, else the train shards' count in their folders' index.json."""
    epoch_samples = settings.epoch_samples or indexed_samples(urls, indexes)
    if not epoch_samples:
        raise HistoryNetError(f"{settings.shards}: how many samples make an epoch is unknown (the shards' folder "
                              "has no index.json listing them): give epoch_samples (--epoch-samples)")
    return epoch_samples


def _train(settings: TrainSettings) -> dict:
    settings = with_preset_defaults(settings)
    check_settings(settings)
    taxonomy = load_taxonomy(settings.taxonomy)
    urls = train_shards(settings)
    indexes = folder_indexes(urls)
    check_shard_taxonomy(indexes, taxonomy)
    config = run_config(settings, taxonomy, epoch_sample_count(settings, urls, indexes))
    checkpoint = resumed(settings, config)
    device = pick_device(settings.device)
    config["precision"] = run_precision(settings, device)
    val_urls = validation_shards(settings, urls)
    process, device = start_processes(device)
    try:
        return _run(settings, process, device, urls, val_urls, config, checkpoint)
    finally:
        stop_processes(process)


def prepared_networks(settings: TrainSettings, process: Process, config: dict,
                      checkpoint: Checkpoint | None) -> Networks:
    """The checkpoint's networks, or new ones with the VGG weights in G0 (on rank 0: DDP copies its weights)."""
    if checkpoint is not None:
        config["vgg_weights"] = checkpoint.config.get("vgg_weights")
        return with_moving_average(checkpoint.networks, settings.ema)
    torch.manual_seed(settings.seed)  # before the networks: their random initialisation is part of the run
    nets = build_networks(settings.variant, config["num_classes"], settings.image_size, settings.width)
    if process.main:
        config["vgg_weights"] = load_backbone(nets, settings.vgg_weights)
    return with_moving_average(nets, settings.ema)


def with_moving_average(nets: Networks, ema: float) -> Networks:
    """`nets` with G's moving average when `ema` asks for one (a resumed run keeps its own, a run without
    one starts it from G), without it otherwise."""
    if not ema:
        nets.generator_ema = None
    elif nets.generator_ema is None:
        nets.generator_ema = copy.deepcopy(nets.generator)
    if nets.generator_ema is not None:
        nets.generator_ema.requires_grad_(False)
    return nets


@torch.no_grad()
def update_moving_average(nets: Networks, decay: float, step: int) -> None:
    """G's moving average after `step` steps: average <- d * average + (1 - d) * G, on the weights and the
    BatchNorm statistics alike. d grows from 0.1 to `decay` over the first steps (as timm's ModelEma), so
    that the average does not keep G's random start for thousands of steps."""
    d = min(decay, (1 + step) / (10 + step))
    for average, current in zip(nets.generator_ema.state_dict().values(), nets.generator.state_dict().values()):
        if average.is_floating_point():
            average.lerp_(current, 1 - d)
        else:  # BatchNorm's batch counts
            average.copy_(current)


def prepared_training(settings: TrainSettings, process: Process, device: str, config: dict,
                      checkpoint: Checkpoint | None) -> tuple[Models, dict[str, torch.optim.Adam]]:
    """The networks on their device and their optimisers, both as the checkpoint left them when there is one."""
    nets = prepared_networks(settings, process, config, checkpoint)
    torch.manual_seed(settings.seed + process.rank)  # each rank its own gradient-penalty mixes
    models = wrap(nets, device, process)
    optimizers = make_optimizers(nets, settings)
    for name, state in (checkpoint.optimizer_states if checkpoint else {}).items():
        optimizers[name].load_state_dict(state)
    return models, optimizers


@dataclass
class Position:
    """Where a run stands: steps done in all, epochs done, steps done in the current epoch."""
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0

    @classmethod
    def of(cls, checkpoint: Checkpoint | None) -> Position:
        """Where the checkpoint's run stopped; the start without one."""
        if checkpoint is None:
            return cls()
        return cls(*(checkpoint.progress[key] for key in ("step", "epoch", "epoch_step")))

    def advance(self) -> None:
        self.step, self.epoch_step = self.step + 1, self.epoch_step + 1

    def next_epoch(self) -> None:
        self.epoch, self.epoch_step = self.epoch + 1, 0


def epoch_loader(settings: TrainSettings, process: Process, urls: list[str], config: dict,
                 at: Position) -> Iterable[dict]:
    """This process's share of every epoch, drawn with a seed made of where the run starts."""
    return train_loader(urls, config["num_classes"], -(-config["epoch_samples"] // process.world_size),
                        batch_size=settings.batch_size, num_workers=settings.workers,
                        shuffle_buffer=settings.shuffle_buffer, image_size=settings.image_size,
                        seed=stream_seed(settings.seed, at.epoch, at.epoch_step))


@dataclass
class Run:
    """A run under way: what its steps use, what rank 0 records (other ranks: no recorder), where it stands."""
    settings: TrainSettings
    process: Process
    device: str
    config: dict
    autocast: Callable[[], AbstractContextManager]
    models: Models
    optimizers: dict[str, torch.optim.Adam]
    scalers: dict[str, torch.amp.GradScaler]
    loader: Iterable[dict]
    at: Position
    recorder: Recorder | None = None
    checkpoints: list[Path] = field(default_factory=list)  # those this run wrote
    logged: dict[str, float] = field(default_factory=dict)  # the terms last logged

    def __post_init__(self):
        self.weights = loss_weights(self.settings)
        # D1 and D2 still train during the warm-up: they judge well from the first step they count
        self.warmup_weights = replace(self.weights, wgan=0.0, info_kl=0.0)
        self.epoch_steps = len(self.loader)  # per process
        steps, epochs = self.settings.steps, self.settings.epochs
        self.total = steps if steps is not None else epochs * self.epoch_steps  # the step the run stops at
        self.images_per_step = self.settings.batch_size * self.process.world_size

    def step_weights(self) -> LossWeights:
        """The loss weights of the next step: without the critics' terms during the warm-up."""
        return self.warmup_weights if self.at.step < self.settings.warmup_steps else self.weights

    def unfinished(self) -> bool:
        return self.at.step < self.total if self.settings.steps is not None else self.at.epoch < self.settings.epochs

    def steps_left_in_epoch(self) -> int:
        left = self.epoch_steps - self.at.epoch_step
        return left if self.settings.steps is None else min(left, self.total - self.at.step)


class Meter:
    """The progress bar, and images a second over each log interval and over the whole run."""

    def __init__(self, run: Run):
        from tqdm import tqdm

        self.images_per_step, self.first_step, self.started = run.images_per_step, run.at.step, time.perf_counter()
        self.window = (self.first_step, self.started)
        self.bar = tqdm(total=run.total, initial=run.at.step, unit="step", dynamic_ncols=True,
                        disable=bars_disable() if run.process.main else True)

    def interval_rate(self, step: int) -> float:
        """Images a second since the previous call (the first: since the start)."""
        rate = (step - self.window[0]) * self.images_per_step / (time.perf_counter() - self.window[1])
        self.window = (step, time.perf_counter())
        return rate

    def run_rate(self, step: int) -> float:
        seconds = time.perf_counter() - self.started
        return (step - self.first_step) * self.images_per_step / seconds if seconds else 0.0


def open_recorder(run: Run, val_urls: list[str]) -> Recorder:
    """Rank 0's recorder with its validation batch; says what the run is about to do."""
    settings, config, step = run.settings, run.config, run.at.step
    val_batch = validation_batch(val_urls, config["num_classes"], settings)
    val_batches = validation_batches(val_urls, config["num_classes"], settings)
    recorder = Recorder(settings, step, val_batch, val_batches, run.device, run.autocast)
    log.info(f"HistoryNet {settings.variant}: {config['epoch_samples']} samples an epoch, {run.epoch_steps} steps of "
          f"{run.images_per_step} images, on {run.device} x{run.process.world_size} in {config['precision']}; G0: {config['vgg_weights']}; "
          f"{f'resuming at step {step}' if step else 'starting'}, until step {run.total}")
    return recorder


def log_step(run: Run, meter: Meter, terms: dict[str, torch.Tensor]) -> None:
    """Rank 0: the terms (as floats) and images a second to TensorBoard, the json log and the bar."""
    images_per_second = meter.interval_rate(run.at.step)
    run.logged = dict(zip(terms, torch.stack(list(terms.values())).float().cpu().tolist()))
    run.recorder.scalars(run.at.step, run.at.epoch, run.logged, images_per_second)
    meter.bar.set_postfix(loss=f"{run.logged['generator/total']:.4f}", img_s=f"{images_per_second:.1f}")


def save(run: Run) -> None:
    """Rank 0: a checkpoint of where the run stands (other ranks save nothing)."""
    if run.recorder is not None:
        progress = {**asdict(run.at), "epoch_steps": run.epoch_steps}
        run.checkpoints.append(run.recorder.checkpoint(run.models.nets, run.config, run.optimizers, progress))


def after_step(run: Run, meter: Meter, terms: dict[str, torch.Tensor]) -> None:
    """Log every `log_every` steps; at an epoch's last step move on to the next epoch; save at every epoch
    end, every `save_every` steps and at the last step."""
    if run.recorder is not None and run.at.step % run.settings.log_every == 0:
        log_step(run, meter, terms)
    if run.at.epoch_step == run.epoch_steps:  # the epoch's last step: its checkpoint records the epoch as done
        run.at.next_epoch()
    if run.at.epoch_step == 0 or run.at.step % run.settings.save_every == 0 or run.at.step == run.total:
        save(run)


def train_epochs(run: Run, meter: Meter) -> None:
    """Epoch after epoch of steps, until `steps` steps (when given) or `epochs` epochs are done."""
    while run.unfinished():
        if run.at.epoch_step >= run.epoch_steps:  # resumed with larger batches than the run had: that epoch is over
            run.at.next_epoch()
            continue
        meter.bar.set_description(f"epoch {run.at.epoch + 1}")
        for batch in islice(iter(run.loader), run.steps_left_in_epoch()):
            terms = train_step(run.models, run.optimizers, run.scalers, batch_tensors(batch, run.device),
                               run.step_weights(), run.settings.info_term, run.autocast)
            run.at.advance()
            if run.models.nets.generator_ema is not None:
                update_moving_average(run.models.nets, run.settings.ema, run.at.step)
            meter.bar.update(1)
            after_step(run, meter, terms)


def summary(run: Run, meter: Meter) -> dict:
    """What `train` returns: where the run stopped, the checkpoints it kept, its speed and last logged terms."""
    at = run.at
    last = run.recorder.rundir / LAST if run.recorder is not None else None
    return {"rundir": run.settings.out, "variant": run.settings.variant, "step": at.step, "epoch": at.epoch,
            "epoch_step": at.epoch_step, "epoch_steps": run.epoch_steps, "epoch_samples": run.config["epoch_samples"],
            "checkpoints": [str(path) for path in run.checkpoints if path.is_file()],  # kept ones
            "last": str(last) if last is not None and last.is_file() else None,
            "images_per_second": meter.run_rate(at.step), "terms": run.logged}


def finish(run: Run, meter: Meter) -> dict:
    """Close the bar and the recorder; the run's summary."""
    meter.bar.close()
    if run.recorder is not None:
        run.recorder.close()
        log.info(f"HistoryNet {run.settings.variant}: at step {run.at.step}, complete epochs: {run.at.epoch}; "
              f"last checkpoint {run.recorder.rundir / LAST}")
    return summary(run, meter)


def _run(settings: TrainSettings, process: Process, device: str, urls: list[str], val_urls: list[str], config: dict,
         checkpoint: Checkpoint | None) -> dict:
    autocast = precision_autocast(device, config["precision"])
    models, optimizers = prepared_training(settings, process, device, config, checkpoint)
    at = Position.of(checkpoint)
    loader = epoch_loader(settings, process, urls, config, at)
    run = Run(settings, process, device, config, autocast, models, optimizers,
              loss_scalers(models.nets, device, config["precision"]), loader, at)
    if process.main:
        run.recorder = open_recorder(run, val_urls)
    meter = Meter(run)
    train_epochs(run, meter)
    return finish(run, meter)
