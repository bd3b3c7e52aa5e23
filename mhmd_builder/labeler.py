"""The ResNet labeler: its architectures and initial weights, its checkpoint, how a frame becomes
its input, and `Labeler`, a checkpoint loaded once that labels batches of images.

A checkpoint is CKPT.safetensors (weights) with CKPT.json beside it (config: arch, input size,
input: the whole frame or its persons, taxonomy hash and names, normalisation, seed, metrics) and
CKPT.metrics.json (validation metrics). It records the SHA-256 of the taxonomy it was trained on
and is refused for any other: class index 7 of one taxonomy is not class 7 of another. Training is
in labeler_train.py, the label stage in label.py.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np

from .devices import fixed_cpu_threads, machine_cores, pick_device
from .errors import MhmdError
from .images import load_frame
from .ranges import CHOICES
from .shards import BOX_DECIMALS
from .stages import Resources
from .tables import label_dir
from .taxonomy import Taxonomy
from .weights import check_pinned, weights_cache
from .workdir import WorkDir, atomic_write_bytes, atomic_write_json, read_json

log = logging.getLogger(__name__)

ARCHS = CHOICES["labeler.arch"]
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation (RGB), recorded in the checkpoint
STD = (0.229, 0.224, 0.225)
INPUTS = CHOICES["labeler.input"]
# Share of the persons' union box added on each side (`persons_box`).
PERSONS_MARGIN = 0.15


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
            log.warning(f"notice: cannot download torchvision's ImageNet {arch} weights ({type(e).__name__}, "
                        "offline?): training from random initialisation; give a local copy with --weights PATH")
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


def default_checkpoint(workdir: WorkDir) -> Path:
    """Where `labeler train` writes when not told: the label stage's folder."""
    return label_dir(workdir) / "labeler.safetensors"


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
    if input_of(config) not in INPUTS:
        raise LabelerError(f"{config_path(checkpoint)}: input {input_of(config)!r} is not one of {', '.join(INPUTS)}: "
                           "a checkpoint of another version or an edited config; train the labeler again")
    if config["taxonomy_sha256"] != taxonomy.sha256:
        raise LabelerError(f"{checkpoint} was trained on another taxonomy (SHA-256 {config['taxonomy_sha256'][:12]}..., "
                           f"{len(config['label_names'])} labels) than {taxonomy.source} (SHA-256 {taxonomy.sha256[:12]}..., "
                           f"{len(taxonomy)} labels): refusing it; train a labeler on this taxonomy")
    model = build_model(config["arch"], len(config["label_names"]))
    model.load_state_dict(load_file(str(checkpoint)))
    return model.eval(), config


def check_checkpoint(checkpoint: str | Path, taxonomy: Taxonomy) -> dict:
    """Before a command labels anything: refuse a checkpoint of another taxonomy (here, not once per
    film), and say which labels it never gives. Returns its config."""
    config = load_checkpoint(checkpoint, taxonomy)[1]
    trained = trained_labels(config)
    if trained is not None and len(trained) < len(taxonomy):
        log.warning(f"notice: {checkpoint} was trained on {len(trained)} of the {len(taxonomy)} labels and gives "
                    "only those; label frames of the others and train again to have them")
    return config


# -- images ---------------------------------------------------------------------------------------
def fit_rgb(bgr: np.ndarray, size: int) -> np.ndarray:
    """The whole frame, RGB, squeezed to size x size: a centre crop would cut off persons at the sides."""
    return cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def persons_box(boxes, margin: float = PERSONS_MARGIN) -> tuple[float, float, float, float]:
    """The union of a frame's person boxes (normalised xyxy, as detect records them), widened by
    `margin` of its width and height on each side and clamped to the frame; the whole frame when
    there is no box. The margin keeps what the boxes cut: sleeves and shoulders beside a box, the
    rest of a uniform below an upper-body or face box (OpenCV's cascades)."""
    boxes = np.asarray(boxes_listed(boxes), float).reshape(-1, 4)
    if not len(boxes):
        return 0.0, 0.0, 1.0, 1.0
    x0, y0 = boxes[:, :2].min(0)
    x1, y1 = boxes[:, 2:].max(0)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return max(0.0, x0 - dx), max(0.0, y0 - dy), min(1.0, x1 + dx), min(1.0, y1 + dy)


def boxes_listed(boxes) -> list[list[float]]:
    """A frame's person boxes as plain lists, from any of the forms they are read in (a table's
    nested arrays, a shard's json lists; None or NaN when detect recorded none), rounded as shards
    keep them: predict (from the tables) and relabel (from the shards) then cut the same pixels.
    Anything else (a shard's json is outside input) is refused: LabelerError."""
    if boxes is None or (isinstance(boxes, float) and math.isnan(boxes)):
        return []
    try:
        listed = [[round(float(v), BOX_DECIMALS) for v in box] for box in boxes]
    except (TypeError, ValueError):
        listed = None
    if listed is None or any(len(box) != 4 or not all(map(math.isfinite, box)) for box in listed):
        raise LabelerError(f"person boxes {str(boxes)[:60]!r} are not a list of [x0, y0, x1, y1] numbers")
    return listed


def model_input(bgr: np.ndarray, size: int, mode: str, boxes=None) -> np.ndarray:
    """What the labeler sees of a frame, RGB size x size: the whole frame (`mode` "frame") or its
    persons (`persons_box`; the whole frame when it has no box). Training and inference both go
    through here, so a checkpoint always sees frames cut the way it was trained on."""
    if mode not in INPUTS:
        raise LabelerError(f"unknown labeler input {mode!r} (available: {', '.join(INPUTS)})")
    if mode == "persons":
        height, width = bgr.shape[:2]
        x0, y0, x1, y1 = persons_box(boxes)
        left, top = min(int(x0 * width), width - 1), min(int(y0 * height), height - 1)
        bgr = bgr[top:max(top + 1, round(y1 * height)), left:max(left + 1, round(x1 * width))]
    return fit_rgb(bgr, size)


def load_rgb(path: Path, size: int, mode: str = "frame", boxes=None) -> np.ndarray | None:
    image = load_frame(path)
    return None if image is None else model_input(image, size, mode, boxes)


def normalise(batch, device: str):
    """uint8 NCHW on any device -> float, ImageNet-normalised, on `device` (done there: less to copy)."""
    import torch

    batch = batch.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return (batch - mean) / std


# -- inference -----------------------------------------------------------------------------------
class Labeler:
    """A checkpoint loaded once, on its device, labelling batches of images."""

    def __init__(self, checkpoint: str | Path, taxonomy: Taxonomy, device: str = "auto"):
        import torch

        model, self.config = load_checkpoint(checkpoint, taxonomy)
        self.names, self.image_size, self.input = taxonomy.names, self.config["image_size"], input_of(self.config)
        self.trained = trained_labels(self.config)
        self.device = pick_device(device)
        self.half = self.device.startswith("cuda")  # fp16 on the GPU: twice the throughput, same argmax
        model = model.to(self.device, memory_format=torch.channels_last)
        self.model = model.half() if self.half else model

    def image(self, bgr: np.ndarray, boxes) -> np.ndarray:
        """A frame (BGR) with its person boxes as this checkpoint sees it."""
        return model_input(bgr, self.image_size, self.input, boxes)

    def predict_batch(self, batch: list[tuple[dict, np.ndarray]], allowed: list[int] | None) -> list[dict]:
        """Rows of PREDICTION_SCHEMA for (frame with frame_id and movie_id, RGB image of the
        checkpoint's size) pairs; `allowed` restricts the labels (None: all), and only labels the
        labeler was trained on are given: an untrained class's output is noise."""
        import torch

        allowed = restricted_to_trained(allowed, self.trained, self.names)
        images = torch.from_numpy(np.stack([image for _, image in batch])).permute(0, 3, 1, 2)
        with torch.inference_mode(), fixed_cpu_threads():
            x = normalise(images, self.device).contiguous(memory_format=torch.channels_last)
            logits = self.model(x.half() if self.half else x).float()
            if allowed is not None:
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


def input_of(config: dict) -> str:
    """What of a frame a checkpoint was trained on (`model_input`); checkpoints written before the
    choice existed saw whole frames."""
    return config.get("input", "frame")


def trained_labels(config: dict) -> list[int] | None:
    """The label ids a checkpoint's training saw (None for checkpoints that did not record them)."""
    return config.get("trained_labels")


def restricted_to_trained(allowed: list[int] | None, trained: list[int] | None, names: list[str]) -> list[int] | None:
    """The labels allowed (a film's era / nationality may restrict them) that training saw."""
    if trained is None:
        return allowed
    trained_set = set(trained)
    kept = trained if allowed is None else [i for i in allowed if i in trained_set]
    if not kept:
        raise LabelerError(f"none of the labels this film may have ({', '.join(names[i] for i in allowed[:5])}"
                           f"{', ...' if len(allowed) > 5 else ''}) was among the labeler's training labels: "
                           "label some of its frames and train again")
    return kept


class LabelerWorker:
    """For a stage whose workers each hold the labeler (the label and relabel stages): it asks for a
    GPU when the labeler runs on CUDA, and each worker loads its own copy once, in setup()."""

    def __post_init__(self) -> None:
        self.labeler = None
        self.resources = Resources.for_model_on(pick_device(self.settings.device))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "labeler": None}  # workers load their own model in setup()

    def setup(self) -> None:
        self.labeler = Labeler(self.checkpoint, self.taxonomy, self.settings.device)

    def loader_threads(self, asked: int) -> int:
        """Threads decoding and resizing JPEGs for the labeler: on CUDA at least one per core, as
        the GPU labels faster than a few threads decode. Decoding stays on the CPU there: the labels
        follow OpenCV's INTER_AREA resize, which no GPU resize equals, and must not depend on the machine."""
        return max(asked, machine_cores()) if self.labeler.device.startswith("cuda") else asked
