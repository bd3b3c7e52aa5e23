"""`historynet train` options checked before any step: where G0's VGG-16 weights come from, and the
precision the steps run in (a real step on the CPU for each precision allowed there)."""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from click.testing import CliRunner
from test_data import make_sample, write_shards

from mhmd_builder.cli import main
from mhmd_builder.historynet.checkpoint import load_checkpoint
from mhmd_builder.historynet.model import build_networks
from mhmd_builder.historynet.train import TrainSettings, default_precision, load_backbone, train
from mhmd_builder.weights import WeightsError

SMALL = ["--image-size", "32", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--epoch-samples", "2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, [make_sample(i) for i in range(4)])
    return folder


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No cached weights, and torch.hub's download fails as it does without a network."""
    def unreachable(*_args, **_kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)


def test_imagenet_vgg_weights_that_cannot_be_had_stop_training_in_one_line(shards, tmp_path, offline):
    with pytest.raises(WeightsError) as error:
        load_backbone(build_networks("chromagan", 5, 32), "imagenet")
    message = str(error.value)
    assert "\n" not in message and message.startswith("--vgg-weights imagenet: cannot get torchvision's ImageNet")
    assert "URLError" in message and "vgg16-397923af.pth with --vgg-weights PATH" in message
    assert message.endswith("--vgg-weights none")

    result = CliRunner().invoke(main, ["historynet", "train", "--shards", str(shards), "-o", str(tmp_path / "run"),
                                       "--steps", "1", "--vgg-weights", "imagenet", *SMALL])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {message}\n"
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


# -- precision -------------------------------------------------------------------------------------
def one_step(shards: Path, rundir: Path, **options) -> tuple[dict, dict]:
    """One logged training step on the CPU: (its checkpoint's config, its logged terms)."""
    settings = TrainSettings(shards=str(shards), out=str(rundir), steps=1, epoch_samples=2, log_every=1,
                             image_size=32, width=0.25, batch_size=2, device="cpu", workers=0, vgg_weights="none",
                             val_images=0, **options)
    summary = train(settings)
    return load_checkpoint(rundir / "last.safetensors").config, summary["terms"]


def test_fp32_and_bf16_each_train_a_step_on_the_cpu_and_are_recorded(shards, tmp_path):
    config, fp32 = one_step(shards, tmp_path / "fp32", precision="fp32")
    assert config["precision"] == "fp32" and config["settings"]["precision"] == "fp32"
    config, bf16 = one_step(shards, tmp_path / "bf16", precision="bf16")
    assert config["precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(list(terms.values()))).all() for terms in (fp32, bf16))
    # the same step, seed and batch: only the precision differs, and shows in every loss
    assert fp32.keys() == bf16.keys() and fp32["generator/l2_ab"] != bf16["generator/l2_ab"]
    assert fp32["critic/total"] != bf16["critic/total"]
    config, default = one_step(shards, tmp_path / "default")
    assert config["precision"] == "fp32" and config["settings"]["precision"] is None and default == fp32


def test_fp16_on_the_cpu_is_refused_in_one_line(shards, tmp_path):
    result = CliRunner().invoke(main, ["historynet", "train", "--shards", str(shards), "-o", str(tmp_path / "run"),
                                       "--steps", "1", "--vgg-weights", "none", "--precision", "fp16", *SMALL])
    assert result.exit_code == 1 and result.stderr == (
        "Error: --precision fp16 needs a CUDA device (float16 with loss scaling): on the CPU use --precision bf16 "
        "or fp32\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("preset", "device", "bf16_gpu", "expected"), [
    ("official", "cuda", True, "fp32"),  # the official code trains in float32
    ("paper", "cpu", True, "fp32"),
    ("paper", "cuda:1", True, "bf16"),
    ("paper", "cuda", False, "fp16"),
])
def test_the_default_precision_follows_the_preset_and_the_device(monkeypatch, preset, device, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_gpu)
    assert default_precision(preset, device) == expected
