"""What every stage shares: partitions, the stage protocol, and running one partition safely.

A stage says *what* is done to a partition; a runner (runners.py) decides *where* it runs. Stage
code never sees the runner: it gets a partition and a progress callback and returns a summary.
"""
from __future__ import annotations

import hashlib
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .errors import MhmdError, StorageError, storage_error
from .workdir import WorkDir

Progress = Callable[[float, float], None]
"""progress(done, total) in the stage's own unit (`Stage.unit`: seconds of film, frames, samples)."""


class PartitionError(MhmdError):
    """An expected failure of one partition (bad input); the message is one line."""


@dataclass(frozen=True)
class Partition:
    """One unit of a stage's work. `info` is the stage's own input for it, read by that stage only;
    `record` is the little that names it in the work directory (a movie's path, a tar's split),
    written into its failure record beside the reason."""

    id: str
    info: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Resources:
    """How a stage's partitions run: declared by the stage, honoured by both runners."""

    cpus: float = 1.0  # per worker; Ray places actors by it
    gpus: float = 0.0
    # The local runner's worker count when the user gives none: None is one per core; a stage whose
    # worker holds a model that already uses every core says 1.
    local_workers: int | None = None
    # How local worker processes start: spawn, since the parent has threads (progress) and later
    # stages hold CUDA state; fork only for stages that do plain file work with what the parent imported.
    start_method: str = "spawn"

    @classmethod
    def for_model_on(cls, device: str) -> "Resources":
        """One worker with a CPU, and a GPU when the model runs on CUDA (`device` as resolved by
        devices.pick_device)."""
        return cls(cpus=1, gpus=1 if device.startswith("cuda") else 0, local_workers=1)


@dataclass
class PartitionResult:
    id: str
    ok: bool
    reason: str | None
    summary: dict


class Stage(Protocol):
    name: str
    workdir: WorkDir
    resources: Resources
    unit: str  # what progress(done, total) counts: "s" of film, "frames", "samples"

    def setup(self) -> None:
        """Load what is expensive (models) once per worker, before any partition."""

    def process(self, partition: Partition, progress: Progress) -> dict:
        """Do the work, commit it to the work directory, return the summary written in the
        done marker. Raise PartitionError for bad input."""


def inputs_digest(frame_ids: list[str]) -> str:
    """Identifies the frames a partition was given: when quality decisions change, it changes."""
    return hashlib.sha256("\n".join(sorted(frame_ids)).encode()).hexdigest()[:16]


def run_partition(stage: Stage, partition: Partition, progress: Progress) -> PartitionResult:
    """Run one partition; any failure is recorded in the work directory and returned, never raised,
    so that one bad movie does not stop the others."""
    started = time.monotonic()
    try:
        summary = stage.process(partition, progress)
        return PartitionResult(partition.id, True, None, summary)
    except Exception as e:  # noqa: BLE001 - every failure becomes a record, with its reason
        return record_failure(stage, partition, e, time.monotonic() - started)


def record_failure(stage: Stage, partition: Partition, error: Exception, seconds: float = 0.0) -> PartitionResult:
    """Mark the partition failed with a one-line reason (and the traceback of unexpected errors)."""
    error = storage_error(error, stage.workdir.root) or error
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    info = {**partition.record, "seconds": round(seconds, 3)}
    if not isinstance(error, (PartitionError, StorageError)):
        reason = f"{type(error).__name__}: {reason}"
        info["traceback"] = "".join(traceback.format_exception(error))
    info["reason"] = reason
    stage.workdir.mark_failed(stage.name, partition.id, info)
    return PartitionResult(partition.id, False, reason, info)
