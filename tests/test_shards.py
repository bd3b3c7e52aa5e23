from collections import Counter
import fnmatch
import json
import subprocess
import sys
import tarfile

import pytest

from mhmd_builder.errors import InputError
from mhmd_builder.shards import (INDEX, SHARD_NAME, AtomicTar, NoShardIndex, _tarfile_header, clear_shard_dir, encode_json,
                                 folder_indexes, format_index, has_index, indexed_samples, label_fields,
                                 make_index, member_headers, open_shard, read_index, sample_label, sample_members, shard_urls,
                                 split_entry, tar_name, tar_pattern, with_json, write_index)
from mhmd_builder.taxonomy import load_taxonomy

LABEL = load_taxonomy().by_name("during_ww2/usa/military")


def samples(count: int = 3) -> list[dict]:
    """Samples as `mhmd shard` makes them: every other one labelled, every third with a mask."""
    out = []
    for i in range(count):
        label = LABEL if i % 2 == 0 else None
        meta = {"frame_id": f"film-0123abcd_{i}", **label_fields(label, "human", 1.0)}
        files = {"jpg": bytes([i]) * (100 + i), **({"mask.png": b"png" * (i + 1)} if i % 3 == 0 else {})}
        out.append(sample_members(meta["frame_id"], encode_json(meta), meta["label_id"], files))
    return out


def write_tar(path, items, at_once: bool = False) -> bytes:
    """`items` written one sample at a time, or all in one `write_many` (by column)."""
    with AtomicTar(path) as tar:
        if at_once:
            names = sorted({name for sample in items for name in sample if name[0] != "_"})
            tar.write_many([sample["__key__"] for sample in items],
                           {name: [sample.get(name) for sample in items] for name in names})
        for sample in items if not at_once else []:
            tar.write(sample)
    return path.read_bytes()


def test_tar_names_and_their_pattern():
    assert tar_name("train", 0) == "train-000000.tar" and tar_name("test", 12) == "test-000012.tar"
    assert fnmatch.fnmatch(tar_name("train", 3), tar_pattern("train"))
    assert not fnmatch.fnmatch(tar_name("test", 3), tar_pattern("train"))
    assert SHARD_NAME.match(tar_name("test", 7)) and not SHARD_NAME.match("val-000000.tar")


def test_a_tar_written_twice_is_byte_identical_and_reads_back_member_for_member(tmp_path):
    first = write_tar(tmp_path / tar_name("train", 0), samples())
    assert write_tar(tmp_path / "again.tar", samples()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.tar", "train-000000.tar"]  # no temporary left
    read = list(open_shard(tmp_path / "again.tar"))
    for got, want in zip(read, samples(), strict=True):
        assert {k: v for k, v in got.items() if k == "__key__" or not k.startswith("__")} == want
    assert read[0]["cls"] == str(LABEL.id).encode() and read[1]["cls"] == b"-1"  # every sample has a cls
    assert "mask.png" in read[0] and "mask.png" not in read[1]
    with tarfile.open(tmp_path / "again.tar") as tar:  # fixed metadata: the bytes depend on the samples alone
        assert {(m.mtime, m.uname, m.gname) for m in tar.getmembers()} == {(0, "mhmd", "mhmd")}
        assert tar.getnames()[:3] == ["film-0123abcd_0.cls", "film-0123abcd_0.jpg", "film-0123abcd_0.json"]


def webdataset_tar(path, items) -> bytes:
    """`items` written by webdataset's own TarWriter, as AtomicTar's bytes promise: owner mhmd, time 0,
    no encoder, GNU headers."""
    import webdataset

    with open(path, "wb") as file:
        writer = webdataset.TarWriter(file, user="mhmd", group="mhmd", mtime=0, encoder=False)
        writer.tarstream.format = tarfile.GNU_FORMAT
        for sample in items:
            writer.write(sample)
        writer.close()
    return path.read_bytes()


def odd_samples() -> list[dict]:
    """Samples at the header's edges: keys of other scripts, spaces and slashes, names of 100 bytes
    and over (a GNU long-name member), empty members, sizes around a block and a large one, a
    non-ASCII member name, and a "_" member that is not written."""
    edge = "k" * (100 - len(".json"))  # `<key>.json` exactly 100 bytes: the longest name kept in the header
    return [
        {"__key__": "film-0123abcd_0", "jpg": b"", "json": b"{}", "cls": b"-1"},
        {"__key__": "fïlm ü/ß_1", "jpg": b"\xff" * 511, "json": b"x" * 512, "cls": b"7", "mask.png": b"p" * 513},
        {"__key__": edge, "jpg": b"a" * 1024, "json": b"{}", "cls": b"0"},
        {"__key__": edge + "k", "jpg": b"b", "json": b"{}", "cls": b"0"},  # `.json` at 101 bytes
        {"__key__": "é" * 80 + "_long", "jpg": bytes(range(256)) * 12_000, "json": b"{}", "cls": b"3"},
        {"__key__": "film-0123abcd_9", "__url__": b"not written", "jpg": b"c" * 3, "json": b"{}", "cls": b"1",
         "émask.png": b"q"},
    ]


@pytest.mark.parametrize("at_once", [False, True])
@pytest.mark.parametrize("count", [0, 1, 3, 30])
def test_atomic_tar_writes_the_bytes_of_webdatasets_tar_writer(tmp_path, count, at_once):
    items = odd_samples() + samples(count)
    ours = write_tar(tmp_path / "ours.tar", items, at_once)
    assert ours == webdataset_tar(tmp_path / "theirs.tar", items)
    assert len(ours) % tarfile.RECORDSIZE == 0
    read = list(open_shard(tmp_path / "ours.tar"))  # the real reader
    assert [s["__key__"] for s in read] == [s["__key__"] for s in items]
    for got, want in zip(read, items):
        assert {k: v for k, v in got.items() if not k.startswith("__")} == \
            {k: v for k, v in want.items() if not k.startswith("__")}
    with tarfile.open(tmp_path / "ours.tar") as tar:  # the long name read back whole by tarfile too
        assert f"{'é' * 80}_long.jpg" in tar.getnames()


def test_a_members_header_is_tarfiles_at_the_size_fields_edge():
    """Sizes to 8 GiB - 1 fit the header's 11 octal digits; from 8 GiB tarfile writes base 256
    (members that large are only built as headers here, not written)."""
    members = [(name, size) for size in (0, 7, 8, 8 ** 11 - 1, 8 ** 11, 2 ** 40)
               for name in ("film-0123abcd_0.jpg", "é" * 40 + ".json", "é" * 51)]  # the last: 102 bytes
    headers = member_headers(*zip(*members))
    for (name, size), header in zip(members, headers, strict=True):
        assert header == _tarfile_header(name, size), (name, size)


def test_an_empty_tar_is_that_of_webdataset(tmp_path):
    assert write_tar(tmp_path / "ours.tar", []) == webdataset_tar(tmp_path / "theirs.tar", [])


def test_a_member_that_is_not_bytes_is_refused_and_no_tar_is_left(tmp_path):
    with pytest.raises(TypeError, match="film_0.json: a member is bytes, not str"):
        write_tar(tmp_path / "train-000000.tar", [{"__key__": "film_0", "json": "{}"}])
    assert list(tmp_path.iterdir()) == []


def test_a_key_with_a_dot_is_refused_and_no_tar_is_left(tmp_path):
    dotted = {**samples(1)[0], "__key__": "film.mp4_0"}
    with pytest.raises(InputError, match="'film.mp4_0' holds a dot"):
        write_tar(tmp_path / "train-000000.tar", [dotted])
    assert list(tmp_path.iterdir()) == []


def test_with_json_changes_json_and_cls_only(tmp_path):
    labelled, unlabelled = samples(2)
    relabelled = with_json(labelled, {**json.loads(labelled["json"]), **label_fields(None)})
    assert relabelled["cls"] == b"-1"
    assert relabelled["jpg"] == labelled["jpg"] and relabelled["mask.png"] == labelled["mask.png"]
    assert json.loads(relabelled["json"])["label"] is None
    write_tar(tmp_path / "a.tar", [unlabelled])
    read = next(iter(open_shard(tmp_path / "a.tar")))
    now = with_json(read, {**json.loads(read["json"]), **label_fields(LABEL, "model", 0.5)})
    assert now == {**unlabelled, "json": now["json"], "cls": str(LABEL.id).encode()}


def test_sample_label_reads_cls_of_new_and_old_tars():
    labelled, unlabelled = samples(2)
    assert sample_label(labelled) == LABEL.id and sample_label(unlabelled) is None
    old_format = {k: v for k, v in unlabelled.items() if k != "cls"}  # written before cls was always there
    assert sample_label(old_format) is None
    assert sample_label({**unlabelled, "cls": b"0"}) == 0  # label 0 is a label


def test_index_round_trip_and_a_folder_without_one(tmp_path):
    index = make_index({"seed": 0}, "abc", [(tar_name("train", 0), "train", 2), (tar_name("test", 0), "test", 1)],
                       {"train": split_entry(Counter(["a", "a"]), Counter([LABEL.name, None])),
                        "test": split_entry(Counter(["b"]), Counter([None]))})
    assert not has_index(tmp_path)
    with pytest.raises(NoShardIndex, match=f"{tmp_path}: no index.json"):
        read_index(tmp_path)
    write_index(tmp_path, index)
    assert has_index(tmp_path) and read_index(tmp_path) == index and (tmp_path / INDEX).name == "index.json"
    for split, name, count in (("train", "train-000000.tar", 2), ("test", "test-000000.tar", 1)):  # wids' own
        assert json.loads((tmp_path / f"{split}.wids.json").read_text()) == {
            "__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": [{"url": name, "nsamples": count}]}
    assert index["splits"]["train"] == {"samples": 2, "movies": 1, "labels": {LABEL.name: 1}}
    assert format_index(index, tmp_path).splitlines() == [
        f"train: 2 samples of 1 movies in 1 tars ({tmp_path / 'train-000000.tar'} .. train-000000.tar)",
        f"test: 1 samples of 1 movies in 1 tars ({tmp_path / 'test-000000.tar'} .. test-000000.tar)",
        f"index: {tmp_path / 'index.json'}"]


def test_shard_urls_and_counts_from_the_folder_index(tmp_path):
    for name in (tar_name("train", 0), tar_name("train", 1), tar_name("test", 0)):
        write_tar(tmp_path / name, samples(2))
    urls = shard_urls(tmp_path)
    assert urls == [str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")]
    assert indexed_samples(urls, folder_indexes(urls)) is None  # no index yet
    write_index(tmp_path, make_index({}, "abc", [(tar_name("train", 0), "train", 2), (tar_name("train", 1), "train", 2)], {}))
    assert indexed_samples(urls, folder_indexes(urls)) == 4
    assert not (tmp_path / "test.wids.json").exists()  # a split without tars: no wids index (wids refuses one)
    assert indexed_samples(shard_urls(tmp_path, "test"), folder_indexes(urls)) is None  # not listed


def test_clear_shard_dir_keeps_what_it_is_told_and_refuses_other_files(tmp_path):
    for name in (tar_name("train", 0), tar_name("train", 1), INDEX, "train.wids.json", ".train-000002.tar.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".relabel").mkdir()  # the records of a stopped relabel
    clear_shard_dir(tmp_path, keep={tar_name("train", 1)})
    assert [p.name for p in tmp_path.iterdir()] == ["train-000001.tar"]
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not shards"):
        clear_shard_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "train-000001.tar"]


def test_reading_an_index_or_writing_a_tar_does_not_import_webdataset(tmp_path):
    # webdataset imports torch (seconds, 0.4 GB): the report and the CLI read indexes, and shard
    # writes its tars, without it
    code = ("import sys; from pathlib import Path; from mhmd_builder import cli, report, shard, shards; "
            f"tar = shards.AtomicTar(Path({str(tmp_path / 'a.tar')!r})); tar.write({samples(1)[0]!r}); tar.close(); "
            "assert 'webdataset' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "a.tar").stat().st_size == tarfile.RECORDSIZE
