import pytest
import torch

from mhmd_builder.historynet.checkpoint import CheckpointError, load_checkpoint, load_generator, save_checkpoint
from mhmd_builder.historynet.model import build_networks

CONFIG = {"variant": "no_parsing", "num_classes": 5, "image_size": 32, "width": 0.25}


def test_a_checkpoint_restores_networks_and_optimisers_exactly(tmp_path):
    torch.manual_seed(0)
    nets = build_networks(**CONFIG)
    optimiser = torch.optim.Adam(nets.generator.parameters(), 1e-3, betas=(0.5, 0.999))
    out = nets.generator(torch.rand(2, 1, 32, 32))
    out.ab.mean().backward()
    optimiser.step()
    path = save_checkpoint(tmp_path / "c.safetensors", nets, CONFIG, {"generator": optimiser}, {"step": 1})
    restored = load_checkpoint(path)
    assert restored.config == CONFIG and restored.progress == {"step": 1}
    for name in ("generator", "critic", "info_classifier"):
        for (k, a), (k2, b) in zip(getattr(nets, name).state_dict().items(),
                                   getattr(restored.networks, name).state_dict().items()):
            assert k == k2 and torch.equal(a, b), (name, k)
    again = torch.optim.Adam(restored.networks.generator.parameters(), 1.0)
    again.load_state_dict(restored.optimizer_states["generator"])
    expected = optimiser.state_dict()
    assert again.state_dict()["param_groups"] == expected["param_groups"]  # lr 1e-3 and betas come back
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(again.state_dict()["state"][index][key], value)
    generator, config = load_generator(path)
    assert not generator.training and config == CONFIG


def test_a_checkpoint_from_before_network_widths_loads_at_the_papers_width(tmp_path):
    config = {key: value for key, value in CONFIG.items() if key != "width"}
    path = save_checkpoint(tmp_path / "old.safetensors", build_networks(**config), config)
    generator, loaded = load_generator(path)
    assert loaded["width"] == 1.0 and generator.g0[0].out_channels == 64


def test_bad_checkpoints_are_refused_with_the_file_name(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    for path, message in [(tmp_path / "missing.safetensors", "no such checkpoint"),
                          (tmp_path / "junk.safetensors", "not a HistoryNet checkpoint")]:
        with pytest.raises(CheckpointError, match=message) as error:
            load_checkpoint(path)
        assert str(path) in str(error.value)
    nets = build_networks(**CONFIG)
    path = save_checkpoint(tmp_path / "c.safetensors", nets, {**CONFIG, "variant": "historynet"})
    with pytest.raises(CheckpointError, match="does not fit variant 'historynet'"):
        load_checkpoint(path)
