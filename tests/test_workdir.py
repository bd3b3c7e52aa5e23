import errno

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mhmd_builder import workdir
from mhmd_builder.errors import DamagedFileError
from mhmd_builder.workdir import WorkDir, atomic_table_writer, atomic_write_bytes, atomic_write_table


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a" / "b.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]


def test_partition_is_done_only_after_commit(tmp_path):
    wd = WorkDir(tmp_path)
    staging = wd.begin("extract", "m1")
    (staging / "half-written.jpg").write_bytes(b"x")
    assert not wd.is_done("extract", "m1") and wd.read_table("extract") is None
    wd.commit("extract", "m1", pa.table({"frame_id": ["m1_0"]}), {"frames_in": 1})
    assert wd.is_done("extract", "m1") and wd.done("extract") == {"m1": {"frames_in": 1}}
    assert not staging.exists()
    assert wd.read_table("extract").frame_id.tolist() == ["m1_0"]


def test_restart_clears_a_failed_or_killed_attempt(tmp_path):
    wd = WorkDir(tmp_path)
    staging = wd.begin("extract", "m1")
    (staging / "left-over.jpg").write_bytes(b"x")
    wd.mark_failed("extract", "m1", {"reason": "boom"})
    assert wd.failed("extract") == {"m1": {"reason": "boom"}}
    staging = wd.begin("extract", "m1")
    assert wd.failed("extract") == {} and list(staging.iterdir()) == []


def test_restart_removes_the_temporary_files_a_killed_write_left(tmp_path):
    """A kill between a table's or marker's write and its rename leaves `.<name>.tmp<pid>` beside it:
    the partition's next start removes its own, not those of a partition whose name it begins."""
    wd = WorkDir(tmp_path)
    parts = wd.parts_dir("extract")
    parts.mkdir(parents=True)
    others = [parts / ".m10.parquet.tmp4242", parts / ".m1.done"]
    for path in [*(parts / f".m1.{kind}.tmp4242" for kind in ("parquet", "done", "failed")), *others]:
        path.write_bytes(b"partial")
    wd.begin("extract", "m1")
    assert sorted(parts.iterdir()) == sorted(others)


def test_read_table_unifies_partitions_with_different_columns(tmp_path):
    wd = WorkDir(tmp_path)
    for pid, table in [("a", pa.table({"x": [1]})), ("b", pa.table({"x": [2], "y": [0.5]}))]:
        wd.begin("s", pid)
        wd.commit("s", pid, table, {})
    frame = wd.read_table("s")
    assert frame.x.tolist() == [1, 2] and frame.y.isna().tolist() == [True, False]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]) if args else None)


@pytest.mark.parametrize("failure", ["disk full", "Ctrl-C"])
def test_a_write_that_fails_leaves_neither_a_partial_file_nor_its_temporary(tmp_path, monkeypatch, failure):
    target = tmp_path / "a" / "b.bin"
    atomic_write_bytes(target, b"one")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(workdir.os, "fsync", no_space if failure == "disk full" else interrupted)
    with pytest.raises(OSError if failure == "disk full" else KeyboardInterrupt):
        atomic_write_bytes(target, b"two")
    monkeypatch.setattr(workdir.pq, "write_table", no_space)
    with pytest.raises(OSError):
        atomic_write_table(tmp_path / "a" / "t.parquet", pa.table({"x": [1]}))
    assert target.read_bytes() == b"one" and [p.name for p in target.parent.iterdir()] == ["b.bin"]


def test_a_table_written_in_pieces_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "t.parquet"
    with atomic_table_writer(target, pa.schema([("x", pa.int64())])) as writer:
        writer.write_table(pa.table({"x": [1, 2]}))
        writer.write_table(pa.table({"x": [3]}))
        assert not target.exists()  # renamed into place at the end only
    assert pq.read_table(target)["x"].to_pylist() == [1, 2, 3]
    with pytest.raises(KeyboardInterrupt), atomic_table_writer(target, pa.schema([("x", pa.int64())])) as writer:
        writer.write_table(pa.table({"x": [4]}))
        raise KeyboardInterrupt
    assert pq.read_table(target)["x"].to_pylist() == [1, 2, 3] and [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_a_failed_partition_frees_its_staging_before_writing_its_record(tmp_path, monkeypatch):
    wd = WorkDir(tmp_path)
    staging = wd.begin("extract", "m1")
    (staging / "big.jpg").write_bytes(b"x" * 1000)
    seen = []
    real = workdir.atomic_write_json
    monkeypatch.setattr(workdir, "atomic_write_json", lambda path, obj: seen.append(staging.exists()) or real(path, obj))
    wd.mark_failed("extract", "m1", {"reason": "disk full"})
    assert seen == [False] and wd.failed("extract")["m1"]["reason"] == "disk full"


def test_a_damaged_marker_or_plan_counts_as_not_done_and_is_named(tmp_path):
    wd = WorkDir(tmp_path)
    for pid in ("a", "b", "c"):
        wd.plan("s", pid, {})
        wd.begin("s", pid)
        wd.commit("s", pid, pa.table({"x": [1]}), {})
    (wd.parts_dir("s") / "a.done").write_text("{garbage")
    (wd.parts_dir("s") / "b.done").write_text("[1, 2]")  # json, but not an object
    wd.mark_failed("s", "z", {"reason": "boom"})
    (wd.parts_dir("s") / "z.failed").write_bytes(b"\xff\x00")
    (wd.stage_dir("s") / "plan" / "c.json").write_text("")
    assert list(wd.done("s")) == ["c"] and wd.failed("s") == {} and list(wd.planned("s")) == ["a", "b"]
    assert wd.damaged("s") == [f"damaged record {wd.parts_dir('s') / name}: redone on the next run"
                               for name in ("a.done", "b.done", "z.failed")] + [
        f"damaged record {wd.stage_dir('s') / 'plan' / 'c.json'}: redone on the next run"]
    assert [pid for pid in ("a", "b", "c") if wd.is_done("s", pid)] == ["c"]  # as done() says
    # Reading the stage's tables stops at the first damaged marker: its rows would go missing.
    with pytest.raises(DamagedFileError) as error:
        wd.read_table("s")
    assert str(error.value) == f"{wd.parts_dir('s') / 'a.done'}: damaged record (not a json object): run `mhmd s` again to redo it"
    damaged = []
    assert wd.read_table("s", damaged).x.tolist() == [1]
    assert damaged == [f"{wd.parts_dir('s') / name}: damaged record (not a json object): run `mhmd s` again to redo it"
                       for name in ("a.done", "b.done")]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_table_is_named_by_its_reader_and_not_done_for_its_stage(tmp_path, damage):
    wd = WorkDir(tmp_path)
    for pid in ("a", "m"):
        wd.begin("label", pid)
        wd.commit("label", pid, pa.table({"x": list(range(1000))}), {"frames_in": 1000})
    table = wd.table_path("label", "m")
    if damage == "truncated":
        table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    else:
        table.unlink()
    problem = "damaged (cut short or not a Parquet file)" if damage == "truncated" else "missing"
    assert list(wd.done("label")) == ["a"] and wd.is_done("label", "a") and not wd.is_done("label", "m")
    assert wd.damaged("label") == [f"{table}: {problem}: redone on the next run"]
    with pytest.raises(DamagedFileError) as error:
        wd.read_table("label")
    assert str(error.value) == f"{table}: {problem}: run `mhmd labeler predict` again to redo it"


@pytest.mark.parametrize("failing", ["atomic_write_table", "atomic_write_json"])
def test_a_failure_before_the_done_marker_leaves_the_partition_to_redo(tmp_path, monkeypatch, failing):
    """The table first, the done marker last: whichever of the two writes fails, the partition is not done."""
    wd = WorkDir(tmp_path)
    wd.begin("extract", "m1")
    table = pa.table({"frame_id": ["m1_0"]})

    def crash(*args):
        raise OSError(errno.EIO, "write failed")

    with monkeypatch.context() as patch:
        patch.setattr(workdir, failing, crash)
        with pytest.raises(OSError):
            wd.commit("extract", "m1", table, {"frames_in": 1})
    assert not wd.is_done("extract", "m1") and wd.done("extract") == {}
    wd.begin("extract", "m1")
    wd.commit("extract", "m1", table, {"frames_in": 1})
    assert wd.is_done("extract", "m1") and wd.read_table("extract").frame_id.tolist() == ["m1_0"]


def test_a_restarted_partition_is_pending_until_its_new_commit(tmp_path):
    """A redo killed right after it began must not look done: begin removes the done marker first."""
    wd = WorkDir(tmp_path)
    wd.begin("detect", "m1")
    wd.commit("detect", "m1", pa.table({"frame_id": ["m1_0"]}), {"frames_in": 1})
    wd.begin("detect", "m1")  # the redo starts ... and is killed here
    assert not wd.is_done("detect", "m1") and wd.done("detect") == {}
    assert not (wd.parts_dir("detect") / "m1.done").exists()
