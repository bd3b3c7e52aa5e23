"""Two writers on one work directory: the second stops at once, naming the first; readers never wait."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from mhmd_builder.shards import clear_shard_dir
from mhmd_builder.workdir import LOCK, FolderBusy, WorkDir, locked

MHMD = [sys.executable, "-m", "mhmd_builder.cli"]
HOLD = "import sys, time; from mhmd_builder.workdir import locked\nwith locked(sys.argv[1]):\n print('held', flush=True); time.sleep(60)"


@pytest.fixture
def holder(tmp_path):
    work = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield work, proc
    proc.kill()
    proc.wait()


def test_second_writer_fails_fast_naming_the_holder_and_status_still_reads(holder, tmp_path):
    work, proc = holder
    started = time.monotonic()
    second = subprocess.run([*MHMD, "extract", str(tmp_path / "nope.mp4"), "-w", str(work)], capture_output=True,
                            text=True, timeout=60)
    assert second.returncode == 1 and time.monotonic() - started < 30
    assert second.stdout == "" and len(second.stderr.strip().splitlines()) == 1
    assert f"pid {proc.pid}" in second.stderr and str(work) in second.stderr
    status = subprocess.run([*MHMD, "status", "-w", str(work)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0


def test_a_killed_holder_leaves_no_lock(holder):
    work, proc = holder
    with pytest.raises(FolderBusy, match=f"pid {proc.pid}"):
        with locked(work):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with locked(work):
        assert (work / LOCK).exists()


def test_the_same_process_takes_its_own_lock_again(tmp_path):
    with locked(tmp_path), locked(WorkDir(tmp_path).root):
        pass


def test_a_shard_folder_keeps_its_lock_when_cleared(tmp_path):
    out = tmp_path / "shards"
    with locked(out):
        (out / "train-000000.tar").write_bytes(b"")
        clear_shard_dir(out)
        assert [p.name for p in out.iterdir()] == [LOCK]


def test_a_released_lock_leaves_the_folder_as_it_was(tmp_path):
    """Shard folders compare byte for byte between runs: the lock file goes with its holder."""
    out = tmp_path / "shards"
    with locked(out):
        assert [p.name for p in out.iterdir()] == [LOCK]
    assert list(out.iterdir()) == []
    with locked(out):  # and the next writer takes it again
        pass
