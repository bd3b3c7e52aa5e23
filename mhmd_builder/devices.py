"""Where work runs: the device a `--device` option names, the decoder `--decoder` names, and torch's
CPU thread count."""
from __future__ import annotations

import os
from contextlib import contextmanager

from .errors import MhmdError


class DeviceError(MhmdError):
    """The device asked for is not on this machine."""


def pick_device(device: str) -> str:
    """`auto`: the first CUDA GPU when there is one, else the CPU; a named device must exist."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return device


def pick_decoder(decoder: str) -> str:
    """`--decoder` as ffmpeg will run it, "cpu" or "cuda": `auto` is cuda when ffmpeg can open a CUDA
    device here, else cpu; `cuda` must be able to (DeviceError in one line naming why not)."""
    from .media import cuda_decoding_problem

    if decoder == "cpu":
        return "cpu"
    problem = cuda_decoding_problem()
    if decoder == "cuda" and problem:
        raise DeviceError(f"--decoder cuda: ffmpeg cannot open a CUDA device on this machine ({problem}): "
                          "use --decoder cpu or auto")
    return "cpu" if problem else "cuda"


def machine_cores() -> int:
    """The cores this process may run on (its affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def fixed_cpu_threads():
    """Torch's CPU results depend on its thread count (work is split per thread), and libraries change
    it (ultralytics sets cores - 1): training and prediction run with one thread per core of the
    machine, so the same inputs give the same checkpoint, labels and shards in any process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(machine_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)
