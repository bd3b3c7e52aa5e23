import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
import time

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from mhmd_builder.cli import main
from mhmd_builder.detect import DetectSettings, detect
from mhmd_builder.errors import DamagedFileError, InputError
from mhmd_builder.filter import refilter
from mhmd_builder.labels import import_labels, labelable_frames, write_human_labels
from mhmd_builder.manifest import export_manifest, format_status, manifest, status
from mhmd_builder.quality import QualityThresholds
from mhmd_builder.report import write_report
from mhmd_builder.sample import sample_frames
from mhmd_builder.runners import LocalRunner
from mhmd_builder import shard as shard_module
from mhmd_builder.shard import (READ_BYTES, SHUFFLE_BUCKET_ROWS, SPILL_SCHEMA, JsonBound, ShardSettings, _read_member,
                                SampleJson, _rounded_texts, _shuffled_bucket, samples_path, shard, shuffle_keys, split_films)
from mhmd_builder.stages import PartitionError
from mhmd_builder.shards import BOX_DECIMALS, encode_json, label_fields, tar_name
from mhmd_builder.tables import FRAME_SCHEMA
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.workdir import WorkDir

from conftest import INTERRUPTIBLE_MHMD
from test_sample import copy_films, write_predictions  # two films, extracted and detected once per session


WIDS = ["test.wids.json", "train.wids.json"]  # the wids shard index of each split


@pytest.fixture
def films(tmp_path_factory, tmp_path):
    return copy_films(tmp_path_factory, tmp_path)


def test_films_are_split_whole_and_the_test_split_stays_near_its_fraction():
    sizes = {f"m{i}": 10 + i for i in range(20)}
    split = split_films(sizes, 0.2, seed=3)
    test = sum(sizes[m] for m, s in split.items() if s == "test")
    assert 0 < test <= 0.2 * sum(sizes.values()) and set(split.values()) == {"train", "test"}
    assert split == split_films(sizes, 0.2, seed=3) and split != split_films(sizes, 0.2, seed=4)
    assert set(split_films({"m0": 10}, 0.5, 0).values()) == {"train"}  # one film: train only


def test_near_duplicate_films_are_one_unit_and_the_others_split_as_before():
    frames = {f"m{i:02d}": 10 + i for i in range(20)}
    test = sorted(m for m, s in split_films(frames, 0.2, seed=0).items() if s == "test")
    assert test == ["m02", "m04", "m06", "m19"]  # the split before near-duplicates were grouped
    group = ["m01", "m07", "m13"]
    in_test = set()
    for seed in range(10):
        split = split_films(frames, 0.2, seed, [group])
        assert len({split[m] for m in group}) == 1
        in_test.add(split["m01"])
        assert split_films(frames, 0.2, seed, []) == split_films(frames, 0.2, seed)
    assert in_test == {"train", "test"}


def test_shards_are_readable_deterministic_and_split_by_film(films, tmp_path):
    taxonomy = load_taxonomy()
    kept = manifest(films).query("kept")
    labelled = kept.iloc[::2]
    usa = taxonomy.by_name("during_ww2/usa/military")
    write_human_labels(films, pd.DataFrame({"frame_id": labelled.frame_id, "label": usa.name,
                                            "label_id": usa.id, "source": "t.csv", "line": range(len(labelled))}))
    settings = ShardSettings(maxcount=5, test_fraction=0.3, seed=1)
    index = shard(films, tmp_path / "a", settings, taxonomy)
    shard(films, tmp_path / "b", settings, taxonomy)
    names = [s["name"] for s in index["shards"]]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(names + ["index.json", *WIDS])  # no temp files
    assert all(s["count"] <= 5 for s in index["shards"]) and sum(s["count"] for s in index["shards"]) == len(kept)

    samples = list(wds.WebDataset([str(tmp_path / "a" / n) for n in names], shardshuffle=False).decode("rgb"))
    assert sorted(s["__key__"] for s in samples) == sorted(kept.frame_id)
    tar_of = _names_of(samples, names, tmp_path / "a")
    movies_of = {split: {s["json"]["movie"] for s, n in zip(samples, tar_of) if n.startswith(split)}
                 for split in ("train", "test")}
    assert movies_of["train"] and movies_of["test"] and not movies_of["train"] & movies_of["test"]
    # SHARDDIR/index.json lists every tar written with its split and the samples it holds, and per
    # split the films and the label histogram of those samples.
    assert json.loads((tmp_path / "a" / "index.json").read_text()) == index
    assert index["taxonomy_sha256"] == taxonomy.sha256
    assert [(e["name"], e["split"], e["count"]) for e in index["shards"]] == \
        [(n, n.split("-")[0], tar_of.count(n)) for n in names]
    for split in ("train", "test"):
        metas = [s["json"] for s, n in zip(samples, tar_of) if n.startswith(split)]
        assert index["splits"][split] == {"samples": len(metas), "movies": len(movies_of[split]),
                                          "labels": dict(Counter(m["label"] for m in metas if m["label"]))}
    assert sum(n for split in index["splits"].values() for n in split["labels"].values()) == len(labelled)
    for sample in samples:
        assert "." not in sample["__key__"] and sample["jpg"].shape[2] == 3
        if sample["json"]["label"]:
            assert sample["cls"] == usa.id and sample["json"]["era"] == "during_ww2"
        else:
            assert sample["cls"] == -1 and sample["json"]["label_id"] is None
    raw = next(iter(wds.WebDataset(str(tmp_path / "a" / names[0]), shardshuffle=False)))
    assert raw["jpg"] == (films.root / kept.set_index("frame_id").jpeg[raw["__key__"]]).read_bytes()  # not re-encoded
    splits = manifest(films).set_index("frame_id").split.dropna()
    assert sorted(splits.index) == sorted(kept.frame_id)


def _names_of(samples, names, folder):
    """The tar each sample came from, read with Python's own tarfile."""
    where = {}
    for name in names:
        with tarfile.open(folder / name) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 for m in members)
            where.update({m.name.split(".", 1)[0]: name for m in members})
    return [where[s["__key__"]] for s in samples]


def test_masks_go_into_the_shards(films, person_yolo, tmp_path):
    detect(films, DetectSettings(model=str(person_yolo("yolo11n-seg.yaml")), device="cpu", imgsz=160, masks=True,
                                 max_persons=300), LocalRunner(1))
    index = shard(films, tmp_path / "out", ShardSettings(test_fraction=0))
    (only,) = index["shards"]
    samples = list(wds.WebDataset(str(tmp_path / "out" / only["name"]), shardshuffle=False))
    masks = manifest(films).query("kept").set_index("frame_id")["mask"]
    assert sorted(s["__key__"] for s in samples) == sorted(masks.index)
    for sample in samples:  # the PNG detect wrote for the frame, byte for byte
        assert sample["mask.png"] == (films.root / masks[sample["__key__"]]).read_bytes()
        assert np.array(Image.open(io.BytesIO(sample["mask.png"]))).shape == (360, 640)
    assert len({s["mask.png"] for s in samples}) > 1  # persons found: masks differ from frame to frame
    # README's decoding ("pil"): the mask's 8-bit values, as written, in each of its RGB channels
    decoded = wds.WebDataset(str(tmp_path / "out" / only["name"]), shardshuffle=False).decode("pil")
    for sample, mask in zip(samples, decoded, strict=True):
        written = np.array(Image.open(io.BytesIO(sample["mask.png"])))
        assert np.array_equal(np.asarray(mask["mask.png"]), np.dstack([written] * 3))


def test_shard_cli_and_nothing_to_shard(films, tmp_path):
    result = CliRunner().invoke(main, ["shard", "-w", str(films.root), "-o", str(tmp_path / "s"), "--maxcount", "4"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert "train:" in result.output and len(index["shards"]) >= 5
    again = CliRunner().invoke(main, ["shard", "-w", str(films.root), "-o", str(tmp_path / "s"), "--maxcount", "100"])
    assert again.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(["index.json", *WIDS, "test-000000.tar",
                                                                         "train-000000.tar"])
    (tmp_path / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(main, ["shard", "-w", str(films.root), "-o", str(tmp_path)])
    assert refused.exit_code == 1 and "holds files that are not shards" in refused.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "nothing").mkdir()
    empty = CliRunner().invoke(main, ["shard", "-w", str(tmp_path / "nothing"), "-o", str(tmp_path / "t")])
    assert empty.exit_code == 1 and "no kept frames to shard" in empty.output


# -- the readers researchers use, on the shards of a partly labelled build --------------------------
README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def partly_labelled(tmp_path_factory):
    """The two films with every other kept frame labelled by hand (as after `labels import`, before
    `labeler predict`) but those of the first tar of each split, sharded into several tars per split
    once for the module's readers: (shard folder, its index, each sample's members as tarfile reads
    them, by split, in order). Hugging Face infers its types from the first samples of a tar, and the
    first samples of a build with few labels are often all unlabelled."""
    folder = tmp_path_factory.mktemp("partly-labelled")
    work, shards = copy_films(tmp_path_factory, folder), folder / "shards"
    settings = ShardSettings(maxcount=4, test_fraction=0.3, seed=1)
    shard(work, shards, settings)  # which frame goes into which tar does not depend on labels
    firsts = [tar_samples(shards / tar_name(split, 0)) for split in ("train", "test")]
    left_out = {sample["__key__"] for first in firsts for sample in first}
    kept = manifest(work).query("kept").sort_values("frame_id")
    human = kept[~kept.frame_id.isin(left_out)].iloc[::2]
    labels = [load_taxonomy().by_name(n) for n in ("during_ww2/usa/military", "after_ww2/china/informal")]
    chosen = [labels[i % 2] for i in range(len(human))]
    write_human_labels(work, pd.DataFrame({"frame_id": human.frame_id, "label": [l.name for l in chosen],
                                           "label_id": [l.id for l in chosen], "source": "t.csv",
                                           "line": range(len(human))}))
    index = shard(work, shards, settings)
    samples = {split: [sample for e in index["shards"] if e["split"] == split
                       for sample in tar_samples(shards / e["name"])] for split in ("train", "test")}
    return shards, index, samples


def tar_samples(path) -> list[dict]:
    """A tar's samples read with Python's own tarfile: member name -> bytes, and `__key__`."""
    samples = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, name = member.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][name] = tar.extractfile(member).read()
    return samples


def expected_cls(sample: dict) -> int:
    """What `cls` should say of a sample: its json's label id, -1 when it has none."""
    label_id = json.loads(sample["json"])["label_id"]
    return -1 if label_id is None else label_id


def run_recipe(name: str, shards, placeholder: str = "SHARDDIR") -> dict:
    """Run README's recipe `name` (the python block after `<!-- recipe: name -->`) on `shards`, as
    README gives it but for `placeholder`, replaced by `shards`; its variables."""
    block = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    variables = {}
    exec(block.group(1).replace(placeholder, str(shards)), variables)
    return variables


def test_every_sample_of_a_partly_labelled_build_has_the_same_members_cls_minus_one_when_unlabelled(
        partly_labelled):
    _, index, samples = partly_labelled
    for split, read in samples.items():
        assert len(read) == index["splits"][split]["samples"] > 0
        assert all(sorted(sample) == ["__key__", "cls", "jpg", "json"] for sample in read)  # tarfile: every member
        assert [int(sample["cls"]) for sample in read] == [expected_cls(sample) for sample in read]
        labelled = [expected_cls(sample) != -1 for sample in read]  # partly; the first tar not at all
        assert any(labelled) and not all(labelled) and not any(labelled[:4]), split


def test_webdataset_reads_every_sample_as_a_tuple_with_its_cls(partly_labelled, capsys):
    shards, _, samples = partly_labelled
    run_recipe("webdataset", shards)
    lines = capsys.readouterr().out.splitlines()
    expected = [f"{s['__key__']} {Image.open(io.BytesIO(s['jpg'])).size} {expected_cls(s)}" for s in samples["train"]]
    assert lines == expected


def test_wids_reads_any_sample_by_its_index_with_its_cls(partly_labelled, capsys):
    shards, _, samples = partly_labelled
    before = sorted(p.name for p in shards.iterdir())
    recipe = run_recipe("wids", shards)
    dataset, train = recipe["dataset"], samples["train"]
    assert capsys.readouterr().out.split() == [str(len(train)), train[3]["__key__"], str(expected_cls(train[3]))]
    assert len(dataset) == len(train)
    for i in np.random.default_rng(0).permutation(len(train)):  # random access: every sample, any order
        sample = dataset[int(i)]
        assert (sample["__key__"], sample[".cls"], sample[".json"]) == \
            (train[i]["__key__"], expected_cls(train[i]), json.loads(train[i]["json"]))
        assert sample[".jpg"].size == Image.open(io.BytesIO(train[i]["jpg"])).size
    assert sorted(p.name for p in shards.iterdir()) == before  # read in place: nothing left beside the tars


def test_hugging_face_datasets_reads_both_splits_sample_for_sample(partly_labelled, tmp_path, monkeypatch, capsys):
    shards, _, samples = partly_labelled
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets  # its settings are read from the environment once: set them too if it was imported before

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    data = run_recipe("datasets", shards)["data"]
    train = samples["train"]
    assert capsys.readouterr().out.split() == [str(len(train)), train[0]["__key__"], str(expected_cls(train[0]))]
    for split, read in samples.items():
        assert data[split].num_rows == len(read)
        for row, sample in zip(data[split], read, strict=True):
            assert (row["__key__"], row["cls"], row["json"]) == \
                (sample["__key__"], expected_cls(sample), json.loads(sample["json"]))
            assert row["jpg"].tobytes() == Image.open(io.BytesIO(sample["jpg"])).tobytes()


def test_a_rerun_rewrites_only_the_tars_that_changed(films, tmp_path):
    settings = ShardSettings(maxcount=4, test_fraction=0.3, seed=1)
    index = shard(films, tmp_path / "s", settings)
    tars = {e["name"]: tmp_path / "s" / e["name"] for e in index["shards"]}
    first = {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in tars.items()}
    assert shard(films, tmp_path / "s", settings) == index
    assert {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in tars.items()} == first  # nothing rewritten

    victim = sorted(tars)[1]
    tars[victim].unlink()
    shard(films, tmp_path / "s", settings)
    assert tars[victim].read_bytes() == first[victim][0]  # a missing tar is written again, the same

    # A new label changes one sample's json: only its tar is written again.
    frame = next(iter(wds.WebDataset(str(tars[victim]), shardshuffle=False)))["__key__"]
    label = load_taxonomy().by_name("after_ww2/usa/formal")
    write_human_labels(films, pd.DataFrame({"frame_id": [frame], "label": [label.name], "label_id": [label.id],
                                            "source": ["t.csv"], "line": [2]}))
    shard(films, tmp_path / "s", settings)
    changed = {name for name, p in tars.items() if p.read_bytes() != first[name][0]}
    assert changed == {victim}
    assert all(tars[n].stat().st_mtime_ns == first[n][1] for n in tars if n != victim)

    # Fewer, larger tars: the old ones and their records go.
    index = shard(films, tmp_path / "s", ShardSettings(maxcount=100, test_fraction=0.3, seed=1))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(["index.json", *WIDS, "test-000000.tar",
                                                                         "train-000000.tar"])
    assert sorted(films.done("shard")) == ["test-000000", "train-000000"] and not films.planned("shard").keys() - {
        "test-000000", "train-000000"}
    frames = manifest(films)
    assert frames.frame_id.is_unique and frames[frames.kept.astype(bool)].split.notna().all()


def test_a_damaged_detect_table_or_marker_is_named_then_redone_by_detect(films, tmp_path):
    one, other = sorted(films.done("detect"))
    table, marker = films.table_path("detect", one), films.parts_dir("detect") / f"{other}.done"
    before = {movie: pd.read_parquet(films.table_path("detect", movie)) for movie in (one, other)}
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    marker.write_text('{"frames_in": 1')
    assert films.done("detect") == {}
    text = format_status(status(films))
    assert f"{table}: damaged (cut short or not a Parquet file): redone on the next run" in text
    assert f"damaged record {marker}: redone on the next run" in text
    with pytest.raises(DamagedFileError) as error:
        shard(films, tmp_path / "s")
    assert str(error.value) == f"{table}: damaged (cut short or not a Parquet file): run `mhmd detect` again to redo it"
    results = detect(films, DetectSettings(detector="opencv"), LocalRunner(1))
    assert sorted(r.id for r in results) == [one, other] and all(r.ok for r in results)
    for movie, rows in before.items():
        assert pd.read_parquet(films.table_path("detect", movie)).equals(rows)
    assert films.damaged("detect") == [] and shard(films, tmp_path / "s")["shards"]


def test_a_garbage_detect_marker_stops_every_whole_dataset_reader_until_detect_redoes_it(films, tmp_path):
    """Its film's detections would be missing from the manifest: the film's frames would be sharded
    as if nobody had looked for persons in them, or dropped. Every reader of the whole dataset
    refuses instead, in one line naming the file and the command that redoes it."""
    movies = sorted(films.done("detect"))
    kept = manifest(films).query("kept")
    marker = films.parts_dir("detect") / f"{movies[1]}.done"
    marker.write_text("garbage")
    line = f"{marker}: damaged record (not a json object): run `mhmd detect` again to redo it"
    readers = {"shard": lambda: shard(films, tmp_path / "s"), "sample": lambda: sample_frames(films),
               "export": lambda: export_manifest(films, tmp_path / "m.parquet"),
               "report": lambda: write_report(films.root, tmp_path / "r.html"),
               "labels import": lambda: import_labels(films, tmp_path / "labels.csv", load_taxonomy())}
    (tmp_path / "labels.csv").write_text("frame_id,label\n")
    for name, read in readers.items():
        with pytest.raises(DamagedFileError) as error:
            read()
        assert str(error.value) == line, name
    assert not list((tmp_path / "s").iterdir()) and not (tmp_path / "m.parquet").exists()  # no tar, no index
    result = CliRunner().invoke(main, ["manifest", "export", "-w", str(films.root), "-o", str(tmp_path / "m.parquet")])
    assert (result.exit_code, result.output) == (1, f"Error: {line}\n")
    assert f"damaged record {marker}: redone on the next run" in format_status(status(films))
    assert [r.id for r in detect(films, DetectSettings(detector="opencv"), LocalRunner(1))] == [movies[1]]
    index = shard(films, tmp_path / "s", ShardSettings(test_fraction=0))
    assert index["splits"]["train"]["movies"] == 2 and index["splits"]["train"]["samples"] == len(kept)


def test_a_damaged_shard_or_label_record_stops_the_readers_of_it_not_the_commands_that_redo_it(films, tmp_path):
    shard(films, tmp_path / "s", ShardSettings(maxcount=5, test_fraction=0))
    tars = sorted(films.done("shard"))
    (films.parts_dir("shard") / f"{tars[0]}.done").write_text("[]")
    with pytest.raises(DamagedFileError, match=r"\.done: damaged record \(not a json object\): run `mhmd shard`"):
        export_manifest(films, tmp_path / "m.parquet")
    shard(films, tmp_path / "s", ShardSettings(maxcount=5, test_fraction=0))  # writes that tar again
    assert sorted(films.done("shard")) == tars and films.damaged("shard") == []
    assert export_manifest(films, tmp_path / "m.parquet") == len(manifest(films))

    kept = labelable_frames(films)
    for movie, frames in kept.groupby("movie_id"):
        write_predictions(films, movie, dict.fromkeys(frames.frame_id, 0.5))
    table = films.table_path("label", movie)
    table.write_bytes(table.read_bytes()[:100])
    line = f"{table}: damaged (cut short or not a Parquet file): run `mhmd labeler predict` again to redo it"
    with pytest.raises(DamagedFileError) as error:
        shard(films, tmp_path / "s")
    assert str(error.value) == line
    # What labeler predict plans from, and what labels import and sampling read, need no labeler output.
    columns = ["frame_id", "movie_id", "jpeg"]
    assert labelable_frames(films)[columns].equals(kept[columns]) and len(sample_frames(films)) > 0


def test_a_missing_kept_jpeg_fails_its_tar_naming_it(films, tmp_path):
    jpeg = films.root / manifest(films).query("kept").jpeg.iloc[0]
    jpeg.unlink()
    with pytest.raises(InputError) as error:
        shard(films, tmp_path / "s", ShardSettings(maxcount=100, test_fraction=0.3, seed=1))
    message = str(error.value)
    assert "\n" not in message and message.endswith(f"{jpeg}: missing: re-extract its film (`mhmd extract --redo`)")
    assert "1 tars could not be written" in message
    left = [p.name for p in (tmp_path / "s").iterdir()]
    assert len(left) == 1 and left[0].endswith("-000000.tar")  # the other split's tar: no partial one, no index


def test_tars_written_a_few_samples_at_a_time_are_those_written_a_batch_at_once(films, tmp_path, monkeypatch):
    """The writers make WRITE_BATCH samples at a time (json, headers, reads): a tar cut into batches
    of 3 (slices of its rows: boxes, labels, masks at every offset) has the same bytes."""
    settings = ShardSettings(maxcount=100, test_fraction=0.3, seed=1)
    shard(films, tmp_path / "once", settings, runner=LocalRunner(1))
    monkeypatch.setattr(shard_module, "WRITE_BATCH", 3)
    shard(films, tmp_path / "batched", settings, runner=LocalRunner(1))
    tars = sorted(path.name for path in (tmp_path / "once").glob("*.tar"))
    assert len(tars) >= 2 and all(tarfile.open(tmp_path / "once" / tar).getmembers() for tar in tars)
    for tar in tars:
        assert (tmp_path / "batched" / tar).read_bytes() == (tmp_path / "once" / tar).read_bytes(), tar


def test_a_member_file_is_read_whole_or_named_with_what_is_wrong(tmp_path):
    large = bytes(range(256)) * (3 * READ_BYTES // 256 + 7)  # several reads, the last one short
    for name, data in (("large.png", large), ("empty.jpg", b""), ("exact.jpg", b"x" * READ_BYTES)):
        (tmp_path / name).write_bytes(data)
        assert _read_member("mask.png", str(tmp_path / name)) == data
    with pytest.raises(PartitionError, match=f"^{tmp_path}/gone.jpg: missing: re-extract its film"):
        _read_member("jpg", str(tmp_path / "gone.jpg"))
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(PartitionError, match=r"folder.png: unreadable \(Is a directory\): write it again"):
        _read_member("mask.png", str(tmp_path / "folder.png"))


@pytest.mark.parametrize("recorded", [0, 5, READ_BYTES - 1, READ_BYTES, 3 * READ_BYTES + 7])
def test_a_member_file_of_a_recorded_size_is_read_whole_even_when_it_changed_since(tmp_path, recorded):
    """One read of a byte more than recorded tells the file's end; a file that grew or was cut since
    still comes back whole (its check then names it)."""
    for size in {0, recorded - 1, recorded, recorded + 1, 2 * recorded + READ_BYTES} - {-1}:
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        (tmp_path / "member").write_bytes(data)
        assert _read_member("jpg", str(tmp_path / "member"), recorded) == data, (recorded, size)


def damage(jpeg, how: str) -> None:
    """Cut a file short, or flip one byte in its middle (same size)."""
    data = bytearray(jpeg.read_bytes())
    if how == "cut":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    jpeg.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["cut", "flipped"])
def test_a_kept_jpeg_damaged_since_extract_fails_its_tar_naming_it(films, tmp_path, how):
    kept = manifest(films).query("kept")
    jpeg = films.root / kept.jpeg.iloc[3]
    size = jpeg.stat().st_size
    damage(jpeg, how)
    with pytest.raises(InputError) as error:
        shard(films, tmp_path / "s", ShardSettings(maxcount=100, test_fraction=0.3, seed=1))
    change = f"{size // 2} bytes, {size} when extracted" if how == "cut" else \
        "its bytes differ from those extracted (XXH3)"
    message = str(error.value)
    assert "\n" not in message and "1 tars could not be written" in message
    assert message.endswith(f"{jpeg}: damaged since it was extracted ({change}): re-extract its film (`mhmd extract --redo`)")
    assert len(list((tmp_path / "s").glob("*.tar"))) == 1 and not (tmp_path / "s" / "index.json").exists()


def test_frames_extracted_by_an_earlier_version_are_sharded_unchecked(films, tmp_path):
    """Work directories whose extract tables have no jpeg_bytes / jpeg_xxh3 still shard: their
    JPEGs are not checked, those of films extracted since are."""
    kept = manifest(films).query("kept")
    old, new = sorted(kept.movie_id.unique())
    table = films.table_path("extract", old)
    pq.write_table(pq.read_table(table).drop_columns(["jpeg_bytes", "jpeg_xxh3"]), table)
    damage(films.root / kept[kept.movie_id == old].jpeg.iloc[0], "flipped")
    index = shard(films, tmp_path / "s", ShardSettings(test_fraction=0))
    assert index["splits"]["train"]["samples"] == len(kept)
    jpeg = films.root / kept[kept.movie_id == new].jpeg.iloc[0]
    damage(jpeg, "flipped")
    with pytest.raises(InputError, match=f"{jpeg}: damaged since it was extracted"):
        shard(films, tmp_path / "t", ShardSettings(test_fraction=0))  # "s" holds its good copy: kept as it is


def test_a_film_that_does_not_fit_the_test_split_does_not_stop_its_filling():
    sizes = [5, 30, 8, 40, 3, 12, 25, 7, 50, 6]
    room = 0.3 * sum(sizes)
    for seed in range(20):
        split = split_films({f"m{i}": n for i, n in enumerate(sizes)}, 0.3, seed)
        test = [sizes[int(m[1:])] for m, s in split.items() if s == "test"]
        train = [sizes[int(m[1:])] for m, s in split.items() if s == "train"]
        assert train  # the last film drawn is never taken
        if len(train) > 1:  # no film left in train would still have fitted
            assert all(sum(test) + n > room for n in train), (seed, test, train)


def test_samples_of_a_tar_are_shuffled_across_films_by_the_seed(tmp_path):
    work = many_frames(tmp_path / "work", films=2, frames=10)

    def order(seed: int) -> list[str]:
        shard(work, tmp_path / f"out{seed}", ShardSettings(seed=seed, test_fraction=0), runner=LocalRunner(1))
        return planned_columns(work, "train-000000")["movie_id"]

    films = order(0)
    assert sorted(films) == [movie for movie in sorted(set(films)) for _ in range(10)]
    assert films not in (sorted(films), sorted(films, reverse=True))  # not film after film
    assert order(0) == films and order(1) != films


def test_the_buckets_are_at_most_2_to_the_max_bits_and_the_tars_the_same(tmp_path, monkeypatch):
    """Buckets of one frame asked for 80 frames: capped at 2**MAX_BUCKET_BITS files (each open while
    the movies are read), and the tars are those of one bucket."""
    work = many_frames(tmp_path / "work", films=4, frames=20)
    for summary_path in work.parts_dir("extract").glob("*.done"):  # extract's kept counts, as it writes them
        summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), "frames_out": 20}))
    shard(work, tmp_path / "one", ShardSettings(maxcount=7), runner=LocalRunner(1))
    monkeypatch.setattr(shard_module, "SHUFFLE_BUCKET_ROWS", 1)
    monkeypatch.setattr(shard_module, "MAX_BUCKET_BITS", 3)
    opened = []
    monkeypatch.setattr(shard_module, "_shuffled_bucket", lambda path: opened.append(path.name) or
                        _shuffled_bucket(path))
    shard(work, tmp_path / "many", ShardSettings(maxcount=7), runner=LocalRunner(1))
    assert 4 < len(set(opened)) <= 8
    for tar in (tmp_path / "one").glob("*.tar"):
        assert (tmp_path / "many" / tar.name).read_bytes() == tar.read_bytes(), tar.name


HOSTILE = "\x00\x1f\"\\\u2028\u00e9\U0001F600 ."


def hostile_rows(taxonomy) -> list[dict]:
    """Rows of SAMPLE_COLUMNS' json fields at their hardest: strings that escape to 6 bytes a byte,
    the longest floats and ints, many boxes, NaN and infinities, an unknown label, a label without
    source, a box of another length."""
    longest = max(taxonomy.labels, key=lambda label: len(label.name))
    return [
        {"frame_id": "plain_0", "movie_id": "plain", "timestamp": 12.5, "width": 640, "height": 360, "boxes": None,
         "label": None, "label_source": None, "label_confidence": None},
        {"frame_id": HOSTILE * 9, "movie_id": "m\u00e9\U0001F600", "timestamp": -1.2345678901234567e+300,
         "width": -(2 ** 31), "height": 2 ** 31 - 1, "boxes": [[-3.4028234663852886e+38, 1e-38, -1.1754942e-38, 0.1]] * 7,
         "label": None, "label_source": HOSTILE, "label_confidence": None},
        {"frame_id": "a" * 200, "movie_id": HOSTILE, "timestamp": 1 / 3, "width": 1, "height": 1,
         "boxes": [[0.1, 0.2, 0.3, 0.4]], "label": longest.name, "label_source": HOSTILE * 3,
         "label_confidence": 0.1 + 0.2},
        {"frame_id": "f_1", "movie_id": "plain", "timestamp": float("nan"), "width": 2, "height": 3,
         "boxes": [[float("inf"), float("-inf"), -0.0, 0.123456789], [], [0.5]], "label": "no/such/label",
         "label_source": "human", "label_confidence": 1.0},
        {"frame_id": "f_2", "movie_id": "m\u00e9\U0001F600", "timestamp": float("inf"), "width": 2, "height": 3,
         "boxes": [], "label": longest.name, "label_source": None, "label_confidence": float("nan")},
    ]


def hostile_table(rows: list[dict]) -> pa.Table:
    boxes = pa.list_(pa.list_(pa.float32()))  # boxes of any length, which the plan's own type (4) refuses
    schema = pa.schema([SPILL_SCHEMA.field(name) if name != "boxes" else pa.field(name, boxes) for name in rows[0]])
    return pa.Table.from_pylist(rows, schema)


def expected_json(row: dict, taxonomy, film: dict | None) -> bytes:
    """What a sample's json says, made the plain way: json.dumps of its meta."""
    label = taxonomy.by_name(row["label"]) if row["label"] is not None else None
    round32 = lambda v: round(float(np.float32(v)), BOX_DECIMALS)  # noqa: E731 - the boxes are float32
    meta = {"frame_id": row["frame_id"], "movie": row["movie_id"], "timestamp": round(row["timestamp"], 3),
            "width": row["width"], "height": row["height"],
            "boxes": [[round32(v) for v in box] for box in row["boxes"] or []],
            **label_fields(label, row["label_source"], row["label_confidence"])}
    if label is None and film and (film.get("era") or film.get("nationality")):
        meta.update(era=film.get("era"), nationality=film.get("nationality"), label_source="movie")
    return encode_json(meta)


def test_a_samples_json_is_what_json_dumps_makes_of_its_meta_for_the_hardest_rows():
    taxonomy = load_taxonomy()
    metadata = {"m\u00e9\U0001F600": {"era": HOSTILE, "nationality": None}, "plain": {"era": "", "nationality": ""}}
    rows = hostile_rows(taxonomy)
    jsons, label_ids = SampleJson(taxonomy, metadata)(hostile_table(rows))
    assert jsons == [expected_json(row, taxonomy, metadata.get(row["movie_id"])) for row in rows]
    assert label_ids == [None, None, max(taxonomy.labels, key=lambda label: len(label.name)).id, None,
                         max(taxonomy.labels, key=lambda label: len(label.name)).id]
    assert json.loads(jsons[1])["label_source"] == "movie" and json.loads(jsons[3])["label_source"] is None



def test_each_rows_label_film_and_source_go_to_its_own_json_in_a_batch_of_many():
    """Rows of many films and labels in one batch (label and film texts are made once per distinct
    value, then taken per row): each json is its own row's, whichever label (known, unknown or none),
    film (with metadata or not) and source it has, against json.dumps row by row."""
    taxonomy = load_taxonomy()
    rng = np.random.default_rng(4)
    metadata = {"film_a": {"era": HOSTILE, "nationality": "fr"}, "film_b": {"era": "", "nationality": ""},
                "film_c": {"era": None, "nationality": "de"}}
    names = [None, None, "no/such/label", *(label.name for label in taxonomy.labels[:5])]
    rows = [{"frame_id": f"f{i}", "movie_id": f"film_{'abcd'[rng.integers(4)]}", "timestamp": float(rng.random() * 100),
             "width": 640, "height": 360, "boxes": [[0.1, 0.2, 0.3, 0.4]] if i % 3 else None,
             "label": (label := names[rng.integers(len(names))]), "label_source": [None, "human", HOSTILE][rng.integers(3)],
             "label_confidence": float(rng.random()) if label else None} for i in range(300)]
    jsons, label_ids = SampleJson(taxonomy, metadata)(hostile_table(rows))
    assert jsons == [expected_json(row, taxonomy, metadata.get(row["movie_id"])) for row in rows]
    known = {label.name: label.id for label in taxonomy.labels}
    assert label_ids == [known.get(row["label"]) for row in rows] and len(set(label_ids)) == 6

def test_box_values_rounded_in_arrow_are_what_repr_of_round_writes():
    """Boxes' values rounded and written in Arrow (`_rounded_texts`) as repr(round(v, 5)) writes
    them: at every magnitude up to 10**9, around 10**-4 (where repr turns to 1e-05), zeros of both
    signs, values that round to them, and the last float32 under 10**9."""
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, 1e-6, -4e-6, 5e-6, 1e-5, 9.4e-5, 9.5e-5, 9.99996e-5, 1e-4, -1e-4, 0.5, 0.99999, 0.999995, 1.0,
             123.456785, -0.1, np.nextafter(np.float32(1e9), np.float32(0))]
    magnitudes = 10.0 ** rng.uniform(-7, 9, 200_000) * rng.choice([-1, 1], 200_000)
    values = np.concatenate([np.array(edges), magnitudes, rng.random(100_000)]).astype(np.float32)
    texts = _rounded_texts(pa.array(values)).to_pylist()
    assert texts == [repr(round(float(v), BOX_DECIMALS)) for v in values]
    assert _rounded_texts(pa.array([1e9], pa.float32())) is None and _rounded_texts(pa.array([np.nan], pa.float32())) is None
    assert _rounded_texts(pa.array([0.5])) is None  # a float64 times 10**5 is not exact: repr of round, one by one


def test_a_samples_json_is_never_longer_than_the_plan_counts_it():
    """The plan cuts tars by size before the writers make the json: its bound must hold for the
    hardest rows (strings that escape to 6 bytes a byte, the longest floats and ints, many boxes,
    film metadata longer than any label's), and stay near a plain row's length."""
    taxonomy = load_taxonomy()
    metadata = {"m\u00e9\U0001F600": {"era": "\x01" * 40, "nationality": "\"\\" * 30}}
    rows = hostile_rows(taxonomy)[:3]
    table = pa.Table.from_pylist([{**row, "key": 0} for row in rows],
                                 pa.schema([SPILL_SCHEMA.field(name) for name in [*rows[0], "key"]]))
    bound = JsonBound(taxonomy, metadata)(table)
    lengths = [len(made) for made in SampleJson(taxonomy, metadata)(table)[0]]
    assert all(length <= most for length, most in zip(lengths, bound)), (lengths, bound)
    assert bound[0] < 2 * lengths[0] + 400  # a plain row is not counted at several times its size


def test_a_rerun_with_other_film_metadata_writes_the_tars_again(tmp_path):
    """The writers make the json from the rows and the films' metadata: a tar whose rows are the same
    but whose films' era changed is not up to date."""
    work, out = many_frames(tmp_path / "work", films=2, frames=5), tmp_path / "out"
    label = load_taxonomy().labels[0]
    film = "film0-00000000"

    def eras(metadata) -> set:
        shard(work, out, ShardSettings(test_fraction=0), runner=LocalRunner(1), movie_metadata=metadata)
        return {(s["json"]["movie"], s["json"]["era"]) for s in wds.WebDataset(str(out / "train-000000.tar"),
                                                                               shardshuffle=False).decode()}

    assert eras({}) == {(film, None), ("film1-00000001", None)}
    assert eras({film: {"era": label.era, "nationality": label.nationality}}) == \
        {(film, label.era), ("film1-00000001", None)}


def test_a_tars_members_stay_within_maxsize(tmp_path):
    work = many_frames(tmp_path / "work", films=2, frames=15)
    index = shard(work, tmp_path / "out", ShardSettings(maxsize=20_000, test_fraction=0), runner=LocalRunner(1))
    assert len(index["shards"]) > 1 and {entry["count"] for entry in index["shards"]} != {1}
    for entry in index["shards"]:
        with tarfile.open(tmp_path / "out" / entry["name"]) as tar:
            members = tar.getmembers()
        assert members[-1].offset_data + members[-1].size <= 20_000, entry
    assert sum(entry["count"] for entry in index["shards"]) == 30


def planned_columns(work: WorkDir, tar: str) -> dict[str, list]:
    """The rows the plan wrote for a tar's writer, a list per column."""
    with pa.ipc.open_file(samples_path(work, tar)) as file:
        return file.read_all().to_pydict()


def many_frames(root, films: int, frames: int) -> WorkDir:
    """A work directory as extract leaves it (no detection: every kept frame is sharded) with
    `frames` small frames per film, their JPEGs hard links to one file: tars of thousands of samples
    that cost little to make."""
    work = WorkDir(root)
    data = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))[1].tobytes()
    first = None
    for film in range(films):
        movie = f"film{film}-0000000{film}"
        work.frames_dir(movie).mkdir(parents=True)
        rows = []
        for i in range(frames):
            jpeg = f"frames/{movie}/{movie}_{i}.jpg"
            if first is None:
                first = root / jpeg
                first.write_bytes(data)
            else:
                os.link(first, root / jpeg)
            rows.append({"frame_id": f"{movie}_{i}", "movie_id": movie, "timestamp": i / 25, "width": 32, "height": 32,
                         "kept": True, "flags": [], "jpeg": jpeg, "jpeg_bytes": len(data),
                         "jpeg_xxh3": xxhash.xxh3_64_hexdigest(data)})
        work.begin("extract", movie)
        work.commit("extract", movie, pa.Table.from_pylist(rows, FRAME_SCHEMA), {"frames_in": frames})
    return work


RAY_LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\t(INFO|WARNING) ")  # a line of Ray's own logger


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_ctrl_c_while_tars_are_written_leaves_no_partial_tar_and_the_rerun_ends_as_never_interrupted(tmp_path, runner):
    """Ctrl-C as a terminal sends it, to the whole process group, while the writers (processes, or
    Ray actors of a local Ray instance the command started) are halfway through their tars: what
    is left is whole tars or nothing (no temporary file, index or lock), and the rerun ends as if
    never interrupted."""
    # Two tars of 30,000 samples, about a second each (60,000 links to one JPEG: ext4 allows 65,000).
    # A Ray actor sees the interrupt at its next progress report, so a tar may finish meanwhile:
    # then it is left whole, with its done marker or without (and then written again).
    work = many_frames(tmp_path / "work", films=2, frames=30_000)
    args = [sys.executable, *INTERRUPTIBLE_MHMD, "shard", "-w", str(work.root), "-o", str(tmp_path / "out"),
            "--maxcount", "30000", "--test-fraction", "0"]  # a writer per core: two here
    args += ["--runner", "ray", "--ray-address", "local"] if runner == "ray" else []
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob(".*.tar.tmp")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if not RAY_LOG.match(line)]  # Ray's own start-up notices
    # stderr is a pipe: the progress comes as plain lines, the last one where the run stopped
    assert proc.returncode == 130 and out == "" and lines[-1] == "interrupted: rerun the same command to resume", err
    assert lines[:-1] and all(re.fullmatch(r"shard: [01]/2 partitions, 0 failed", line) for line in lines[:-1]), err
    left = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert all(re.fullmatch(r"train-00000[01]\.tar", name) for name in left), left.keys()  # no temporary, index, lock
    done = {p.stem for p in work.parts_dir("shard").glob("*.done")}
    assert done <= {Path(name).stem for name in left} and not list(work.parts_dir("shard").glob("*.failed"))

    subprocess.run(args, check=True, capture_output=True)
    shard(work, tmp_path / "reference", ShardSettings(maxcount=30_000, test_fraction=0.0), runner=LocalRunner(1))
    names = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert names == ["index.json", "train-000000.tar", "train-000001.tar", "train.wids.json"]  # no test split
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert all(data == (tmp_path / "reference" / name).read_bytes() for name, data in left.items())  # whole tars


def test_shard_holds_each_frame_kept_with_a_jpeg_once_and_no_other(synthetic_copy, tmp_path):
    work = synthetic_copy
    refilter(work, QualityThresholds(min_colorfulness=0))  # grayscale frames kept now, but never encoded
    index = shard(work, tmp_path / "shards", runner=LocalRunner(1))
    frames = manifest(work)
    wanted = frames[frames.kept.astype(bool) & frames.jpeg.notna()]
    assert 0 < len(wanted) < frames.kept.sum()
    written = work.read_table("shard")
    assert sorted(written.frame_id) == sorted(wanted.frame_id)
    assert sum(entry["count"] for entry in index["shards"]) == len(wanted)


@pytest.mark.parametrize("bucket_rows", [SHUFFLE_BUCKET_ROWS, 100])
def test_the_plan_made_movie_by_movie_and_bucket_by_bucket_is_the_whole_manifests(synthetic_copy, tmp_path,
                                                                                  monkeypatch, bucket_rows):
    """Each tar's samples, planned from one movie's frames at a time, then from one bucket of the
    shuffle at a time, and read by its writer from its samples file, are those of the plan made from
    the whole manifest at once: the kept frames with a JPEG, split by film, in the order of their
    shuffle keys, cut every `maxcount`. Buckets of 100 frames: the plan never holds more than one,
    and reads each once."""
    work = synthetic_copy
    monkeypatch.setattr(shard_module, "SHUFFLE_BUCKET_ROWS", bucket_rows)
    held = []
    monkeypatch.setattr(shard_module, "_shuffled_bucket", lambda path: held.append(
        pa.ipc.open_stream(path).read_all().num_rows) or _shuffled_bucket(path))
    index = shard(work, tmp_path / "shards", ShardSettings(maxcount=300), runner=LocalRunner(1))
    frames = manifest(work).assign(parsing=None)
    kept = frames[frames.kept.astype(bool) & frames.jpeg.notna()]
    kept = kept.assign(key=shuffle_keys(kept.frame_id.tolist(), 0)).sort_values(["key", "frame_id"])
    assert max(held) <= (len(kept) if bucket_rows == SHUFFLE_BUCKET_ROWS else 3 * bucket_rows)
    assert sum(held) == len(kept)  # every bucket read once, for both splits
    split = kept.movie_id.map(split_films(Counter(kept.movie_id), ShardSettings().test_fraction, 0,
                                          index["near_duplicates"]))
    for name in ("train", "test"):
        part = kept[split == name]
        tars = [entry for entry in index["shards"] if entry["split"] == name]
        planned = [planned_columns(work, Path(tar["name"]).stem) for tar in tars]
        assert [len(rows["frame_id"]) for rows in planned] == [tar["count"] for tar in tars] == \
            [min(300, len(part) - start) for start in range(0, len(part), 300)]
        for column in ("frame_id", "movie_id", "timestamp", "label", "jpeg", "jpeg_xxh3"):
            assert [value for rows in planned for value in rows[column]] == part[column].tolist(), column
        boxes = [None if not isinstance(b, (list, np.ndarray)) else [[float(v) for v in box] for box in b]
                 for b in part.boxes]
        assert [value for rows in planned for value in rows["boxes"]] == boxes
    assert not (work.stage_dir("shard") / "shuffle").exists()  # the buckets are gone once planned
    written = work.read_table("shard")
    assert sorted(written.frame_id) == sorted(kept.frame_id)
