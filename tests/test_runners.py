import os
from dataclasses import dataclass, field

from mhmd_builder.runners import LocalRunner, make_runner
from mhmd_builder.stages import Partition, PartitionError, Resources
from mhmd_builder.workdir import WorkDir

import pytest


@dataclass
class CountingStage:
    """Records which process set up and which process ran each partition."""

    workdir: WorkDir
    name: str = "count"
    resources: Resources = field(default_factory=Resources)

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
    if workers > 1:
        assert all(r.summary["pid"] != os.getpid() for r in results.values() if r.ok)


def test_unknown_runner_is_refused():
    with pytest.raises(ValueError, match="unknown runner 'spark'"):
        make_runner("spark")
