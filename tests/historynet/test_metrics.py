"""HistoryNet's evaluation metrics against skimage's and lpips' own numbers."""
from __future__ import annotations

import math
from urllib.error import URLError

import lpips
import numpy as np
import pytest
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mhmd_builder.historynet import metrics
from mhmd_builder.historynet.metrics import (LpipsUnavailable, MetricsAccumulator, colorfulness_rgb, image_metrics,
                                             lpips_distance, lpips_model, psnr, ssim)

# lpips builds its AlexNet with torchvision's deprecated `pretrained=` argument.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torchvision.models._utils")


def image_pair(seed: int, size: tuple[int, int] = (64, 80)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth RGB image and a noisy, shifted copy of it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    reference = np.dstack([x * 3, y * 3, (x + y) * 2]).clip(0, 255).astype(np.uint8)
    colorized = (reference + rng.normal(4, 12, reference.shape)).clip(0, 255).astype(np.uint8)
    return reference, colorized


def torch_rgb(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 HxWx3 to 1x3xHxW in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


def random_backbone_lpips(seed: int) -> lpips.LPIPS:
    torch.manual_seed(seed)
    return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()


# -- PSNR, SSIM, colourfulness --------------------------------------------------------------------
def test_psnr_of_a_constant_offset_is_the_hand_computed_value():
    reference = np.full((32, 48, 3), 100, np.uint8)
    assert psnr(reference, reference + 5) == pytest.approx(10 * math.log10(255 ** 2 / 5 ** 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_and_ssim_are_skimages_with_the_official_settings(seed):
    reference, colorized = image_pair(seed)
    assert psnr(reference, colorized) == pytest.approx(peak_signal_noise_ratio(reference, colorized, data_range=255))
    expected = structural_similarity(reference, colorized, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255, channel_axis=-1)
    assert ssim(reference, colorized) == pytest.approx(expected)
    assert ssim(reference, colorized) != pytest.approx(structural_similarity(  # the settings matter
        reference, colorized, data_range=255, channel_axis=-1))
    assert ssim(reference, reference) == pytest.approx(1.0)


def test_colorfulness_reads_rgb():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255  # uniform: only the mean term, 0.3 * hypot(r - g, (r + g) / 2 - b)
    assert colorfulness_rgb(red) == pytest.approx(0.3 * math.hypot(255, 127.5))


# -- LPIPS ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_lpips_distance_is_the_packages_own_on_rgb_in_minus_one_to_one(seed):
    model = random_backbone_lpips(seed)
    reference, colorized = image_pair(seed)
    with torch.no_grad():
        expected = float(model(torch_rgb(reference), torch_rgb(colorized)))
    assert lpips_distance(model, reference, colorized) == pytest.approx(expected, rel=1e-5)
    assert lpips_distance(model, reference, reference) == pytest.approx(0.0, abs=1e-6)


def test_a_local_backbone_file_fills_lpips_alexnet_layers(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    model = lpips_model(path)
    slices = model.net
    for layer, index in [(slices.slice1, 0), (slices.slice2, 3), (slices.slice3, 6), (slices.slice4, 8),
                         (slices.slice5, 10)]:
        assert torch.equal(getattr(layer, str(index)).weight, state[f"features.{index}.weight"])
        assert torch.equal(getattr(layer, str(index)).bias, state[f"features.{index}.bias"])
    # The linear layers are the package's calibrated ones, not random.
    shipped = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    assert torch.equal(model.lin0.model[1].weight, shipped.lin0.model[1].weight)
    assert not model.training


def test_a_missing_or_wrong_backbone_gives_the_reason(tmp_path):
    with pytest.raises(LpipsUnavailable, match=r"^LPIPS cannot be computed: no AlexNet backbone file at .*nope\.pth$"):
        lpips_model(tmp_path / "nope.pth")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(LpipsUnavailable, match="not a torchvision AlexNet state dict"):
        lpips_model(tmp_path / "other.pth")
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / metrics.ALEXNET_FILE)
    with pytest.raises(LpipsUnavailable, match="SHA-256"):
        lpips_model(tmp_path / metrics.ALEXNET_FILE)  # torchvision's name, other bytes


def test_no_download_gives_the_reason(monkeypatch):
    def offline(*_args, **_kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", offline)
    with pytest.raises(LpipsUnavailable, match="LPIPS cannot be computed: torchvision could not get the AlexNet"):
        lpips_model(None)


def test_image_metrics_reports_lpips_only_with_a_model():
    reference, colorized = image_pair(0)
    assert set(image_metrics(reference, colorized)) == {"psnr", "ssim", "colorfulness"}
    with_lpips = image_metrics(reference, colorized, random_backbone_lpips(0))
    assert with_lpips["lpips"] > 0


# -- accumulation ---------------------------------------------------------------------------------
def test_the_accumulator_gives_means_overall_and_per_label():
    accumulator = MetricsAccumulator()
    accumulator.add({"psnr": 30.0, "ssim": 0.9}, label=7)
    accumulator.add({"psnr": 20.0, "ssim": 0.7}, label=2)
    accumulator.add({"psnr": 26.0, "ssim": 0.8}, label=7)
    accumulator.add({"psnr": 10.0, "ssim": 0.5}, label=None)
    summary = accumulator.summary()
    assert summary["images"] == 4
    assert summary["mean"] == pytest.approx({"psnr": 21.5, "ssim": 0.725})
    assert list(summary["per_label"]) == ["2", "7", "unlabeled"]
    assert summary["per_label"]["7"] == {"images": 2, "mean": pytest.approx({"psnr": 28.0, "ssim": 0.85})}
    assert summary["per_label"]["2"] == {"images": 1, "mean": pytest.approx({"psnr": 20.0, "ssim": 0.7})}
    assert summary["per_label"]["unlabeled"]["images"] == 1
