"""HistoryNet checkpoints: one safetensors file per checkpoint, written atomically.

Tensors: `generator.*`, `critic.*`, `info_classifier.*`, `generator_ema.*` with train's --ema (the networks'
state dicts) and, for resuming,
`optim.<name>.<param index>.<key>` (each Adam state tensor). Metadata (safetensors' string map, json
values): `config` (variant, num_classes, image_size, label names, taxonomy SHA-256, loss weights, the
run's settings), `progress` (step, epoch, ...) and `param_groups` (the optimisers' hyper-parameters).
No pickle anywhere: a checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..errors import InputError
from ..workdir import atomic_write_bytes
from .model import HistoryNetGenerator, Networks, build_networks

NETWORKS = ("generator", "critic", "info_classifier", "generator_ema")


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names the file."""


@dataclass
class Checkpoint:
    networks: Networks
    config: dict
    progress: dict
    optimizer_states: dict[str, dict]  # name -> an optimiser state_dict, for load_state_dict


def save_checkpoint(path: str | Path, networks: Networks, config: dict,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None, progress: dict | None = None) -> Path:
    path = Path(path)
    tensors = {}
    for name in NETWORKS:
        net = getattr(networks, name)
        if net is not None:
            tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
    groups = {}
    for name, optimizer in (optimizers or {}).items():
        state = optimizer.state_dict()
        groups[name] = state["param_groups"]
        for index, values in state["state"].items():
            for key, value in values.items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optim.{name}.{index}.{key}"] = tensor.detach().cpu().contiguous()
    metadata = {"config": json.dumps(config), "progress": json.dumps(progress or {}), "param_groups": json.dumps(groups)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def _read(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(its tensors, or none without `tensors`; its metadata)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()} if tensors else {}, f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: not a HistoryNet checkpoint ({type(e).__name__}: {e})") from None


def _networks(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Networks:
    networks = build_networks(config["variant"], config["num_classes"], config["image_size"], config["width"])
    if any(k.startswith("generator_ema.") for k in tensors):
        networks.generator_ema = copy.deepcopy(networks.generator)
    for name in NETWORKS:
        net = getattr(networks, name)
        if net is None:
            continue
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: its {name} does not fit variant {config['variant']!r} "
                                  f"({str(e).splitlines()[0]})") from None
    return networks


def _optimizer_states(tensors: dict[str, torch.Tensor], groups: dict) -> dict[str, dict]:
    # json turned Adam's betas tuple into a list
    groups = {name: [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in gs]
              for name, gs in groups.items()}
    states: dict[str, dict] = {name: {"state": {}, "param_groups": g} for name, g in groups.items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, name, index, field = key.split(".", 3)
            states[name]["state"].setdefault(int(index), {})[field] = value
    return states


def read_progress(path: str | Path) -> dict:
    """A checkpoint's progress (step, epoch, validation...) without loading its tensors."""
    _, metadata = _read(Path(path), tensors=False)
    return json.loads(metadata.get("progress", "{}"))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Everything needed to resume training (networks on the CPU)."""
    path = Path(path)
    tensors, metadata = _read(path)
    if "config" not in metadata:
        raise CheckpointError(f"{path}: not a HistoryNet checkpoint (no config in its metadata)")
    config = {"width": 1.0, **json.loads(metadata["config"])}  # checkpoints from before `width` are width 1
    return Checkpoint(_networks(path, tensors, config), config, json.loads(metadata.get("progress", "{}")),
                      _optimizer_states(tensors, json.loads(metadata.get("param_groups", "{}"))))


def load_generator(path: str | Path, device: str = "cpu") -> tuple[HistoryNetGenerator, dict]:
    """The generator that colours (G's moving average when the run kept one), in eval mode on `device`, and
    the run's config."""
    checkpoint = load_checkpoint(path)
    return colouring_generator(checkpoint.networks).to(device).eval(), checkpoint.config


def colouring_generator(networks: Networks) -> HistoryNetGenerator:
    """G's moving average when the run kept one (--ema), else G."""
    return networks.generator_ema if networks.generator_ema is not None else networks.generator
