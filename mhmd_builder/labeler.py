"""The ResNet labeler: trained on the human labels (the paper's 1%), it labels every other kept frame.

    train(workdir, TrainSettings(...))         -> checkpoint: CKPT.safetensors (weights), CKPT.json
                                                  (config: arch, input size, taxonomy hash and names,
                                                  normalisation, seed, metrics), CKPT.metrics.json
    predict(workdir, CKPT, PredictSettings())  -> the label stage: WORKDIR/label/parts/<movie>.parquet

A checkpoint records the SHA-256 of the taxonomy it was trained on and is refused for any other:
class index 7 of one taxonomy is not class 7 of another.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pyarrow as pa

from .batching import prefetched
from .detect import inputs_digest, load_frame
from .devices import fixed_cpu_threads, pick_device
from .errors import MhmdError
from .labels import LABEL_STAGE, PREDICTION_SCHEMA, labelable_frames, read_human_labels
from .runners import LocalRunner
from .stages import Partition, PartitionResult, Resources
from .taxonomy import Taxonomy, load_taxonomy
from .weights import check_pinned, sha256_of, weights_cache
from .workdir import WorkDir, atomic_write_bytes, atomic_write_json, read_json

if TYPE_CHECKING:
    import pandas as pd

ARCHS = ("resnet18", "resnet50")
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation (RGB), recorded in the checkpoint
STD = (0.229, 0.224, 0.225)


class LabelerError(MhmdError):
    """The labeler cannot train or predict; the message is one line and says what to do."""


# -- model and weights ----------------------------------------------------------------------------
def build_model(arch: str, classes: int):
    import torch.nn as nn
    import torchvision

    if arch not in ARCHS:
        raise LabelerError(f"unknown architecture {arch!r} (available: {', '.join(ARCHS)})")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Linear(model.fc.in_features, classes)
    return model


def imagenet_weights_file(arch: str) -> Path:
    """torchvision's ImageNet weights for `arch`, downloaded from torchvision's own URL into the
    weights cache and checked against the pinned SHA-256. Raises OSError when offline."""
    import torch
    import torchvision

    url = getattr(torchvision.models, f"ResNet{arch[6:]}_Weights").IMAGENET1K_V1.url
    target = weights_cache() / Path(url).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=True)
    return check_pinned(target)


def initial_weights(arch: str, weights: str) -> tuple[dict | None, str]:
    """(backbone state dict or None for random initialisation, a description of where it came from)."""
    import torch

    if weights == "none":
        return None, "random (--weights none)"
    if weights == "imagenet":
        try:
            path = imagenet_weights_file(arch)
        except OSError as e:
            print(f"notice: cannot download torchvision's ImageNet {arch} weights ({type(e).__name__}, offline?): "
                  "training from random initialisation; give a local copy with --weights PATH")
            return None, "random (ImageNet weights unavailable)"
    else:
        path = Path(weights)
        if not path.is_file():
            raise LabelerError(f"--weights {weights}: no such file (or use imagenet / none)")
        check_pinned(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    # The ImageNet classifier has 1000 outputs: only the backbone is reused.
    return {k: v for k, v in state.items() if not k.startswith("fc.")}, str(path)


# -- checkpoint -----------------------------------------------------------------------------------
def config_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def metrics_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + ".metrics.json")


def save_checkpoint(model, config: dict, checkpoint: Path) -> None:
    """Weights (safetensors) then config, each written under a temporary name and renamed."""
    from safetensors.torch import save

    atomic_write_bytes(checkpoint, save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    atomic_write_json(config_path(checkpoint), config)


def load_checkpoint(checkpoint: str | Path, taxonomy: Taxonomy):
    """(model in eval mode on the CPU, config); refuses a checkpoint of another taxonomy."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file() or not config_path(checkpoint).is_file():
        raise LabelerError(f"{checkpoint}: no such checkpoint (need the .safetensors file and its .json config)")
    config = read_json(config_path(checkpoint))
    if config["taxonomy_sha256"] != taxonomy.sha256:
        raise LabelerError(f"{checkpoint} was trained on another taxonomy (SHA-256 {config['taxonomy_sha256'][:12]}..., "
                           f"{len(config['label_names'])} labels) than {taxonomy.source} (SHA-256 {taxonomy.sha256[:12]}..., "
                           f"{len(taxonomy)} labels): refusing it; train a labeler on this taxonomy")
    model = build_model(config["arch"], len(config["label_names"]))
    model.load_state_dict(load_file(str(checkpoint)))
    return model.eval(), config


# -- metrics --------------------------------------------------------------------------------------
def classification_metrics(y_true, y_pred, names: list[str]) -> dict:
    """Accuracy, macro-F1 (mean over the classes present in y_true or y_pred, as sklearn's default),
    per-class precision / recall / F1 / support, and the confusion matrix (rows: true, cols: predicted)."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    n = len(names)
    confusion = np.zeros((n, n), int)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp, predicted, actual = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=precision + recall > 0)
    present = (predicted + actual) > 0
    return {
        "samples": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {names[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                 "support": int(actual[i])} for i in np.flatnonzero(present)},
        "confusion": confusion.tolist(),
    }


def format_metrics(metrics: dict, names: list[str]) -> str:
    lines = [f"validation: {metrics['samples']} frames ({metrics['split']}), accuracy {metrics['accuracy']:.3f}, "
             f"macro-F1 {metrics['macro_f1']:.3f}",
             f"{'label':<40}{'precision':>10}{'recall':>8}{'support':>9}"]
    lines += [f"{name:<40}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['support']:>9}"
              for name, m in metrics["per_class"].items()]
    present = [names.index(name) for name in metrics["per_class"]]
    lines.append("confusion (rows true, columns predicted; ids): " + " ".join(f"{i:>4}" for i in present))
    lines += [f"{i:>4}: " + " ".join(f"{metrics['confusion'][i][j]:>4}" for j in present) for i in present]
    return "\n".join(lines)


# -- images ---------------------------------------------------------------------------------------
def fit_rgb(bgr: np.ndarray, size: int) -> np.ndarray:
    """The whole frame, RGB, squeezed to size x size: a centre crop would cut off persons at the sides."""
    return cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def load_rgb(path: Path, size: int) -> np.ndarray | None:
    image = load_frame(path)
    return None if image is None else fit_rgb(image, size)


class LabeledFrames:
    """A torch dataset of (uint8 CHW tensor, class) read from the frames' JPEGs, resized once per read."""

    def __init__(self, root: Path, jpegs: list[str], targets: list[int], size: int, transform=None):
        self.root, self.jpegs, self.targets, self.size, self.transform = root, jpegs, targets, size, transform

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int):
        import torch

        image = load_rgb(self.root / self.jpegs[i], self.size)
        if image is None:
            raise LabelerError(f"{self.jpegs[i]}: missing or unreadable frame")
        tensor = torch.from_numpy(image).permute(2, 0, 1)
        return (self.transform(tensor) if self.transform else tensor), self.targets[i]


def train_transform(size: int):
    """The paper's horizontal flip and Gaussian blur, plus a mild random crop and a small
    brightness / contrast / saturation jitter; hue stays: the colour of a uniform is the signal."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.18), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3),
        v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05),
    ])


def normalise(batch, device: str):
    """uint8 NCHW on any device -> float, ImageNet-normalised, on `device` (done there: less to copy)."""
    import torch

    batch = batch.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return (batch - mean) / std


# -- training -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    arch: str = "resnet50"
    weights: str = "imagenet"  # imagenet | none | a path to a .pth state dict
    output: str | None = None  # checkpoint path (.safetensors); default WORKDIR/labeler/labeler.safetensors
    epochs: int = 10
    batch_size: int = 32
    image_size: int = 224
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    device: str = "auto"
    seed: int = 0
    workers: int = 0  # DataLoader processes; seeded from the run's generator, so still reproducible

    def to_dict(self) -> dict:
        return asdict(self)


def labeled_frames(workdir: WorkDir) -> "pd.DataFrame":
    """Human-labeled frames with their movie and JPEG."""
    from .manifest import manifest

    human = read_human_labels(workdir)
    if human is None or human.empty:
        raise LabelerError(f"{workdir.root}: no human labels yet: import a label file first (--labels FILE)")
    frames = manifest(workdir)[["frame_id", "movie_id", "jpeg"]].dropna(subset=["jpeg"])
    labeled = human[["frame_id", "label_id"]].merge(frames, on="frame_id")
    if labeled.empty:
        raise LabelerError(f"{workdir.root}: none of the {len(human)} human-labeled frames has a JPEG here")
    return labeled.sort_values("frame_id", ignore_index=True)


def labels_digest(labeled: "pd.DataFrame") -> str:
    """Identifies the human labels a labeler is trained on."""
    pairs = "\n".join(f"{f} {i}" for f, i in sorted(zip(labeled.frame_id, labeled.label_id.astype(int))))
    return hashlib.sha256(pairs.encode()).hexdigest()[:16]


def default_checkpoint(workdir: WorkDir) -> Path:
    return workdir.root / "labeler" / "labeler.safetensors"


def checkpoint_is_current(workdir: WorkDir, settings: TrainSettings, taxonomy: Taxonomy) -> bool:
    """Whether `train` would make the checkpoint that is there already: same settings, taxonomy and
    human labels (a build resumed after training need not train again)."""
    checkpoint = Path(settings.output) if settings.output else default_checkpoint(workdir)
    if not checkpoint.is_file() or not config_path(checkpoint).is_file():
        return False
    config = read_json(config_path(checkpoint))
    return (config.get("settings") == settings.to_dict() and config.get("taxonomy_sha256") == taxonomy.sha256
            and config.get("labels_digest") == labels_digest(labeled_frames(workdir)))


def split_by_film(labeled, val_fraction: float, seed: int) -> tuple[np.ndarray, str]:
    """A boolean validation mask and how it was made. Whole films go to validation (seeded) until
    they hold val_fraction of the frames: frames of one film are near-duplicates, and a frame split
    would measure memory, not labeling. With one film only, a seeded frame split (said so)."""
    rng = np.random.default_rng(seed)
    films = labeled.movie_id.unique()
    if len(films) < 2:
        print(f"notice: all labeled frames come from one film ({films[0]}): validating on a random frame split, "
              "which overstates accuracy (neighbouring frames look alike); label frames of more films")
        mask = np.zeros(len(labeled), bool)
        mask[rng.permutation(len(labeled))[:max(1, round(val_fraction * len(labeled)))]] = True
        return mask, "frames of one film"
    counts = labeled.movie_id.value_counts()
    chosen, total = [], 0
    for film in rng.permutation(sorted(films)):
        if total >= val_fraction * len(labeled) or len(chosen) == len(films) - 1:
            break
        chosen.append(film)
        total += counts[film]
    return labeled.movie_id.isin(chosen).to_numpy(), f"{len(chosen)} of {len(films)} films held out"


def balanced_sampler(targets: np.ndarray, seed: int):
    """Draw each class equally often (with replacement). The paper's classes differ 829x: a
    class-weighted loss would scale a rare class's few gradients by hundreds (noisy steps), while
    sampling shows its frames more often, each time differently augmented."""
    import torch

    counts = np.bincount(targets)
    weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, len(targets), replacement=True,
                                                  generator=torch.Generator().manual_seed(seed))


def evaluate(model, loader, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    model.eval()
    truth, predicted = [], []
    with torch.inference_mode():
        for images, targets in loader:
            predicted.append(model(normalise(images, device)).argmax(1).cpu().numpy())
            truth.append(targets.numpy())
    return np.concatenate(truth), np.concatenate(predicted)


def train(workdir: WorkDir | str | Path, settings: TrainSettings | None = None,
          taxonomy: Taxonomy | None = None) -> dict:
    """Train a labeler on the human labels; write the checkpoint; return its config (with metrics)."""
    with fixed_cpu_threads():
        return _train(workdir, settings, taxonomy)


def _train(workdir: WorkDir | str | Path, settings: TrainSettings | None, taxonomy: Taxonomy | None) -> dict:
    import torch
    from tqdm import tqdm

    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    settings = settings or TrainSettings()
    taxonomy = taxonomy or load_taxonomy()
    torch.manual_seed(settings.seed)  # before the model: its random initialisation is part of the run
    model = build_model(settings.arch, len(taxonomy))  # an unknown architecture fails before any work
    checkpoint = Path(settings.output) if settings.output else default_checkpoint(workdir)
    device = pick_device(settings.device)
    labeled = labeled_frames(workdir)
    if labeled.label_id.max() >= len(taxonomy):
        raise LabelerError(f"human labels use class ids beyond the {len(taxonomy)} labels of {taxonomy.source}")
    val_mask, split = split_by_film(labeled, settings.val_fraction, settings.seed)
    train_rows, val_rows = labeled[~val_mask], labeled[val_mask]
    targets = train_rows.label_id.to_numpy(int)

    state, weights_from = initial_weights(settings.arch, settings.weights)
    if state is not None:
        model.load_state_dict(state, strict=False)
    model.to(device)

    def loader(rows, transform, sampler=None):
        data = LabeledFrames(workdir.root, rows.jpeg.tolist(), rows.label_id.tolist(), settings.image_size, transform)
        return torch.utils.data.DataLoader(data, settings.batch_size, sampler=sampler, num_workers=settings.workers,
                                           generator=torch.Generator().manual_seed(settings.seed),
                                           pin_memory=device.startswith("cuda"))

    train_loader = loader(train_rows, train_transform(settings.image_size), balanced_sampler(targets, settings.seed))
    val_loader = loader(val_rows, None)
    optimiser = torch.optim.AdamW(model.parameters(), settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, settings.lr,
                                                   total_steps=settings.epochs * len(train_loader))
    loss_fn = torch.nn.CrossEntropyLoss()
    best, best_state = None, None
    for epoch in range(settings.epochs):
        model.train()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{settings.epochs}", unit="batch", leave=False, disable=None)
        for images, labels in bar:
            loss = loss_fn(model(normalise(images, device)), labels.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = classification_metrics(*evaluate(model, val_loader, device), taxonomy.names)
        print(f"epoch {epoch + 1}/{settings.epochs}: loss {loss.item():.3f}, validation accuracy "
              f"{metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
        # Keep the epoch with the best validation macro-F1 (accuracy would favour the big classes).
        if best is None or metrics["macro_f1"] > best["macro_f1"]:
            best = {**metrics, "epoch": epoch + 1, "split": split}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    config = {
        "arch": settings.arch, "image_size": settings.image_size, "mean": MEAN, "std": STD,
        "taxonomy_sha256": taxonomy.sha256, "taxonomy_source": taxonomy.source, "label_names": taxonomy.names,
        "seed": settings.seed, "settings": settings.to_dict(), "initial_weights": weights_from,
        "labels_digest": labels_digest(labeled),
        "train_frames": int(len(train_rows)), "val_frames": int(len(val_rows)),
        "val_movies": sorted(val_rows.movie_id.unique().tolist()),
        "metrics": {k: v for k, v in best.items() if k != "confusion"},
    }
    save_checkpoint(model, config, checkpoint)
    atomic_write_json(metrics_path(checkpoint), best)
    print(format_metrics(best, taxonomy.names))
    print(f"checkpoint: {checkpoint} (epoch {best['epoch']})")
    return {**config, "checkpoint": str(checkpoint)}


# -- prediction (the label stage) -----------------------------------------------------------------
@dataclass(frozen=True)
class PredictSettings:
    device: str = "auto"
    batch_size: int = 64
    loader_threads: int = 4


class Labeler:
    """A checkpoint loaded once, on its device, labelling batches of images."""

    def __init__(self, checkpoint: str | Path, taxonomy: Taxonomy, device: str = "auto"):
        import torch

        model, self.config = load_checkpoint(checkpoint, taxonomy)
        self.names, self.image_size = taxonomy.names, self.config["image_size"]
        self.device = pick_device(device)
        self.half = self.device.startswith("cuda")  # fp16 on the GPU: twice the throughput, same argmax
        model = model.to(self.device, memory_format=torch.channels_last)
        self.model = model.half() if self.half else model

    def predict_batch(self, batch: list[tuple[dict, np.ndarray]], allowed: list[int] | None) -> list[dict]:
        """Rows of PREDICTION_SCHEMA for (frame with frame_id and movie_id, RGB image of the
        checkpoint's size) pairs; `allowed` restricts the labels (None: all)."""
        import torch

        images = torch.from_numpy(np.stack([image for _, image in batch])).permute(0, 3, 1, 2)
        with torch.inference_mode(), fixed_cpu_threads():
            x = normalise(images, self.device).contiguous(memory_format=torch.channels_last)
            logits = self.model(x.half() if self.half else x).float()
            if allowed is not None:  # the film's era / nation are known: only consistent labels
                mask = torch.full_like(logits, float("-inf"))
                mask[:, allowed] = 0
                logits = logits + mask
            confidence, ids = logits.softmax(1).topk(min(3, logits.shape[1] if allowed is None else len(allowed)), 1)
        confidence, ids = confidence.cpu().numpy(), ids.cpu().numpy()
        names = self.names
        return [{"frame_id": frame["frame_id"], "movie_id": frame["movie_id"], "label": names[ids[i, 0]],
                 "label_id": int(ids[i, 0]), "label_source": "model", "label_confidence": float(confidence[i, 0]),
                 "top3": [names[j] for j in ids[i]], "top3_confidence": confidence[i].tolist()}
                for i, (frame, _) in enumerate(batch)]


@dataclass
class LabelStage:
    workdir: WorkDir
    checkpoint: str
    taxonomy: Taxonomy
    settings: PredictSettings = field(default_factory=PredictSettings)
    name: str = LABEL_STAGE
    resources: Resources = field(default_factory=lambda: Resources(cpus=1))
    unit: str = "frames"

    def __post_init__(self) -> None:
        self.labeler = None
        self.resources = Resources.for_model_on(pick_device(self.settings.device))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "labeler": None}  # workers load their own model in setup()

    def setup(self) -> None:
        self.labeler = Labeler(self.checkpoint, self.taxonomy, self.settings.device)

    def process(self, partition: Partition, progress) -> dict:
        started = time.monotonic()
        movie, frames = partition.id, partition.info["frames"]
        human: dict[str, int] = partition.info["human"]
        allowed = partition.info["allowed"]
        self.workdir.begin(LABEL_STAGE, movie)
        rows = [self._human_row(f, human[f["frame_id"]]) for f in frames if f["frame_id"] in human]
        todo = [f for f in frames if f["frame_id"] not in human]
        batch: list[tuple[dict, np.ndarray]] = []

        def run_batch() -> None:
            rows.extend(self.labeler.predict_batch(batch, allowed))
            batch.clear()
            progress(len(rows), len(frames))

        size = self.labeler.image_size
        loaded = prefetched(todo, lambda f: load_rgb(self.workdir.root / f["jpeg"], size),
                            self.settings.loader_threads, 2 * self.settings.batch_size)
        unreadable = 0
        for frame, image in loaded:
            if image is None:
                unreadable += 1
                rows.append({"frame_id": frame["frame_id"], "movie_id": movie, "label": None, "label_id": None,
                             "label_source": None, "label_confidence": None, "top3": None, "top3_confidence": None})
                continue
            batch.append((frame, image))
            if len(batch) >= self.settings.batch_size:
                run_batch()
        if batch:
            run_batch()
        order = {f["frame_id"]: i for i, f in enumerate(frames)}
        rows.sort(key=lambda r: order[r["frame_id"]])
        summary = {
            "movie_id": movie, "inputs_digest": partition.info["inputs_digest"],
            "checkpoint_sha256": partition.info["checkpoint_sha256"],
            "frames_in": len(frames), "frames_out": len(frames) - unreadable,
            "human": len(frames) - len(todo), "model": len(todo) - unreadable,
            "rejected": {"unreadable_frame": unreadable} if unreadable else {},
            "seconds": round(time.monotonic() - started, 3),
        }
        self.workdir.commit(LABEL_STAGE, movie, pa.Table.from_pylist(rows, PREDICTION_SCHEMA), summary)
        return summary

    def _human_row(self, frame: dict, label_id: int) -> dict:
        name = self.taxonomy.names[label_id]
        return {"frame_id": frame["frame_id"], "movie_id": frame["movie_id"], "label": name, "label_id": label_id,
                "label_source": "human", "label_confidence": 1.0, "top3": [name], "top3_confidence": [1.0]}

def allowed_labels(taxonomy: Taxonomy, metadata: dict | None) -> list[int] | None:
    """Label ids consistent with a film's known era / nationality; None when nothing is known."""
    era, nationality = (metadata or {}).get("era") or None, (metadata or {}).get("nationality") or None
    if era is None and nationality is None:
        return None
    allowed = taxonomy.consistent_with(era, nationality)
    if not allowed:
        raise LabelerError(f"no label of {taxonomy.source} has era {era!r} and nationality {nationality!r}")
    return allowed


def plan_labeling(workdir: WorkDir, checkpoint: Path, taxonomy: Taxonomy,
                  movie_metadata: dict[str, dict] | None = None) -> list[Partition]:
    """One partition per film with kept frames. A done film is redone when its frames, its human
    labels, its metadata or the checkpoint changed since."""
    frames = labelable_frames(workdir)[["frame_id", "movie_id", "jpeg"]]
    if frames.empty:
        raise LabelerError(f"{workdir.root}: no frames kept after detection: run `mhmd detect` first")
    human = read_human_labels(workdir)
    human = {} if human is None else dict(zip(human.frame_id, human.label_id.astype(int)))
    weights = sha256_of(checkpoint)
    done = workdir.done(LABEL_STAGE)
    partitions = []
    for movie, group in frames.groupby("movie_id", sort=True):
        listing = group.to_dict("records")
        labels = {f["frame_id"]: int(human[f["frame_id"]]) for f in listing if f["frame_id"] in human}
        allowed = allowed_labels(taxonomy, (movie_metadata or {}).get(movie))
        digest = hashlib.sha256(json.dumps([inputs_digest(group.frame_id.tolist()), sorted(labels.items()), allowed])
                                .encode()).hexdigest()[:16]
        workdir.plan(LABEL_STAGE, movie, {"frames": len(listing), "inputs_digest": digest})
        summary = done.get(movie)
        if summary and summary.get("inputs_digest") == digest and summary.get("checkpoint_sha256") == weights:
            continue
        partitions.append(Partition(movie, {"frames": listing, "human": labels, "allowed": allowed,
                                            "inputs_digest": digest, "checkpoint_sha256": weights}))
    return partitions


def predict(workdir: WorkDir | str | Path, checkpoint: str | Path, settings: PredictSettings | None = None,
            taxonomy: Taxonomy | None = None, movie_metadata: dict[str, dict] | None = None,
            runner=None) -> list[PartitionResult]:
    """Label every kept frame, film by film, resumably; human labels are kept as they are.
    movie_metadata: movie_id -> {"era": ..., "nationality": ...} (either may be missing)."""
    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    taxonomy = taxonomy or load_taxonomy()
    load_checkpoint(checkpoint, taxonomy)  # refuse a wrong checkpoint here, not once per film
    partitions = plan_labeling(workdir, Path(checkpoint), taxonomy, movie_metadata)
    stage = LabelStage(workdir, str(checkpoint), taxonomy, settings or PredictSettings())
    return (runner or LocalRunner()).run(stage, partitions)
