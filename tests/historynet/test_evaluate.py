"""`evaluate` against the official protocol rebuilt here independently (cv2 + skimage + lpips), on
small test shards and a random-weight checkpoint."""
from __future__ import annotations

from collections import Counter
from urllib.error import URLError

import cv2
import lpips
import numpy as np
import pytest
import torch
import torchvision
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_colorize import IMAGE_SIZE, make_checkpoint
from test_data import PER_SHARD, decoded, make_sample, write_shards

from mhmd_builder.historynet.checkpoint import load_generator
from mhmd_builder.historynet.evaluate import evaluate, format_evaluation
from mhmd_builder.historynet.metrics import colorfulness_rgb, lpips_model

SAMPLES = 3 * PER_SHARD


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On a shared 2-core machine torch's second OpenMP thread waits for a busy core: LPIPS on these 12
    frames took 8 s with 2 threads and 0.7 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three test shards: (folder, samples in shard order)."""
    folder = tmp_path_factory.mktemp("shards")
    samples = [make_sample(i) for i in range(SAMPLES)]
    write_shards(folder, samples, split="test")
    return folder, samples


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "g.safetensors")


@pytest.fixture(scope="module")
def random_alexnet(tmp_path_factory):
    """A torchvision AlexNet state dict with random weights, as an offline LPIPS backbone."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("alexnet") / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def official_colorization(checkpoint, samples: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(original RGB, colorized RGB) per sample, as the official scripts make them: ab predicted from
    L at the model's size, rounded to 8 bits, resized bilinearly to the frame, joined with its L."""
    generator, _ = load_generator(checkpoint)
    frames = [decoded(sample["jpg"]) for sample in samples]
    small = [cv2.resize(bgr, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA) for bgr in frames]
    lightness = np.stack([cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)[..., 0] for bgr in small])[:, None]
    with torch.no_grad():  # one batch of all the samples, as evaluate makes it with batch_size=SAMPLES
        ab = generator(torch.from_numpy(lightness.astype(np.float32) / 255)).ab.numpy()
    pairs = []
    for bgr, ab_one in zip(frames, ab):
        height, width = bgr.shape[:2]
        ab8 = np.clip(np.rint(ab_one * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        ab_full = cv2.resize(ab8, (width, height), interpolation=cv2.INTER_LINEAR)
        lab = np.dstack([cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)[..., 0], ab_full])
        pairs.append((bgr[..., ::-1], cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)))
    return pairs


def label_counts(samples: list[dict]) -> dict[str, int]:
    counts = Counter(sample["cls"].decode() if "cls" in sample else "unlabeled" for sample in samples)
    return dict(counts)


def assert_means_of_rows(result: dict) -> None:
    """Overall and per-label means are the means of the per-image values."""
    rows = result["per_image"]
    for name, value in result["mean"].items():
        assert value == pytest.approx(np.mean([row[name] for row in rows]))
    for label, entry in result["per_label"].items():
        mine = [row for row in rows if str(row["label"]) == label or (label == "unlabeled" and row["label"] is None)]
        assert entry["images"] == len(mine)
        for name, value in entry["mean"].items():
            assert value == pytest.approx(np.mean([row[name] for row in mine]))


def test_evaluate_is_the_official_protocol_image_by_image(shards, checkpoint, random_alexnet):
    folder, samples = shards
    result = evaluate(folder, checkpoint, device="cpu", batch_size=SAMPLES, workers=0,
                      lpips_backbone=random_alexnet, per_image=True)
    assert result["images"] == SAMPLES and result["lpips_unavailable"] is None
    assert [row["key"] for row in result["per_image"]] == [s["__key__"] for s in samples]
    net = lpips_model(random_alexnet)
    for row, (original, colorized) in zip(result["per_image"], official_colorization(checkpoint, samples)):
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(original, colorized, data_range=255))
        assert row["ssim"] == pytest.approx(structural_similarity(
            original, colorized, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
            channel_axis=-1))
        with torch.no_grad():
            expected_lpips = float(net(lpips.im2tensor(original), lpips.im2tensor(colorized)))
        assert row["lpips"] == pytest.approx(expected_lpips, rel=1e-5) and row["lpips"] > 0
        assert row["colorfulness"] == pytest.approx(colorfulness_rgb(colorized))
        assert row["colorfulness_original"] == pytest.approx(colorfulness_rgb(np.ascontiguousarray(original)))
    assert set(result["mean"]) == {"psnr", "ssim", "lpips", "colorfulness", "colorfulness_original"}
    assert_means_of_rows(result)
    assert {label: entry["images"] for label, entry in result["per_label"].items()} == label_counts(samples)
    assert result["per_label"]["3"]["name"] == "label_3" and result["per_label"]["unlabeled"]["name"] is None


def test_without_lpips_the_reason_is_given_and_psnr_ssim_are_computed(shards, checkpoint, tmp_path, monkeypatch,
                                                                      capsys):
    def offline(*_args, **_kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no cached AlexNet: torchvision downloads...
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # ...and cannot
    folder, samples = shards
    result = evaluate(folder, checkpoint, device="cpu", batch_size=5, workers=2)
    assert result["lpips_unavailable"].startswith("LPIPS cannot be computed: torchvision could not get the AlexNet")
    assert capsys.readouterr().out == ""  # torch.hub's "Downloading: ..." went to stderr, away from --json
    assert set(result["mean"]) == {"psnr", "ssim", "colorfulness", "colorfulness_original"}
    assert 0 < result["mean"]["ssim"] < 1 and result["mean"]["psnr"] > 10
    assert result["images"] == SAMPLES  # every sample once across the two workers
    assert {label: entry["images"] for label, entry in result["per_label"].items()} == label_counts(samples)
    assert result["settings"] == {"device": "cpu", "batch_size": 5, "workers": 2, "limit": None,
                                  "lpips_backbone": None, "metric_threads": result["settings"]["metric_threads"]}
    assert result["images_per_second"] > 0

    table = format_evaluation(result)
    assert f"no LPIPS: {result['lpips_unavailable']}" in table
    all_row = next(line for line in table.splitlines() if line.startswith("all "))
    assert all_row.split()[1:5] == [str(SAMPLES), "-", f"{result['mean']['psnr']:.3f}", f"{result['mean']['ssim']:.4f}"]
    assert any(line.startswith("3 label_3 ") for line in table.splitlines())


def test_limit_evaluates_the_first_samples_only(shards, checkpoint, random_alexnet):
    folder, samples = shards
    result = evaluate(folder, checkpoint, device="cpu", batch_size=4, workers=2, lpips_backbone=random_alexnet,
                      limit=5, per_image=True)
    # two workers: the first batch of worker 0 (shard 0), then the first of worker 1 (shard 1), cut at 5
    assert [row["key"] for row in result["per_image"]] == [s["__key__"] for s in samples[:5]]
    assert result["images"] == 5 and result["settings"]["limit"] == 5
    assert {label: entry["images"] for label, entry in result["per_label"].items()} == label_counts(samples[:5])
    assert_means_of_rows(result)


def test_a_split_without_shards_is_named(shards, checkpoint):
    folder, _ = shards
    with pytest.raises(FileNotFoundError, match=r"no shards match .*train-\*\.tar"):
        evaluate(folder, checkpoint, device="cpu", split="train")
