import pandas as pd

from mhmd_builder.manifest import MANIFEST_COLUMNS, export_manifest, format_status, status
from mhmd_builder.workdir import WorkDir


def test_status_counts_pending_partitions(tmp_path):
    wd = WorkDir(tmp_path)
    for pid in ("a", "b", "c"):
        wd.plan("extract", pid, {"path": pid})
    wd.begin("extract", "a")
    wd.commit("extract", "a", __import__("pyarrow").table({"x": [1]}),
              {"frames_in": 10, "frames_out": 7, "rejected": {"grayscale": 2, "blurry": 1}})
    wd.mark_failed("extract", "b", {"reason": "empty file (0 bytes)"})
    report = status(wd)["extract"]
    assert report["partitions"] == {"done": 1, "failed": 1, "pending": 1}
    assert (report["frames_in"], report["frames_out"]) == (10, 7)
    text = format_status(status(wd))
    assert "grayscale 2, blurry 1" in text and "failed extract b: empty file (0 bytes)" in text


def test_empty_workdir_exports_the_contract_columns(tmp_path):
    out = tmp_path / "m.parquet"
    assert export_manifest(WorkDir(tmp_path / "w"), str(out)) == 0
    frame = pd.read_parquet(out)
    assert list(frame.columns) == list(MANIFEST_COLUMNS) and len(frame) == 0
    assert format_status(status(WorkDir(tmp_path / "w"))).startswith("nothing here yet")
