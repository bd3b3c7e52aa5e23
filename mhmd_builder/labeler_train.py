"""Training the labeler on the human labels (the paper's 1%).

    train(workdir, TrainSettings(...)) -> the checkpoint (labeler.py says what it holds), and its
                                          config with the validation metrics of the epoch it keeps
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .devices import fixed_cpu_threads, pick_device
from .labeler import (INPUTS, MEAN, STD, LabelerError, boxes_listed, build_model, config_path, default_checkpoint,
                      initial_weights, load_rgb, metrics_path, normalise, save_checkpoint)
from .labeler_pseudo import confident_per_class, unlabelled_pool
from .labeler_split import Split, split_for_validation
from .logs import progress_bar
from .tables import DETECT, read_human_labels
from .taxonomy import Taxonomy, load_taxonomy
from .workdir import WorkDir, atomic_write_json, read_json, writes

log = logging.getLogger(__name__)
# Validation frames every trained label needs before the best epoch is picked on them: with one, a
# label's F1 is 0 or 1 and the "best" epoch a coin flip (the learning benchmark's 7 frames of 6 labels).
MIN_VALIDATION_FRAMES = 2

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class TrainSettings:
    arch: str = "resnet50"
    weights: str = "imagenet"  # imagenet | none | a path to a .pth state dict
    output: str | None = None  # checkpoint path (.safetensors); default WORKDIR/label/labeler.safetensors
    epochs: int = 10
    batch_size: int = 32
    image_size: int = 224
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    split: str = "films"  # films | frames: how validation frames are chosen (labeler_split.py)
    input: str = "persons"  # persons | frame: what of a frame the labeler sees (labeler.model_input)
    device: str = "auto"
    seed: int = 0
    workers: int = 0  # DataLoader processes; seeded from the run's generator, so still reproducible
    # Self-training (labeler_pseudo.py): rounds of training again on the human labels plus the
    # unlabelled frames the last round was surest of, at most per_class per label, each at least
    # that confident.
    pseudo_label_rounds: int = 0
    pseudo_label_per_class: int = 10
    pseudo_label_confidence: float = 0.9

    def to_dict(self) -> dict:
        return asdict(self)

    def checkpoint(self, workdir: WorkDir) -> Path:
        """The checkpoint these settings train: `output`, else the work directory's default."""
        return Path(self.output) if self.output else default_checkpoint(workdir)


def labeled_frames(workdir: WorkDir) -> "pd.DataFrame":
    """Human-labeled frames with their movie and JPEG."""
    from .manifest import manifest

    human = read_human_labels(workdir)
    if human is None or human.empty:
        raise LabelerError(f"{workdir.root}: no human labels yet: import a label file first (--labels FILE)")
    frames = manifest(workdir, before=DETECT)[["frame_id", "movie_id", "timestamp", "jpeg", "boxes"]]
    frames = frames.dropna(subset=["jpeg"])
    labeled = human[["frame_id", "label_id"]].merge(frames, on="frame_id")
    if labeled.empty:
        raise LabelerError(f"{workdir.root}: none of the {len(human)} human-labeled frames has a JPEG here")
    return labeled.sort_values("frame_id", ignore_index=True)


def labels_digest(labeled: "pd.DataFrame") -> str:
    """Identifies the human labels a labeler is trained on."""
    pairs = "\n".join(f"{f} {i}" for f, i in sorted(zip(labeled.frame_id, labeled.label_id.astype(int))))
    return hashlib.sha256(pairs.encode()).hexdigest()[:16]


def checkpoint_is_current(workdir: WorkDir, settings: TrainSettings, taxonomy: Taxonomy) -> bool:
    """Whether `train` would make the checkpoint that is there already: same settings, taxonomy and
    human labels (a build resumed after training need not train again)."""
    checkpoint = settings.checkpoint(workdir)
    if not checkpoint.is_file() or not config_path(checkpoint).is_file():
        return False
    config = read_json(config_path(checkpoint))
    return (config.get("settings") == settings.to_dict() and config.get("taxonomy_sha256") == taxonomy.sha256
            and config.get("labels_digest") == labels_digest(labeled_frames(workdir)))


class BalancedSampler:
    """Each epoch, as many draws as frames (or `draws`), the same number from every class (the
    remainder from classes picked at random), each class's frames in shuffled rounds: none is drawn
    again before all of its class have been. The paper's classes differ 829x: a class-weighted loss would scale a
    rare class's few gradients by hundreds (noisy steps), while sampling shows its frames more
    often, each time differently augmented. Drawing with replacement instead left about a third of
    the frames out of each epoch, which costs dearly when there are 14 of them."""

    def __init__(self, targets: np.ndarray, seed: int, draws: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.classes = [np.flatnonzero(targets == c) for c in np.unique(targets)]
        self.queues = [np.zeros(0, int) for _ in self.classes]  # each class's frames left in this round
        self.draws = draws or len(targets)

    def __len__(self) -> int:
        return self.draws

    def __iter__(self):
        quota = np.full(len(self.classes), self.draws // len(self.classes))
        quota[self.rng.choice(len(self.classes), self.draws % len(self.classes), replace=False)] += 1
        drawn = np.concatenate([self.next_of_class(c, n) for c, n in enumerate(quota)])
        return iter(self.rng.permutation(drawn).tolist())

    def next_of_class(self, c: int, n: int) -> np.ndarray:
        """The next `n` frames of class `c`, starting a new shuffled round whenever one runs out."""
        while len(self.queues[c]) < n:
            self.queues[c] = np.concatenate([self.queues[c], self.rng.permutation(self.classes[c])])
        drawn, self.queues[c] = self.queues[c][:n], self.queues[c][n:]
        return drawn


# -- metrics ---------------------------------------------------------------------------------------
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
    majority = metrics["majority"]
    lines = [f"validation: {metrics['samples']} frames ({metrics['split']}), accuracy {metrics['accuracy']:.3f}, "
             f"macro-F1 {metrics['macro_f1']:.3f}; labelling every frame {majority['label']}: accuracy "
             f"{majority['accuracy']:.3f}, macro-F1 {majority['macro_f1']:.3f}",
             f"{'label':<40}{'precision':>10}{'recall':>8}{'support':>9}"]
    lines += [f"{name:<40}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['support']:>9}"
              for name, m in metrics["per_class"].items()]
    present = [names.index(name) for name in metrics["per_class"]]
    lines.append("confusion (rows true, columns predicted; ids): " + " ".join(f"{i:>4}" for i in present))
    lines += [f"{i:>4}: " + " ".join(f"{metrics['confusion'][i][j]:>4}" for j in present) for i in present]
    return "\n".join(lines)


# -- data -----------------------------------------------------------------------------------------
class LabeledFrames:
    """A torch dataset of (uint8 CHW tensor, class) read from the frames' JPEGs, cut as `mode` says
    (`model_input`: the whole frame or its persons' `boxes`) and resized once per read."""

    def __init__(self, root: Path, rows: "pd.DataFrame", size: int, mode: str, transform=None):
        self.root, self.size, self.mode, self.transform = root, size, mode, transform
        self.jpegs, self.targets, self.boxes = rows.jpeg.tolist(), rows.label_id.tolist(), rows.boxes.tolist()

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int):
        import torch

        image = load_rgb(self.root / self.jpegs[i], self.size, self.mode, self.boxes[i])
        if image is None:
            raise LabelerError(f"{self.jpegs[i]}: missing or unreadable frame")
        tensor = torch.from_numpy(image).permute(2, 0, 1)
        return (self.transform(tensor) if self.transform else tensor), self.targets[i]


def train_transform(size: int):
    """The paper's horizontal flip and Gaussian blur, plus a random crop of 30-100% of the frame and
    a small brightness / contrast / saturation jitter; hue stays: the colour of a uniform is the
    signal. The crop shows the persons at other scales and places, with less of the same background
    each time: a film's background is what a few labelled frames teach best and what carries over
    to no other film (70-100% crops did worse on held-out films)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.3, 1.0), ratio=(0.75, 1.33), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3),
        v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05),
    ])


# -- training -------------------------------------------------------------------------------------
@writes("workdir")
def train(workdir: WorkDir | str | Path, settings: TrainSettings | None = None,
          taxonomy: Taxonomy | None = None) -> dict:
    """Train a labeler on the human labels; write the checkpoint; return its config (with metrics)."""
    with fixed_cpu_threads():
        return _train(workdir if isinstance(workdir, WorkDir) else WorkDir(workdir), settings or TrainSettings(),
                      taxonomy or load_taxonomy())


def _train(workdir: WorkDir, settings: TrainSettings, taxonomy: Taxonomy) -> dict:
    import pandas as pd

    if settings.input not in INPUTS:
        raise LabelerError(f"input {settings.input!r} (--input): not one of {', '.join(INPUTS)}")
    model, weights_from = fresh_model(settings, len(taxonomy))  # an unknown architecture fails before any work
    checkpoint = settings.checkpoint(workdir)
    device = pick_device(settings.device)
    labeled = labeled_frames(workdir)
    if labeled.label_id.max() >= len(taxonomy):
        raise LabelerError(f"human labels use class ids beyond the {len(taxonomy)} labels of {taxonomy.source}")
    say_frames_without_persons(labeled, settings.input)
    split = split_for_validation(labeled, taxonomy.names, settings.val_fraction, settings.seed, settings.split)
    print(f"validation split: {split.how}\n{split.table()}")
    trained = sorted(labeled.label_id[~split.val].astype(int).unique().tolist())
    selection = selection_rule(split, trained, taxonomy.names)
    human_train, val_rows = labeled[~split.val], labeled[split.val]
    best = train_round(model, workdir, human_train, val_rows, settings, device, taxonomy.names, selection is None,
                       len(human_train))
    pseudo_rounds = []
    if settings.pseudo_label_rounds:
        pool = unlabelled_pool(workdir, labeled, split.val)
        for round_number in range(1, settings.pseudo_label_rounds + 1):
            pseudo = pseudo_labels(model, workdir, pool, trained, settings, device)
            model, _ = fresh_model(settings, len(taxonomy))  # from the start again: no drift from round to round
            best = train_round(model, workdir, pd.concat([human_train, pseudo], ignore_index=True), val_rows,
                               settings, device, taxonomy.names, selection is None, len(human_train))
            pseudo_rounds.append(pseudo_round_summary(round_number, pool, pseudo, best, taxonomy.names))
    best.update(split=split.how, selected=selection or "the best validation macro-F1 (ties: the later epoch)",
                majority=majority_baseline(labeled, split.val, taxonomy.names))
    config = checkpoint_config(settings, taxonomy, weights_from, labeled, split, trained, best, pseudo_rounds)
    save_checkpoint(model, config, checkpoint)
    atomic_write_json(metrics_path(checkpoint), best)
    print(format_metrics(best, taxonomy.names))
    warn_if_no_better_than_majority(best)
    print(f"checkpoint: {checkpoint} (epoch {best['epoch']}: {best['selected']}); it predicts only the "
          f"{len(trained)} of {len(taxonomy)} labels it was trained on")
    return {**config, "checkpoint": str(checkpoint)}


def fresh_model(settings: TrainSettings, classes: int):
    """(the model as training starts it: seeded random initialisation, then `settings.weights`; where
    the weights came from). The same every time for the same settings."""
    import torch

    torch.manual_seed(settings.seed)  # before the model: its random initialisation is part of the run
    model = build_model(settings.arch, classes)
    return model, start_from_initial_weights(model, settings)


def train_round(model, workdir: WorkDir, train_rows: "pd.DataFrame", val_rows: "pd.DataFrame",
                settings: TrainSettings, device: str, names: list[str], select_best: bool, epoch_draws: int) -> dict:
    """Fit `model` (moved to `device`) on `train_rows`, `epoch_draws` frames an epoch, and leave it at
    the kept epoch; that epoch's validation metrics. A self-training round draws as many as the
    first, on the human labels alone: pseudo labels take the place of repeats, so a round costs
    what the first does and takes as many steps (more steps learnt the few films' backgrounds)."""
    loaders = data_loaders(workdir, train_rows, val_rows, settings, device, epoch_draws)
    model.to(device)
    best, best_state = fit(model, loaders, settings, device, names, select_best)
    if best_state is not None:
        model.load_state_dict(best_state)
    return best


def pseudo_labels(model, workdir: WorkDir, pool: "pd.DataFrame", trained: list[int], settings: TrainSettings,
                  device: str) -> "pd.DataFrame":
    """`pool`'s frames the model is sure of, labelled as it predicts them (confident_per_class)."""
    label_ids, confidences = predict_with_confidence(model, _loader(workdir, pool, settings, device), trained,
                                                     device)
    pseudo = confident_per_class(pool, label_ids, confidences, settings.pseudo_label_per_class,
                                 settings.pseudo_label_confidence)
    log.info(f"pseudo labels: {len(pseudo)} of {len(pool)} unlabelled frames, at most "
             f"{settings.pseudo_label_per_class} per label at confidence {settings.pseudo_label_confidence} or more")
    return pseudo.drop(columns="confidence")


def pseudo_round_summary(round_number: int, pool: "pd.DataFrame", pseudo: "pd.DataFrame", best: dict,
                         names: list[str]) -> dict:
    """What the checkpoint's config records of a self-training round."""
    per_label = pseudo.label_id.value_counts().sort_index()
    log.info(f"pseudo-label round {round_number}: validation accuracy {best['accuracy']:.3f}, "
             f"macro-F1 {best['macro_f1']:.3f}")
    return {"round": round_number, "pool_frames": int(len(pool)), "pseudo_frames": int(len(pseudo)),
            "per_label": {names[i]: int(n) for i, n in per_label.items()},
            "val_accuracy": best["accuracy"], "val_macro_f1": best["macro_f1"], "epoch": best["epoch"]}


def say_frames_without_persons(labeled: "pd.DataFrame", mode: str) -> None:
    if mode == "persons":
        whole = sum(not boxes_listed(boxes) for boxes in labeled.boxes)
        if whole:
            log.info(f"notice: {whole} of the {len(labeled)} labelled frames have no person box: "
                     "the labeler sees them whole")


def selection_rule(split: Split, trained: list[int], names: list[str]) -> str | None:
    """None when validation scores every class training saw on MIN_VALIDATION_FRAMES frames or more, so
    that its best epoch means something; else why the last epoch is kept (the one-cycle schedule ends
    with the smallest steps)."""
    frames = {r["label_id"]: r["val_frames"] for r in split.per_class}
    unscored = [names[c] for c in trained if not frames.get(c)]
    thin = [names[c] for c in trained if 0 < frames.get(c, 0) < MIN_VALIDATION_FRAMES]
    if unscored:
        reason = (f"the last epoch: validation has no frame of {len(unscored)} of the {len(trained)} trained labels "
                  f"({listed(unscored)}), so it cannot pick an epoch")
    elif thin:
        reason = (f"the last epoch: validation has fewer than {MIN_VALIDATION_FRAMES} frames of {len(thin)} of the "
                  f"{len(trained)} trained labels ({listed(thin)}), too few to pick an epoch")
    else:
        return None
    log.info(f"notice: keeping {reason}")
    return reason


def listed(labels: list[str]) -> str:
    return f"{', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''}"


def majority_baseline(labeled: "pd.DataFrame", val: np.ndarray, names: list[str]) -> dict:
    """The trivial labeler: the most frequent training label for every validation frame."""
    majority = int(labeled.label_id[~val].astype(int).value_counts().sort_index().idxmax())
    truth = labeled.label_id[val].astype(int).to_numpy()
    metrics = classification_metrics(truth, np.full(len(truth), majority), names)
    return {"label": names[majority], "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def warn_if_no_better_than_majority(metrics: dict) -> None:
    majority = metrics["majority"]
    if metrics["samples"] and metrics["macro_f1"] <= majority["macro_f1"]:
        log.warning(f"WARNING: on its validation frames the labeler does no better (macro-F1 {metrics['macro_f1']:.3f}) "
              f"than labelling every frame {majority['label']} (macro-F1 {majority['macro_f1']:.3f}): its labels "
              "would be no better than that; label more frames of more films or train longer")


def checkpoint_config(settings: TrainSettings, taxonomy: Taxonomy, weights_from: str, labeled: "pd.DataFrame",
                      split: Split, trained: list[int], best: dict, pseudo_rounds: list[dict]) -> dict:
    """What the checkpoint's .json records: how to rebuild and feed the model, and how it was trained."""
    train_rows, val_rows = labeled[~split.val], labeled[split.val]
    return {
        "arch": settings.arch, "image_size": settings.image_size, "input": settings.input, "mean": MEAN, "std": STD,
        "taxonomy_sha256": taxonomy.sha256, "taxonomy_source": taxonomy.source, "label_names": taxonomy.names,
        "seed": settings.seed, "settings": settings.to_dict(), "initial_weights": weights_from,
        "labels_digest": labels_digest(labeled), "trained_labels": trained,
        "train_frames": int(len(train_rows)), "val_frames": int(len(val_rows)),
        "val_movies": sorted(set(val_rows.movie_id) - set(train_rows.movie_id)),
        "split": split.per_class, "pseudo_label_rounds": pseudo_rounds,
        "metrics": {k: v for k, v in best.items() if k != "confusion"},
    }


def start_from_initial_weights(model, settings: TrainSettings) -> str:
    """Load the backbone `settings.weights` names into `model` (if any); returns where it came from."""
    state, weights_from = initial_weights(settings.arch, settings.weights)
    if state is not None:
        model.load_state_dict(state, strict=False)
    return weights_from


def data_loaders(workdir: WorkDir, train_rows: "pd.DataFrame", val_rows: "pd.DataFrame", settings: TrainSettings,
                 device: str, epoch_draws: int):
    """(training loader: augmented, class-balanced; the training frames as they are, once each, for
    BatchNorm's statistics; validation loader: the frames as they are)."""
    targets = train_rows.label_id.to_numpy(int)
    train_loader = _loader(workdir, train_rows, settings, device, train_transform(settings.image_size),
                           BalancedSampler(targets, settings.seed, epoch_draws))
    return train_loader, _loader(workdir, train_rows, settings, device), _loader(workdir, val_rows, settings, device)


def _loader(workdir: WorkDir, rows: "pd.DataFrame", settings: TrainSettings, device: str, transform=None,
            sampler=None):
    import torch

    data = LabeledFrames(workdir.root, rows, settings.image_size, settings.input, transform)
    return torch.utils.data.DataLoader(data, settings.batch_size, sampler=sampler, num_workers=settings.workers,
                                       generator=torch.Generator().manual_seed(settings.seed),
                                       pin_memory=device.startswith("cuda"))


def fit(model, loaders: tuple, settings: TrainSettings, device: str, names: list[str],
        select_best: bool) -> tuple[dict, dict | None]:
    """Train for `settings.epochs` on data_loaders' (training, calibration, validation) loaders;
    (validation metrics and number of the kept epoch, the model's state after it, or None when that
    is the last). After each epoch BatchNorm's statistics are recomputed, so that validation scores
    the model as it is saved. With select_best the kept epoch has the best validation macro-F1
    (accuracy would favour the big classes), else it is the last one."""
    import torch

    train_loader, calibration_loader, val_loader = loaders
    optimiser = torch.optim.AdamW(model.parameters(), settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, settings.lr,
                                                   total_steps=settings.epochs * len(train_loader))
    best, best_state = None, None
    for epoch in range(1, settings.epochs + 1):
        loss = train_one_epoch(model, train_loader, optimiser, schedule, device, f"epoch {epoch}/{settings.epochs}")
        recalibrate_batch_norm(model, calibration_loader, device)
        metrics = {**classification_metrics(*evaluate(model, val_loader, device), names), "epoch": epoch}
        log.info(f"epoch {epoch}/{settings.epochs}: loss {loss:.3f}, validation accuracy "
                 f"{metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
        if not select_best:
            best = metrics
        elif best is None or metrics["macro_f1"] >= best["macro_f1"]:
            best, best_state = metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}
    return best, best_state if select_best else None


def train_one_epoch(model, loader, optimiser, schedule, device: str, description: str) -> float:
    """One pass over `loader`; returns the loss of its last batch."""
    import torch

    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    bar = progress_bar(loader, description, "batch")
    for images, labels in bar:
        loss = loss_fn(model(normalise(images, device)), labels.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def recalibrate_batch_norm(model, loader, device: str) -> None:
    """Set every BatchNorm layer's running mean and variance to those of `loader`'s frames (the
    training frames as they are, not augmented), averaged over its batches by their size. The
    running statistics training leaves are a moving average over its last augmented batches, taken
    while the weights kept changing: after the few steps a small label set gives, a labeler in eval
    mode got 11 of its 16 training frames right, against 16 of 16 with these statistics."""
    import torch

    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    model.train()
    seen = 0
    with torch.no_grad():
        for images, _ in loader:
            seen += len(images)
            for layer in layers:
                layer.momentum = len(images) / seen  # 1 for the first batch: the old statistics go
            model(normalise(images, device))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()


def evaluate(model, loader, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(true classes, predicted classes) of every frame of `loader`."""
    import torch

    model.eval()
    truth, predicted = [np.zeros(0, int)], [np.zeros(0, int)]  # a labeler may have no validation frame
    with torch.inference_mode():
        for images, targets in loader:
            predicted.append(model(normalise(images, device)).argmax(1).cpu().numpy())
            truth.append(targets.numpy())
    return np.concatenate(truth), np.concatenate(predicted)


def predict_with_confidence(model, loader, trained: list[int], device: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, its softmax probability) of every frame of `loader`, among the `trained`
    classes only, as `labeler predict` gives them."""
    import torch

    model.eval()
    allowed = torch.tensor(trained, device=device)
    ids, confidences = [np.zeros(0, int)], [np.zeros(0)]
    with torch.inference_mode():
        for images, _ in loader:
            confidence, best = model(normalise(images, device))[:, allowed].softmax(1).max(1)
            ids.append(allowed[best].cpu().numpy())
            confidences.append(confidence.cpu().numpy())
    return np.concatenate(ids), np.concatenate(confidences)
