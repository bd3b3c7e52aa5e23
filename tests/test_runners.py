import inspect
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mhmd_builder import logs
from mhmd_builder.runners import LocalRunner, ProgressDisplay, RayRunner, make_runner
from mhmd_builder.stages import Partition, PartitionError, PartitionResult, Resources
from mhmd_builder.workdir import WorkDir

import pytest


@dataclass
class CountingStage:
    """Records which process set up and which process ran each partition."""

    workdir: WorkDir
    name: str = "count"
    resources: Resources = field(default_factory=Resources)
    unit: str = "steps"

    def setup(self) -> None:
        self.setup_pid = os.getpid()
        with open(self.workdir.root / f"setup-{os.getpid()}", "a") as f:
            f.write("x")

    def process(self, partition: Partition, progress) -> dict:
        if partition.info.get("bad"):
            raise PartitionError(f"{partition.id} is bad")
        if partition.info.get("bug"):
            raise KeyError("missing")
        progress(1, 2)
        summary = {"pid": os.getpid(), "setup_pid": self.setup_pid}
        self.workdir.begin(self.name, partition.id)
        self.workdir.commit(self.name, partition.id, __import__("pyarrow").table({"x": [1]}), summary)
        progress(2, 2)
        return summary


@pytest.mark.parametrize("workers", [1, 2])
def test_runner_sets_up_once_per_worker_and_records_failures(tmp_path, workers):
    wd = WorkDir(tmp_path)
    parts = [Partition(f"p{i}") for i in range(5)] + [Partition("bad", {"bad": True}), Partition("bug", {"bug": True})]
    results = {r.id: r for r in LocalRunner(workers).run(CountingStage(wd), parts)}
    assert {pid for pid, r in results.items() if r.ok} == {f"p{i}" for i in range(5)}
    assert results["bad"].reason == "bad is bad"
    assert results["bug"].reason == "KeyError: 'missing'"
    assert set(wd.failed("count")) == {"bad", "bug"} and "Traceback" in wd.failed("count")["bug"]["traceback"]
    setups = {int(p.name.split("-")[1]) for p in tmp_path.glob("setup-*")}
    workers_used = {r.summary["pid"] for r in results.values() if r.ok}
    assert setups == workers_used and len(setups) <= workers
    assert all(p.read_text() == "x" for p in tmp_path.glob("setup-*"))  # each process set up exactly once
    assert all(r.summary["pid"] == r.summary["setup_pid"] for r in results.values() if r.ok)
    # One worker runs them in this process; more run them in worker processes.
    assert all((r.summary["pid"] == os.getpid()) == (workers == 1) for r in results.values() if r.ok)


@dataclass
class BrokenSetupStage(CountingStage):
    """Its model cannot load."""

    def setup(self) -> None:
        raise OSError("no weights here")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_setup_failure_fails_the_partitions_with_its_reason_inline_and_in_the_pool(tmp_path, workers):
    wd = WorkDir(tmp_path)
    results = LocalRunner(workers).run(BrokenSetupStage(wd), [Partition("a"), Partition("b")])
    assert sorted(r.id for r in results if not r.ok) == ["a", "b"]
    assert {r.reason for r in results} == {"OSError: no weights here"}
    assert set(wd.failed("count")) == {"a", "b"}


def test_the_stage_declares_the_local_worker_count_and_the_user_overrides_it(tmp_path):
    stage = CountingStage(WorkDir(tmp_path))
    assert LocalRunner().worker_count(stage) == len(os.sched_getaffinity(0))
    stage.resources = Resources(local_workers=1)  # a stage whose worker holds a model
    assert LocalRunner().worker_count(stage) == 1
    assert LocalRunner(3).worker_count(stage) == 3


def test_a_failure_record_names_the_partition_by_its_record_not_its_whole_input(tmp_path):
    wd = WorkDir(tmp_path)
    listing = [{"frame": i} for i in range(1000)]
    LocalRunner(1).run(CountingStage(wd), [Partition("m", {"bad": True, "frames": listing}, record={"path": "m.mp4"})])
    failure = wd.failed("count")["m"]
    assert failure["path"] == "m.mp4" and failure["reason"] == "m is bad"
    assert "frames" not in failure and "bad" not in failure


def test_progress_bars_count_in_the_stage_unit(tmp_path, monkeypatch):
    from mhmd_builder import runners

    units = []
    real = runners.tqdm

    def spy(*args, **kwargs):
        units.append(kwargs.get("unit"))
        return real(*args, **kwargs)

    monkeypatch.setattr(runners, "tqdm", spy)
    LocalRunner(1).run(CountingStage(WorkDir(tmp_path)), [Partition("p")])
    assert units == ["part", "steps"]


def test_unknown_runner_is_refused():
    with pytest.raises(ValueError, match="unknown runner 'spark'"):
        make_runner("spark")


@dataclass
class DyingStage:
    """Its worker process dies (os._exit) on partitions marked "die": on every attempt, or only on
    the first one (a marker file remembers it). Every attempt leaves a line in `attempts-<id>`."""

    workdir: WorkDir
    name: str = "dying"
    resources: Resources = field(default_factory=Resources)
    unit: str = "steps"

    def setup(self) -> None:
        pass

    def process(self, partition: Partition, progress) -> dict:
        with open(self.workdir.root / f"attempts-{partition.id}", "a") as f:
            f.write(f"{os.getpid()}\n")
        died_before = self.workdir.root / f"died-{partition.id}"
        if partition.info.get("die") == "always" or (partition.info.get("die") == "once" and not died_before.exists()):
            died_before.touch()
            os._exit(1)
        self.workdir.begin(self.name, partition.id)
        self.workdir.commit(self.name, partition.id, __import__("pyarrow").table({"x": [1]}), {"pid": os.getpid()})
        return {"pid": os.getpid()}


def test_a_local_worker_process_that_dies_fails_its_partitions(tmp_path):
    wd = WorkDir(tmp_path)
    results = LocalRunner(2).run(DyingStage(wd), [Partition("a", {"die": "always"}), Partition("b", {"die": "always"})])
    assert sorted(r.id for r in results) == ["a", "b"] and not any(r.ok for r in results)
    assert all(r.reason.startswith("worker process died: ") for r in results)
    assert {p: f["reason"] for p, f in wd.failed("dying").items()} == {r.id: r.reason for r in results}
    assert wd.done("dying") == {}


def test_ray_runner_sets_up_once_per_actor_and_records_failures(ray_cluster, tmp_path):
    wd = WorkDir(tmp_path)
    parts = [Partition(f"p{i}") for i in range(5)] + [Partition("bad", {"bad": True}), Partition("bug", {"bug": True})]
    results = {r.id: r for r in RayRunner(workers=2).run(CountingStage(wd), parts)}
    assert {pid for pid, r in results.items() if r.ok} == {f"p{i}" for i in range(5)}
    assert set(wd.done("count")) == {f"p{i}" for i in range(5)}
    assert results["bad"].reason == "bad is bad"
    assert results["bug"].reason == "KeyError: 'missing'"
    assert set(wd.failed("count")) == {"bad", "bug"} and "Traceback" in wd.failed("count")["bug"]["traceback"]
    setups = {int(p.name.split("-")[1]) for p in tmp_path.glob("setup-*")}
    actors = {r.summary["pid"] for r in results.values() if r.ok}
    assert setups == actors and len(setups) <= 2 and os.getpid() not in actors
    assert all(p.read_text() == "x" for p in tmp_path.glob("setup-*"))  # each actor set up exactly once
    assert all(r.summary["pid"] == r.summary["setup_pid"] for r in results.values() if r.ok)
    assert not list((tmp_path / "count" / "progress").glob("*.json"))  # progress cleared when done


def test_ray_runner_retries_a_partition_whose_worker_died(ray_cluster, tmp_path):
    wd = WorkDir(tmp_path)
    parts = [Partition("once", {"die": "once"}), Partition("always", {"die": "always"}), Partition("fine")]
    results = {r.id: r for r in RayRunner(workers=2, retries=1).run(DyingStage(wd), parts)}
    attempts = {p.id: (tmp_path / f"attempts-{p.id}").read_text().split() for p in parts}
    assert results["once"].ok and results["fine"].ok
    assert len(attempts["once"]) == 2 and len(set(attempts["once"])) == 2  # retried in another process
    assert len(attempts["always"]) == 2 and not results["always"].ok  # one retry, then recorded failed
    assert results["always"].reason.startswith("worker process died (2 attempts): ")
    assert set(wd.failed("dying")) == {"always"} and set(wd.done("dying")) == {"once", "fine"}
    assert wd.failed("dying")["always"]["reason"] == results["always"].reason


def _refuse_to_load():
    raise RuntimeError("cannot load here")


class Unloadable:
    """Pickles fine, but cannot be unpickled: as a stage whose code a node lacks."""

    def __reduce__(self):
        return _refuse_to_load, ()


def test_ray_runner_records_every_partition_when_no_actor_can_start(ray_cluster, tmp_path):
    stage = CountingStage(WorkDir(tmp_path))
    stage.unloadable = Unloadable()
    results = RayRunner(workers=2).run(stage, [Partition(f"p{i}") for i in range(4)])
    assert sorted(r.id for r in results) == ["p0", "p1", "p2", "p3"]
    assert {r.reason for r in results} == {"worker could not start: RuntimeError: cannot load here"}
    assert set(WorkDir(tmp_path).failed("count")) == {"p0", "p1", "p2", "p3"}


def test_ray_runner_sizes_its_pool_from_the_cluster(ray_cluster, tmp_path):
    def actors(runner: RayRunner, **resources) -> int:
        return runner.worker_count(CountingStage(WorkDir(tmp_path), resources=Resources(**resources)))

    assert actors(RayRunner()) == 2 and actors(RayRunner(), cpus=0.5) == 4
    assert actors(RayRunner(workers=1)) == 1
    assert actors(RayRunner(workers=5)) == 2  # never more than the 2 CPUs hold
    assert actors(RayRunner(), gpus=1) == 1  # no GPU yet: one actor waits for one (an autoscaler adds it)


def test_a_model_stage_asks_for_a_gpu_only_when_its_model_runs_on_cuda():
    assert Resources.for_model_on("cuda:0") == Resources(cpus=1, gpus=1, local_workers=1)
    assert Resources.for_model_on("cpu") == Resources(cpus=1, gpus=0, local_workers=1)


def test_ray_retries_as_many_times_as_the_readme_says():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    retries = re.search(r"runs again on a\s+fresh actor, up to (\d+) more times", readme)
    assert retries, "README no longer states the Ray retry count"
    assert inspect.signature(RayRunner).parameters["retries"].default == int(retries.group(1))


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mhmd_builder.runners" and "partitions" in r.getMessage()]


def test_off_a_terminal_progress_comes_as_plain_lines(tmp_path, caplog):
    caplog.set_level("INFO", logger="mhmd_builder")
    parts = [Partition("p0"), Partition("bad", {"bad": True}), Partition("p1")]
    LocalRunner(1).run(CountingStage(WorkDir(tmp_path)), parts)  # pytest's stderr is no terminal
    # At the end only: the default interval (30 s) is far longer than this run.
    assert progress_lines(caplog) == ["count: 3/3 partitions, 1 failed"]
    caplog.clear()
    display = ProgressDisplay("count", 3, every=0.0)  # a line at every report
    display.update("p0", 1, 2)
    display.finish(PartitionResult("p0", False, "broken", {}))
    display.close()
    assert progress_lines(caplog) == ["count: 0/3 partitions, 0 failed", "count: 1/3 partitions, 1 failed",
                                      "count: 1/3 partitions, 1 failed"]


def test_on_a_terminal_the_bars_stay_and_no_plain_line_is_written(tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO", logger="mhmd_builder")
    master, terminal = os.openpty()
    with open(master, "rb", buffering=0), open(terminal, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        LocalRunner(1).run(CountingStage(WorkDir(tmp_path)), [Partition("p0")])
    assert progress_lines(caplog) == []


def test_q_turns_the_bars_off_even_on_a_terminal(monkeypatch):
    master, terminal = os.openpty()
    with open(master, "rb", buffering=0), open(terminal, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        assert not ProgressDisplay("count", 1).overall.disable
        logs.show_notices(logging.ERROR)  # what `mhmd -q` does
        try:
            assert ProgressDisplay("count", 1).overall.disable is True
        finally:
            logs.finish(0)
