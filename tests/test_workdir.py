import pyarrow as pa

from mhmd_builder.workdir import WorkDir, atomic_write_bytes


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


def test_read_table_unifies_partitions_with_different_columns(tmp_path):
    wd = WorkDir(tmp_path)
    for pid, table in [("a", pa.table({"x": [1]})), ("b", pa.table({"x": [2], "y": [0.5]}))]:
        wd.begin("s", pid)
        wd.commit("s", pid, table, {})
    frame = wd.read_table("s")
    assert frame.x.tolist() == [1, 2] and frame.y.isna().tolist() == [True, False]
