import json
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mhmd_builder import manifest as manifest_module
from mhmd_builder.filter import current_decisions, refilter
from mhmd_builder.labels import write_human_labels
from mhmd_builder.manifest import export_manifest, format_status, status
from mhmd_builder.quality import QualityThresholds
from mhmd_builder.tables import MANIFEST_COLUMNS, parsing_table_path
from mhmd_builder.workdir import WorkDir, atomic_write_table

from conftest import Terminal


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


def test_manifest_shows_human_labels_then_the_labelers(tmp_path):
    import pyarrow as pa

    from mhmd_builder.labels import write_human_labels
    from mhmd_builder.tables import LABEL as LABEL_STAGE, PREDICTION_SCHEMA

    wd = WorkDir(tmp_path)
    wd.begin("extract", "m")
    wd.commit("extract", "m", pa.table({
        "frame_id": ["m_0", "m_1000", "m_2000"], "movie_id": ["m"] * 3, "timestamp": [0.0, 1.0, 2.0],
        "width": pa.array([64] * 3, pa.int32()), "height": pa.array([64] * 3, pa.int32()),
        "kept": [True] * 3, "reject_reason": pa.array([None] * 3, pa.string()),
        "flags": pa.array([[]] * 3, pa.list_(pa.string())), "jpeg": ["a", "b", "c"]}), {})
    write_human_labels(wd, pd.DataFrame({"frame_id": ["m_0"], "label": ["during_ww2/usa/military"], "label_id": [24],
                                         "source": ["todo.csv"], "line": [2]}))
    frames = export_and_read(wd, tmp_path)
    assert frames.label.fillna("-").tolist() == ["during_ww2/usa/military", "-", "-"]
    assert frames.label_source.fillna("-").tolist() == ["human", "-", "-"]

    wd.begin(LABEL_STAGE, "m")
    wd.commit(LABEL_STAGE, "m", pa.Table.from_pylist([
        {"frame_id": "m_0", "movie_id": "m", "label": "during_ww2/usa/military", "label_id": 24,
         "label_source": "human", "label_confidence": 1.0, "top3": [], "top3_confidence": []},
        {"frame_id": "m_1000", "movie_id": "m", "label": "during_ww2/japan/military", "label_id": 27,
         "label_source": "model", "label_confidence": 0.75, "top3": [], "top3_confidence": []},
    ], PREDICTION_SCHEMA), {})
    frames = export_and_read(wd, tmp_path)
    assert frames.label.fillna("-").tolist() == ["during_ww2/usa/military", "during_ww2/japan/military", "-"]
    assert frames.label_source.fillna("-").tolist() == ["human", "model", "-"]
    assert frames.label_confidence.tolist()[:2] == [1.0, 0.75] and pd.isna(frames.label_confidence[2])


def export_and_read(wd, tmp_path):
    out = tmp_path / "m.parquet"
    export_manifest(wd, str(out))
    return pd.read_parquet(out).sort_values("timestamp", ignore_index=True)


def test_status_shows_the_partitions_of_a_run_in_progress(movie_factory, tmp_path):
    """`mhmd status` read while `mhmd extract` runs (another process) shows the movie with its share done."""
    movie = movie_factory("long.mp4", seconds=40, size="1280x720")
    work = WorkDir(tmp_path / "w")
    run = subprocess.Popen([sys.executable, "-m", "mhmd_builder.cli", "extract", str(movie), "-w", str(work.root),
                            "--fps", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = []
    while run.poll() is None:
        running = status(work).get("extract", {}).get("running", {})
        seen += [r["percent"] for r in running.values()]
        if running:
            assert "running extract long-" in format_status(status(work))
        time.sleep(0.05)
    assert run.returncode == 0
    assert any(0 < percent < 100 for percent in seen), seen
    assert status(work)["extract"]["running"] == {} and status(work)["extract"]["partitions"]["done"] == 1


def test_the_manifest_is_built_once_per_state_of_the_work_directory(tmp_path, monkeypatch):
    import pyarrow as pa

    from mhmd_builder import manifest as read_model

    builds = []
    real_build = read_model._build
    monkeypatch.setattr(read_model, "_build", lambda wd: builds.append(1) or real_build(wd))
    wd = WorkDir(tmp_path)
    table = {"frame_id": ["m_0"], "movie_id": ["m"], "timestamp": [0.0], "width": pa.array([64], pa.int32()),
             "height": pa.array([64], pa.int32()), "kept": [True], "reject_reason": pa.array([None], pa.string()),
             "flags": pa.array([[]], pa.list_(pa.string())), "jpeg": ["a"]}
    wd.begin("extract", "m")
    wd.commit("extract", "m", pa.table(table), {})
    first = read_model.manifest(wd)
    first["kept"] = False  # a caller changing its copy changes no one else's
    assert read_model.manifest(wd).kept.tolist() == [True] and len(builds) == 1
    wd.begin("extract", "m")  # a redo: the same table again, a new commit
    wd.commit("extract", "m", pa.table({**table, "kept": [False]}), {})
    assert read_model.manifest(wd).kept.tolist() == [False] and len(builds) == 2



def test_a_resumed_build_builds_the_manifest_only_when_its_tables_changed(demo_run, tmp_path, monkeypatch):
    """A build resumed after it finished: the labeler's check and the label stage's planning read
    the manifest, and no table changed in between: one build of it serves both (each reader used to
    build its own); labels import and shard read it movie by movie (`manifest_by_movie`), no whole one."""
    import shutil
    from dataclasses import replace

    from mhmd_builder import manifest as read_model
    from mhmd_builder.build import PIPELINES, build, load_pipeline

    out = tmp_path / "demo"
    shutil.copytree(demo_run[0], out)
    builds = []
    real_build = read_model._build
    monkeypatch.setattr(read_model, "_build",
                        lambda wd, columns=None: builds.append(columns) or real_build(wd, columns))
    pipeline = load_pipeline(PIPELINES / "demo.yaml")
    pipeline = replace(pipeline, detect=replace(pipeline.detect, detector="opencv"))  # as the offline demo ran
    result = build(pipeline, sorted((out / "films").iterdir()), WorkDir(out / "work"), out / "shards",
                   labels=str(out / "labels.csv"))
    assert not result.failures and result.index
    assert builds == [None], builds


def test_status_names_damaged_records_and_tables_as_pending(tmp_path):
    wd = WorkDir(tmp_path)
    for pid in ("a", "b", "c"):
        wd.plan("extract", pid, {"path": pid})
        wd.begin("extract", pid)
        wd.commit("extract", pid, __import__("pyarrow").table({"x": [1]}), {"frames_in": 10})
    (wd.parts_dir("extract") / "a.done").write_text("not json")
    wd.table_path("extract", "b").write_bytes(b"PAR1 cut")
    report = status(wd)["extract"]
    assert report["partitions"] == {"done": 1, "failed": 0, "pending": 2} and report["frames_in"] == 10
    text = format_status(status(wd))
    assert f"damaged record {wd.parts_dir('extract') / 'a.done'}: redone on the next run" in text
    assert f"{wd.table_path('extract', 'b')}: damaged (cut short or not a Parquet file): redone on the next run" in text


def _without_filter_counts(work: WorkDir) -> None:
    """The filter's summary as an earlier version wrote it: no per-movie counts."""
    path = work.stage_dir("filter") / "summary.json"
    summary = json.loads(path.read_text())
    del summary["movies"]
    path.write_text(json.dumps(summary))


def test_status_after_a_filter_counts_from_its_summary_what_its_decisions_hold(synthetic_copy, monkeypatch):
    work = synthetic_copy
    refilter(work, QualityThresholds(min_colorfulness=0, max_hash_distance=-1))  # the grayscale frames kept now
    # One movie extracted again since the filter, with other decisions: extract's own count it again.
    movie = sorted(work.done("extract"))[0]
    table = pq.read_table(work.table_path("extract", movie))
    kept = table.column("kept").to_pylist()
    kept[0] = not kept[0]
    for name, values in (("kept", kept), ("reject_reason", [None if k else "grayscale" for k in kept])):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    marker = json.loads((work.parts_dir("extract") / f"{movie}.done").read_text())
    work.commit("extract", movie, table, {**marker, "frames_out": sum(kept), "rejected": {"grayscale": len(kept) - sum(kept)}})
    with monkeypatch.context() as patch:
        patch.setattr(manifest_module, "current_decisions", None)  # summaries only: no frame table read
        counted = status(work)
    _without_filter_counts(work)
    decided = status(work)
    assert counted == decided
    kept_now = current_decisions(work).kept.sum()
    assert counted["extract"]["frames_out"] == kept_now > work.read_table("extract").kept.sum()
    assert counted["extract"]["frames_in"] == 3000 and counted["label"]["frames_out"] == work.read_table("label").shape[0]


def test_status_without_a_filter_reads_the_done_markers_alone(synthetic_work, monkeypatch):
    monkeypatch.setattr(WorkDir, "read_table", None)
    monkeypatch.setattr(manifest_module, "current_decisions", None)
    report = status(synthetic_work)
    assert [report[stage]["frames_in"] for stage in ("extract", "detect", "label")] == [
        3000, report["extract"]["frames_out"], report["detect"]["frames_out"]]
    assert list(report["extract"]["rejected"]) == ["grayscale"]


def test_the_manifest_takes_each_stages_row_of_a_frame_that_reached_it(synthetic_copy):
    work = synthetic_copy
    refilter(work, QualityThresholds(min_colorfulness=0))  # grayscale frames kept now, never detected
    frames = manifest_module.manifest(work).set_index("frame_id")
    detected = work.read_table("detect").set_index("frame_id")
    labelled = work.read_table("label").set_index("frame_id")
    seen = frames.loc[detected.index]
    assert (seen.persons == detected.persons).all() and seen.kept.equals(detected.kept)
    assert seen.reject_reason.fillna("").equals(detected.reject_reason.fillna(""))
    assert (frames.loc[labelled.index].label == labelled.label).all()
    assert (frames.loc[labelled.index].label_confidence.round(6) == 0.9).all()
    unseen = frames.drop(index=detected.index)
    assert len(unseen) and unseen.kept.all() and unseen.persons.isna().all() and unseen.label.isna().all()
    assert frames.reject_reason.isin(["no_person"]).sum() == (~detected.kept).sum()


@pytest.mark.parametrize("bucket_rows", [manifest_module.MOVIE_BUCKET_ROWS, 1, 1200])
def test_the_manifest_by_movie_is_the_whole_manifest_cut_per_movie(synthetic_copy, monkeypatch, bucket_rows):
    """Movie by movie, the shard records (their tars mix every film) spilled into buckets of one movie,
    of two or three, or of all six, then read a bucket at a time: the whole manifest all the same."""
    monkeypatch.setattr(manifest_module, "MOVIE_BUCKET_ROWS", bucket_rows)
    work = synthetic_copy
    refilter(work, QualityThresholds(min_colorfulness=0))  # decisions of the filter
    frames = manifest_module.manifest_table(work)
    kept = frames.filter(frames["kept"]).to_pandas()
    mixed = kept.sample(frac=1, random_state=0)  # shard records mix films
    for i, tar in enumerate(mixed.iloc[start:start + 500] for start in range(0, len(mixed), 500)):
        work.commit("shard", f"train-{i:06d}", pa.table({"frame_id": tar.frame_id, "movie_id": tar.movie_id,
                                                         "split": ["train"] * len(tar), "shard": [f"{i}"] * len(tar)}),
                    {"frames_in": len(tar), "frames_out": len(tar)})
    write_human_labels(work, pd.DataFrame({"frame_id": kept.frame_id[:50], "label": kept.label[:50], "label_id": 0,
                                           "source": "people.csv", "line": range(50)}))
    mapped = mixed.iloc[::7]  # parsing maps of some frames, of every film, in no order
    atomic_write_table(parsing_table_path(work), pa.table({"frame_id": mapped.frame_id, "movie_id": mapped.movie_id,
                                                           "parsing": "parsing/" + mapped.frame_id + ".png"}))
    whole = manifest_module.manifest_table(work)
    movies = list(manifest_module.manifest_by_movie(work))
    assert [m["movie_id"][0].as_py() for m in movies] == sorted(work.done("extract"))
    assert pa.concat_tables(movies).equals(whole)
    assert whole["split"].null_count == len(whole) - len(kept)
    assert whole["parsing"].null_count == len(whole) - len(mapped)
    own = pa.concat_tables(manifest_module.manifest_by_movie(work, before="shard"))  # shard's own records: not read
    assert own["split"].null_count == len(own) and own.drop_columns("split").equals(whole.drop_columns("split"))
    columns = ["frame_id", "movie_id", "timestamp", "kept", "reject_reason", "flags", "jpeg"]
    assert pa.concat_tables(manifest_module.manifest_by_movie(work, columns=columns)).equals(
        manifest_module.manifest_table(work, columns=columns))
    # A movie whose extract table is not in time order (most are: read as they are) comes sorted all the same.
    movie = sorted(work.done("extract"))[1]
    table = pq.read_table(work.table_path("extract", movie))
    pq.write_table(table.take(list(range(len(table) - 1, -1, -1))), work.table_path("extract", movie))
    assert pa.concat_tables(manifest_module.manifest_by_movie(work, columns=columns)).equals(
        manifest_module.manifest_table(work, columns=columns))



def test_a_reader_that_stops_after_one_movie_leaves_no_spilled_bucket(synthetic_copy, tmp_path, monkeypatch):
    """The shard records spilled for a pass over the movies are removed when the pass ends, also
    when its reader stops early (the thread building the next movies stopped first)."""
    spills = tmp_path / "spills"
    spills.mkdir()
    monkeypatch.setattr(manifest_module.tempfile, "tempdir", str(spills))
    work = synthetic_copy
    frames = manifest_module.manifest_table(work).to_pandas()
    work.commit("shard", "train-000000", pa.table({"frame_id": frames.frame_id, "movie_id": frames.movie_id,
                                                   "split": ["train"] * len(frames), "shard": ["0"] * len(frames)}),
                {"frames_in": len(frames), "frames_out": len(frames)})
    movies = manifest_module.manifest_by_movie(work)
    first = next(movies)
    assert first["split"].null_count == 0 and [p.name for p in spills.iterdir()][0].startswith("mhmd-manifest-")
    movies.close()
    assert not list(spills.iterdir())

def test_the_export_written_movie_by_movie_is_the_whole_manifest(synthetic_copy, tmp_path):
    """Each movie's rows are written as they are built; the file is still the whole manifest's table,
    with its columns where one movie has no record of a later stage (not detected, not labelled,
    not sharded), and with the contract's types."""
    work = synthetic_copy
    refilter(work, QualityThresholds(min_colorfulness=0))
    movies = sorted(work.done("extract"))
    for stage in ("detect", "label"):  # the first movie as if detect had not reached it yet
        (work.parts_dir(stage) / f"{movies[0]}.done").unlink()
    (work.parts_dir("label") / f"{movies[1]}.done").unlink()
    kept = manifest_module.manifest(work).query("kept and movie_id == @movies[2]")
    work.commit("shard", "train-000000", pa.table({"frame_id": kept.frame_id, "movie_id": kept.movie_id,
                                                   "split": ["train"] * len(kept), "shard": ["0"] * len(kept)}),
                {"frames_in": len(kept), "frames_out": len(kept)})
    whole = manifest_module.manifest_table(work)
    for name, kind in MANIFEST_COLUMNS.items():
        whole = whole.set_column(whole.schema.get_field_index(name), name, whole[name].cast(kind))
    out = tmp_path / "m.parquet"
    assert export_manifest(work, str(out)) == whole.num_rows == 3000
    written = pq.read_table(out)
    assert written.schema.equals(whole.schema) and written.equals(whole)
    assert pq.ParquetFile(out).num_row_groups == len(movies)  # one movie's rows at a time
    assert written["boxes"].null_count < 3000 and written["split"].null_count == 3000 - len(kept)


def test_the_commands_that_read_the_films_one_by_one_show_a_bar_over_them(synthetic_copy, monkeypatch):
    """report, sample, shard's plan, labels import and manifest export go through manifest_by_movie:
    a minute at the paper's size, shown on a bar over the films."""
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert len(list(manifest_module.manifest_by_movie(synthetic_copy))) == 6
    assert "films read:   0%" in sys.stderr.getvalue() and "0/6 [" in sys.stderr.getvalue()
