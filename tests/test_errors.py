import errno
import os
import re
import subprocess

import pytest
from click.testing import CliRunner

from mhmd_builder import workdir
from mhmd_builder.cli import main
from mhmd_builder.errors import MAX_LISTED, StorageError, listing, storage_error


def test_os_errors_the_user_can_fix_become_one_line_naming_the_path():
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        error = storage_error(OSError(code, "Reason", "/data/w/extract/parts/m.parquet"))
        assert isinstance(error, StorageError)
        assert str(error) == f"/data/w/extract/parts/m.parquet: {os.strerror(code)}"  # the OS's words, not a library's
    assert str(storage_error(OSError(errno.ENOSPC, "Error writing bytes"), "/data/w")) == "/data/w: No space left on device"
    assert storage_error(OSError(errno.EIO, "I/O error", "/x")) is None  # not the user's to fix: a bug or a broken disk
    assert storage_error(ValueError("x")) is None


def test_problem_listings_are_capped():
    assert listing([f"line {i}" for i in range(MAX_LISTED)]).count("\n") == MAX_LISTED - 1
    capped = listing([f"line {i}" for i in range(MAX_LISTED + 5)]).splitlines()
    assert len(capped) == MAX_LISTED + 1 and capped[-1] == "... and 5 more"


def test_a_full_disk_ends_a_command_with_one_line_and_no_temporary_file(tmp_path, monkeypatch):
    def no_space(where, schema):  # the export writes through a ParquetWriter, a movie at a time
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(workdir.pq, "ParquetWriter", no_space)
    out = tmp_path / "out" / "manifest.parquet"
    (tmp_path / "w").mkdir()  # an empty work directory: its manifest has no rows, but is written
    result = CliRunner().invoke(main, ["manifest", "export", "-w", str(tmp_path / "w"), "-o", str(out)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert result.output == f"Error: {out}: No space left on device\n"
    assert list((tmp_path / "out").iterdir()) == []


def test_a_partition_that_meets_a_full_disk_fails_in_one_line_without_a_traceback(tmp_path):
    from mhmd_builder.stages import Partition, record_failure

    class Stage:
        name, workdir = "extract", workdir.WorkDir(tmp_path)

    result = record_failure(Stage(), Partition("m", record={"path": "m.mp4"}),
                            OSError(errno.ENOSPC, "No space left on device", "/w/frames/m/m_0.jpg"))
    failure = Stage.workdir.failed("extract")["m"]
    assert result.reason == failure["reason"] == "/w/frames/m/m_0.jpg: No space left on device"
    assert "traceback" not in failure and failure["path"] == "m.mp4"


def small_file_system(folder, options: str):
    """Mount a real tmpfs at `folder` with `options`, where root may; skip the test elsewhere."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return folder


@pytest.fixture
def full_disk(tmp_path):
    """A real 256 KiB file system."""
    yield small_file_system(tmp_path / "small", "size=256k")
    subprocess.run(["umount", "-l", str(tmp_path / "small")], check=True)


@pytest.fixture
def read_only(tmp_path):
    """A real read-only file system holding an empty work directory."""
    folder = small_file_system(tmp_path / "ro", "size=1m")
    (folder / "w").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_extract_on_a_full_disk_records_the_movie_failed_in_one_line_and_leaves_no_temporary(full_disk, movie_factory):
    movie = movie_factory("big.mp4", seconds=4, size="640x480")
    work = full_disk / "w"
    result = CliRunner().invoke(main, ["extract", str(movie), "-w", str(work), "--fps", "5", "--workers", "1"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    failures = workdir.WorkDir(work).failed("extract")
    [reason] = [f["reason"] for f in failures.values()]
    assert re.fullmatch(rf"chunk big-\w+@0: {re.escape(str(work))}: No space left on device", reason)
    assert not list(work.rglob(".*.tmp*")) and not any((work / "extract" / "tmp").glob("*/*"))


def test_shard_on_a_full_disk_is_one_line_naming_the_file_and_leaves_no_buckets(tmp_path):
    """The plan's buckets and samples files are written by Arrow, whose errors name no file."""
    from test_shard import many_frames

    work = many_frames(tmp_path / "w", films=3, frames=400)
    small_file_system(work.stage_dir("shard"), "size=8k")  # the plan's folder, full after two pages
    try:
        result = CliRunner().invoke(main, ["shard", "-w", str(work.root), "-o", str(tmp_path / "out")])
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1 and result.output.endswith(": No space left on device\n"), result.output
        assert f"{work.stage_dir('shard')}/shuffle/" in result.output and "a file" not in result.output
        assert not (work.stage_dir("shard") / "shuffle").exists() and not (tmp_path / "out" / "index.json").exists()
    finally:
        subprocess.run(["umount", "-l", str(work.stage_dir("shard"))], check=True)


def test_extract_into_a_read_only_work_directory_is_one_line(read_only, movie_factory):
    movie = movie_factory("film.mp4", seconds=1)
    result = CliRunner().invoke(main, ["extract", str(movie), "-w", str(read_only / "w"), "--workers", "1"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.endswith(": Read-only file system\n"), result.output
    assert str(read_only / "w") in result.output
