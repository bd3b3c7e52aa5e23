"""HistoryNet's evaluation metrics, as the official scripts compute them.

All take RGB uint8 images of the original frame size (`data.compose_rgb` builds the colorized one):
- PSNR and SSIM on 0..255 with skimage (SSIM: 11x11 Gaussian window, sigma 1.5, over the 3 channels);
- LPIPS with the lpips package (net='alex', v0.1, RGB scaled to [-1, 1] by `lpips.im2tensor`, as the
  official `lpips_2dirs.py` does);
- Hasler-Suesstrunk colourfulness of the colorized image (quality.colorfulness).

LPIPS needs torchvision's ImageNet AlexNet as its backbone; the lpips package ships only its linear
layers. `lpips_model` takes it from torchvision's own download (and cache), or from a local copy of
`alexnet-owt-7be5be79.pth`; when neither works it raises `LpipsUnavailable`, whose message says why,
so an evaluator can still report PSNR and SSIM.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import lpips
import numpy as np
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ..errors import MhmdError, first_line
from ..quality import colorfulness
from ..weights import sha256_of

ALEXNET_FILE = Path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url).name  # alexnet-owt-7be5be79.pth
# The name carries the first hex digits of the file's SHA-256, which torch.hub checks on download.
ALEXNET_SHA256_PREFIX = torch.hub.HASH_REGEX.search(ALEXNET_FILE).group(1)


def psnr(reference: np.ndarray, colorized: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(reference, colorized, data_range=255))


def ssim(reference: np.ndarray, colorized: np.ndarray) -> float:
    return float(structural_similarity(reference, colorized, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=255, channel_axis=-1))


def colorfulness_rgb(rgb: np.ndarray) -> float:
    return colorfulness(rgb[..., ::-1])  # quality.colorfulness reads BGR


# -- LPIPS ----------------------------------------------------------------------------------------
class LpipsUnavailable(MhmdError):
    """LPIPS cannot be computed; the message ("LPIPS cannot be computed: ...") says why."""


def _lpips(pretrained_backbone: bool) -> lpips.LPIPS:
    with warnings.catch_warnings():  # lpips still calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="alex", pnet_rand=not pretrained_backbone, verbose=False)


def _alexnet_features(path: Path) -> dict[str, torch.Tensor]:
    """torchvision AlexNet state dict from `path`, checked as far as it can be."""
    if not path.is_file():
        raise LpipsUnavailable(f"LPIPS cannot be computed: no AlexNet backbone file at {path}")
    if path.name == ALEXNET_FILE and not sha256_of(path).startswith(ALEXNET_SHA256_PREFIX):
        raise LpipsUnavailable(f"LPIPS cannot be computed: {path} does not have the SHA-256 of torchvision's "
                               f"{ALEXNET_FILE}: refusing it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the file is, it is not a usable state dict
        raise LpipsUnavailable(f"LPIPS cannot be computed: {path} is not a state dict ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise LpipsUnavailable(f"LPIPS cannot be computed: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_alexnet_backbone(model: lpips.LPIPS, state: dict[str, torch.Tensor], source: str) -> None:
    """Put torchvision AlexNet weights (`features.<i>.*`) into lpips' slices, which keep torchvision's
    layer numbers (`slice<k>.<i>.*`); every slice parameter must be found, with its shape."""
    wanted = model.net.state_dict()
    mapped = {}
    for name in wanted:
        key = "features." + name.split(".", 1)[1]
        if key not in state or state[key].shape != wanted[name].shape:
            raise LpipsUnavailable(f"LPIPS cannot be computed: {source} is not a torchvision AlexNet state dict "
                                   f"({key} missing or of another shape)")
        mapped[name] = state[key]
    model.net.load_state_dict(mapped)


def lpips_model(backbone: str | Path | None = None, device: str = "cpu") -> lpips.LPIPS:
    """lpips.LPIPS(net='alex') in eval mode on `device`. The AlexNet backbone comes from `backbone`
    (a local torchvision state dict) when given, else from torchvision's download or cache."""
    if backbone is None:
        try:
            model = _lpips(pretrained_backbone=True)
        except (OSError, RuntimeError) as e:  # offline (URLError is an OSError), or a bad download
            raise LpipsUnavailable(f"LPIPS cannot be computed: torchvision could not get the AlexNet backbone "
                                   f"({first_line(e)}); give a local copy of {ALEXNET_FILE}") from None
    else:
        model = _lpips(pretrained_backbone=False)
        _load_alexnet_backbone(model, _alexnet_features(Path(backbone)), str(backbone))
    return model.to(device).eval()


def lpips_distance(model: lpips.LPIPS, reference: np.ndarray, colorized: np.ndarray) -> float:
    device = next(model.parameters()).device
    with torch.no_grad():
        return float(model(lpips.im2tensor(reference).to(device), lpips.im2tensor(colorized).to(device)))


# -- all of them, and their means -----------------------------------------------------------------
def image_metrics(reference: np.ndarray, colorized: np.ndarray, lpips_net: lpips.LPIPS | None = None) -> dict:
    """PSNR, SSIM, colourfulness and (with a model) LPIPS of one colorized RGB image against the original."""
    metrics = {"psnr": psnr(reference, colorized), "ssim": ssim(reference, colorized),
               "colorfulness": colorfulness_rgb(colorized)}
    if lpips_net is not None:
        metrics["lpips"] = lpips_distance(lpips_net, reference, colorized)
    return metrics


def _means(rows: list[dict]) -> dict:
    names = sorted({name for row in rows for name in row})
    return {"images": len(rows),
            "mean": {name: float(np.mean([row[name] for row in rows if name in row])) for name in names}}


class MetricsAccumulator:
    """Per-image metrics with their label (taxonomy id, or None for an unlabelled frame); `summary()`
    gives the mean of each metric over all images and per label, as a plain dict for JSON."""

    def __init__(self):
        self.rows: dict[int | None, list[dict]] = defaultdict(list)

    def add(self, metrics: dict[str, float], label: int | None = None) -> None:
        self.rows[None if label is None else int(label)].append(dict(metrics))

    def summary(self) -> dict:
        labels = sorted(self.rows, key=lambda label: (label is None, label or 0))  # ids in order, unlabelled last
        return {
            **_means([row for label in labels for row in self.rows[label]]),
            "per_label": {"unlabeled" if label is None else str(label): _means(self.rows[label]) for label in labels},
        }
