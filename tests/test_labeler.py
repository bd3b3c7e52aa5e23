"""The ResNet labeler's model: architectures, initial weights and checkpoints."""
import pytest
import torch

from mhmd_builder.labeler import build_model, initial_weights, load_checkpoint, save_checkpoint
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.weights import WeightsError

TAXONOMY = load_taxonomy()


def test_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", len(TAXONOMY)).eval()
    save_checkpoint(model, {"arch": "resnet18", "image_size": 64, "taxonomy_sha256": TAXONOMY.sha256,
                            "label_names": TAXONOMY.names}, tmp_path / "m.safetensors")
    loaded, config = load_checkpoint(tmp_path / "m.safetensors", TAXONOMY)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert config["image_size"] == 64


def test_weights_offline_pinned_and_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert initial_weights("resnet18", "imagenet")[0] is None
    assert "random initialisation" in capsys.readouterr().out
    fake = tmp_path / "resnet18-f37072fd.pth"
    fake.write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match="does not match the published"):
        initial_weights("resnet18", str(fake))
    local = tmp_path / "my_resnet18.pth"
    torch.save(build_model("resnet18", 5).state_dict(), local)
    state, source = initial_weights("resnet18", str(local))
    assert source == str(local) and not any(k.startswith("fc.") for k in state)
    assert initial_weights("resnet18", "none") == (None, "random (--weights none)")
