import json
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from click.testing import CliRunner

from mhmd_builder.cli import main
from mhmd_builder.images import load_frame
from mhmd_builder.labeler import Labeler
from mhmd_builder.labeler_train import TrainSettings, train
from mhmd_builder.labels import write_human_labels
from mhmd_builder.manifest import manifest
from mhmd_builder.relabel import RelabelError, RelabelSettings, format_changes, relabel
from mhmd_builder.shard import ShardSettings, shard
from mhmd_builder.shards import NoShardIndex
from mhmd_builder.taxonomy import load_taxonomy

from test_labeler import constant_checkpoint, softmax
from test_sample import copy_films

TAXONOMY = load_taxonomy()
HUMAN = "during_ww2/usa/military"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The two detected films, every other kept frame labelled by hand, a tiny labeler trained on
    those labels, and the frames sharded (the others without a label): made once for the module,
    read only by its tests (each writes its new shards into its own tmp_path)."""
    folder = tmp_path_factory.mktemp("labelled")
    work = copy_films(tmp_path_factory, folder)
    kept = manifest(work).query("kept").sort_values("frame_id")
    human = kept.iloc[::2]
    names = [HUMAN if i % 3 else "after_ww2/china/informal" for i in range(len(human))]
    write_human_labels(work, pd.DataFrame({"frame_id": human.frame_id, "label": names,
                                           "label_id": [TAXONOMY.by_name(n).id for n in names],
                                           "source": "t.csv", "line": range(len(human))}))
    checkpoint = folder / "ckpt" / "l.safetensors"
    train(work, TrainSettings(arch="resnet18", weights="none", image_size=64, epochs=1, batch_size=8,
                              device="cpu", output=str(checkpoint)), TAXONOMY)
    shard(work, folder / "shards", ShardSettings(maxcount=4, test_fraction=0.3, seed=2), TAXONOMY)
    return work, checkpoint, folder


def read_all(folder):
    index = json.loads((folder / "index.json").read_text())
    return index, [s for e in index["shards"] for s in wds.WebDataset(str(folder / e["name"]), shardshuffle=False)]


def expected_labels(work, checkpoint, frame_ids):
    """What the checkpoint says of each frame, read from the work directory's own JPEGs and boxes."""
    labeler = Labeler(checkpoint, TAXONOMY, "cpu")
    frames = manifest(work).set_index("frame_id")
    batch = [({"frame_id": f, "movie_id": ""}, labeler.image(load_frame(work.root / frames.jpeg[f]), frames.boxes[f]))
             for f in frame_ids]
    return {row["frame_id"]: row["label"] for row in labeler.predict_batch(batch, None)}


def test_relabel_keeps_images_and_human_labels_and_labels_the_rest(labelled, tmp_path):
    work, checkpoint, tmp = labelled
    index = relabel(tmp / "shards", checkpoint, tmp_path / "new", RelabelSettings(device="cpu", batch_size=3), TAXONOMY)
    old_index, old = read_all(tmp / "shards")
    new_index, new = read_all(tmp_path / "new")
    assert [e["name"] for e in new_index["shards"]] == [e["name"] for e in old_index["shards"]]
    assert [s["__key__"] for s in new] == [s["__key__"] for s in old]  # same tars, same order
    for wids_index in ("train.wids.json", "test.wids.json"):  # the same tars: the same wids indexes
        assert (tmp_path / "new" / wids_index).read_text() == (tmp / "shards" / wids_index).read_text()
    predicted = expected_labels(work, checkpoint, [s["__key__"] for s in old])
    for before, after in zip(old, new):
        assert after["jpg"] == before["jpg"]  # byte for byte
        was, now = json.loads(before["json"]), json.loads(after["json"])
        if was["label_source"] == "human":
            assert now == was and after["cls"] == before["cls"]
        else:
            assert was["label"] is None and before["cls"] == b"-1"
            label = TAXONOMY.by_name(predicted[after["__key__"]])
            assert (now["label"], now["label_source"], int(after["cls"])) == (label.name, "model", label.id)
            assert now["era"] == label.era and 0 < now["label_confidence"] <= 1
            assert {k: v for k, v in now.items() if not k.startswith(("label", "era", "nation", "garment"))} == \
                {k: v for k, v in was.items() if not k.startswith(("label", "era", "nation", "garment"))}
    changed = sum(c["count"] for c in index["relabel"]["changes"] if c["from"] != c["to"])
    assert changed == sum(json.loads(s["json"])["label_source"] is None for s in old) > 0
    assert f"{changed} of {len(old)} labels changed" in format_changes(index["relabel"]["changes"])
    labels_after = sum(sum(split["labels"].values()) for split in new_index["splits"].values())
    assert labels_after == len(new)


def test_older_model_labels_are_replaced_and_every_change_is_counted(labelled, tmp_path):
    work, checkpoint, tmp = labelled
    settings = RelabelSettings(device="cpu", batch_size=4)
    relabel(tmp / "shards", checkpoint, tmp_path / "new", settings, TAXONOMY)  # every frame labelled, some by the model
    logits = np.random.default_rng(0).normal(0, 2, len(TAXONOMY))
    logits[TAXONOMY.by_name("after_ww2/russia/formal").id] = 9  # a label the first labeler never gave
    index = relabel(tmp_path / "new", constant_checkpoint(tmp_path / "c.safetensors", logits), tmp_path / "again",
                    settings, TAXONOMY)
    (_, before), (_, after) = read_all(tmp_path / "new"), read_all(tmp_path / "again")
    was, now = [json.loads(s["json"]) for s in before], [json.loads(s["json"]) for s in after]
    assert {m["label_source"] for m in was} == {"human", "model"}
    for old, new in zip(was, now, strict=True):
        if old["label_source"] == "human":
            assert new == old
        else:
            assert (new["label"], new["label_source"]) == ("after_ww2/russia/formal", "model")
            assert new["label_confidence"] == pytest.approx(softmax(logits).max(), abs=1e-6)
    changes = Counter((old["label"], new["label"]) for old, new in zip(was, now))
    assert {(c["from"], c["to"]): c["count"] for c in index["relabel"]["changes"]} == changes
    assert index["relabel"]["override_human"] is False


def test_override_human_replaces_every_label_and_runs_from_the_cli(labelled, tmp_path):
    work, checkpoint, tmp = labelled
    result = CliRunner().invoke(main, ["relabel", str(tmp / "shards"), "--checkpoint", str(checkpoint),
                                       "-o", str(tmp_path / "all"), "--override-human", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    _, new = read_all(tmp_path / "all")
    predicted = expected_labels(work, checkpoint, [s["__key__"] for s in new])
    assert all(json.loads(s["json"])["label_source"] == "model" for s in new)
    assert {s["__key__"]: json.loads(s["json"])["label"] for s in new} == predicted
    assert "labels changed" in result.output and HUMAN in result.output
    assert json.loads((tmp_path / "all" / "index.json").read_text())["relabel"]["override_human"] is True


def test_relabel_refuses_what_it_cannot_do_and_leaves_the_source_alone(labelled, tmp_path):
    work, checkpoint, tmp = labelled
    before = {p.name: p.read_bytes() for p in (tmp / "shards").iterdir()}
    with pytest.raises(NoShardIndex, match="not a folder written by `mhmd shard`"):
        relabel(tmp / "ckpt", checkpoint, tmp_path / "x", taxonomy=TAXONOMY)
    with pytest.raises(RelabelError, match="not the source folder"):
        relabel(tmp / "shards", checkpoint, tmp / "shards", taxonomy=TAXONOMY)
    with pytest.raises(RelabelError, match="relabel writes a local folder, not object storage"):
        relabel(tmp / "shards", checkpoint, "s3://bucket/prefix", taxonomy=TAXONOMY)
    other = tmp_path / "tax.csv"
    other.write_text((TAXONOMY.source and open(TAXONOMY.source).read()).replace("informal", "casual"))
    with pytest.raises(RelabelError, match="another taxonomy"):
        relabel(tmp / "shards", checkpoint, tmp_path / "x", taxonomy=load_taxonomy(other))
    assert {p.name: p.read_bytes() for p in (tmp / "shards").iterdir()} == before

    shutil.copytree(tmp / "shards", tmp_path / "gone")
    tars = sorted(p.name for p in (tmp_path / "gone").glob("*.tar"))
    (tmp_path / "gone" / tars[0]).unlink()  # a tar listed in the index but gone: that tar fails, said so
    with pytest.raises(RelabelError, match=f"1 of {len(tars)} shards could not be relabelled; first: "
                                           f"{tars[0]}: .*listed in index.json but missing"):
        relabel(tmp_path / "gone", checkpoint, tmp_path / "again", RelabelSettings(device="cpu"), TAXONOMY)


def test_a_sample_whose_json_boxes_are_malformed_fails_its_shard_in_one_line(labelled, tmp_path):
    import io
    import tarfile

    from mhmd_builder.labeler import build_model
    from test_labeler import checkpoint_of

    _, _, tmp = labelled
    shutil.copytree(tmp / "shards", tmp_path / "hostile")
    first = sorted((tmp_path / "hostile").glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_key = next(m.name for m, _ in members if m.name.endswith(".json")).removesuffix(".json")
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            if member.name == f"{bad_key}.json":
                data = json.dumps({**json.loads(data), "boxes": "oops"}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    checkpoint = checkpoint_of(build_model("resnet18", len(TAXONOMY)), tmp_path / "p.safetensors", input="persons")
    tars = len(list((tmp_path / "hostile").glob("*.tar")))
    with pytest.raises(RelabelError, match=f"1 of {tars} shards could not be relabelled; first: {first.name}: "
                                           f"RelabelError: {first.name}: sample {bad_key}: person boxes 'oops' "
                                           r"are not a list of \[x0, y0, x1, y1\] numbers$"):
        relabel(tmp_path / "hostile", checkpoint, tmp_path / "new", RelabelSettings(device="cpu", override_human=True),
                TAXONOMY)


def test_relabel_on_ray_actors_writes_the_same_shards(labelled, ray_cluster, tmp_path):
    from mhmd_builder.runners import RayRunner

    work, checkpoint, tmp = labelled
    settings = RelabelSettings(device="cpu", batch_size=4)
    local = relabel(tmp / "shards", checkpoint, tmp_path / "local", settings, TAXONOMY)
    on_ray = relabel(tmp / "shards", checkpoint, tmp_path / "ray", settings, TAXONOMY, RayRunner(workers=2))
    assert on_ray["relabel"]["changes"] == local["relabel"]["changes"]
    files = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "ray").iterdir()) and ".relabel" not in files
    for name in files:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name



def test_a_persons_labeler_sees_each_sample_s_persons_box_from_its_json(labelled, tmp_path, monkeypatch):
    import cv2

    from mhmd_builder.labeler import build_model, fit_rgb, model_input
    from mhmd_builder.runners import LocalRunner
    from test_labeler import checkpoint_of

    _, _, tmp = labelled
    checkpoint = checkpoint_of(build_model("resnet18", len(TAXONOMY)), tmp_path / "p.safetensors", input="persons")
    seen, predict_batch = {}, Labeler.predict_batch

    def recording(self, batch, allowed):
        seen.update((frame["frame_id"], image) for frame, image in batch)
        return predict_batch(self, batch, allowed)

    monkeypatch.setattr(Labeler, "predict_batch", recording)
    relabel(tmp / "shards", checkpoint, tmp_path / "new", RelabelSettings(device="cpu", override_human=True),
            TAXONOMY, LocalRunner(1))
    _, samples = read_all(tmp / "shards")
    assert sorted(seen) == sorted(s["__key__"] for s in samples)
    cropped = 0
    for sample in samples:
        frame, boxes = cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR), \
            json.loads(sample["json"])["boxes"]
        assert np.array_equal(seen[sample["__key__"]], model_input(frame, 32, "persons", boxes))
        cropped += not np.array_equal(seen[sample["__key__"]], fit_rgb(frame, 32))
    assert cropped > 0
