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
from mhmd_builder.historynet.model import build_networks
from mhmd_builder.historynet.train import load_backbone
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
