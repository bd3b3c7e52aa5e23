import json

import numpy as np
import pytest
from click.testing import CliRunner

from mhmd_builder.cli import main
from mhmd_builder.extract import extract
from mhmd_builder.footage import (INDEX_CANDIDATES, MAX_DISTANCE, MIN_SHARE, RANGE_HASHES, _candidate_pairs, _nearest,
                                  _queries, _ruled_out_after, duplicate_groups, near_duplicates, reaches, share)
from mhmd_builder import footage
from mhmd_builder.manifest import manifest
from mhmd_builder.runners import LocalRunner
from mhmd_builder.shard import ShardSettings, shard
from mhmd_builder.workdir import WorkDir

from conftest import ffmpeg


def test_a_re_encode_and_a_cut_are_near_duplicates_kept_in_the_split_of_their_original(tmp_path, movie_factory):
    original = movie_factory("b-original.mp4", seconds=10, size="320x240")
    folder = movie_factory.folder
    ffmpeg("-i", str(original), "-c:v", "libx264", "-crf", "30", "-vf", "scale=480:360", str(folder / "d-re-encoded.mp4"))
    ffmpeg("-ss", "2", "-i", str(original), "-c:v", "libx264", "-crf", "23", str(folder / "a-cut.mkv"))  # 8 s of 10
    ffmpeg("-f", "lavfi", "-i", "mandelbrot=size=320x240:rate=25", "-t", "10", "-pix_fmt", "yuv420p",
           str(folder / "c-mandelbrot.mp4"))
    movie_factory("e-pattern.mp4", seconds=10, size="320x240", source="testsrc")
    work = WorkDir(tmp_path / "work")
    ids = {o.path.split("/")[-1]: o.movie_id for o in extract([folder], work, runner=LocalRunner(1))}
    assert len(set(ids.values())) == 5

    group = sorted(ids[name] for name in ("b-original.mp4", "d-re-encoded.mp4", "a-cut.mkv"))
    assert near_duplicates(manifest(work)) == [group]  # the two other films are not grouped
    splits = set()
    for seed in range(8):
        index = shard(work, tmp_path / f"s{seed}", ShardSettings(test_fraction=0.9, seed=seed))
        assert index["near_duplicates"] == [group]
        in_split = {split: {s["movie_id"] for s in _samples(work, split)} for split in ("train", "test")}
        (split,) = [split for split, movies in in_split.items() if movies & set(group)]
        assert set(group) <= in_split[split]
        splits.add(split)
    assert splits == {"train", "test"}  # the group went to either split, always whole

    result = CliRunner().invoke(main, ["shard", "-w", str(work.root), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert f"near-duplicate films, kept in one split: {', '.join(group)}" in result.output
    assert json.loads((tmp_path / "cli" / "index.json").read_text())["near_duplicates"] == [group]


def _samples(work: WorkDir, split: str) -> list[dict]:
    """The shard stage's records of the last shard run: which frame of which movie went to `split`."""
    table = work.read_table("shard")
    return table[table.split == split].to_dict("records")


@pytest.mark.parametrize("near", [0, 64, 191, 192, 193, 256])
@pytest.mark.parametrize("where", ["first", "last", "spread"])
def test_reaches_is_share_at_the_threshold_wherever_the_near_hashes_are(near, where):
    rng = np.random.default_rng(near)
    a = np.unique(rng.integers(0, 2**63, 300, dtype=np.uint64))[:256]  # 256 queries: all of a, in order
    picked = {"first": np.arange(near), "last": np.arange(256 - near, 256),
              "spread": np.sort(rng.permutation(256)[:near])}[where]
    flips = np.uint64(0b1111111111) << np.uint64(7)  # 10 bits: still near (MAX_DISTANCE)
    far = rng.integers(0, 2**63, 5000, dtype=np.uint64)
    far = far[[np.bitwise_count(a ^ h).min() > MAX_DISTANCE for h in far]]
    b = np.concatenate([a[picked] ^ flips, far])
    assert share(a, b) == near / 256
    assert reaches(a, b) == (near >= 192) == (share(a, b) >= MIN_SHARE)


@pytest.mark.parametrize("workers", [1, 3])
def test_groups_are_the_connected_near_duplicates_on_any_number_of_threads(workers):
    """Films compared on threads group as one by one: a chain of copies is one group, whichever pair
    is found first; an unrelated film stays alone."""
    rng = np.random.default_rng(1)
    films = {name: np.unique(rng.integers(0, 2**63, 400, dtype=np.uint64)) for name in ("a", "c", "e")}
    flip = np.uint64(0b111) << np.uint64(40)  # 3 bits: a re-encode
    prints = {"a": films["a"], "b": films["a"] ^ flip, "d": films["a"] ^ (flip << np.uint64(3)),
              "c": films["c"], "c2": np.sort(films["c"] ^ np.uint64(1)), "e": films["e"]}
    assert duplicate_groups(prints, workers) == [["a", "b", "d"], ["c", "c2"]]


def _flips(bits: list[int]) -> np.uint64:
    """A mask of bits[i] low bits set in each 16-bit piece i (the index's pieces)."""
    return np.uint64(sum(((1 << n) - 1) << (16 * i) for i, n in enumerate(bits)))


@pytest.mark.parametrize("most, per_range", [(INDEX_CANDIDATES, RANGE_HASHES), (7, 100)])  # many spans, ranges
def test_the_hash_index_finds_exactly_the_pairs_reaches_does_not_rule_out_at_once(monkeypatch, most, per_range):
    """A pair is a candidate when one of each film's first queries lies within MAX_DISTANCE bits of
    the other's hashes: found through the 16-bit pieces whichever pieces the differing bits fall in
    (10 bits spread 3+3+2+2 or 0+0+5+5: still near; 11 bits 3+3+3+2: not), as comparing every pair
    finds them."""
    monkeypatch.setattr(footage, "INDEX_CANDIDATES", most)
    monkeypatch.setattr(footage, "RANGE_HASHES", per_range)  # 100: the index built over 15 ranges of each piece
    rng = np.random.default_rng(2)
    films = [np.unique(rng.integers(0, 2**63, size, dtype=np.uint64)) for size in (300, 40, 700, 5, 300, 1)]
    films[1] = np.unique(np.concatenate([films[1], films[0][:3] ^ _flips([3, 3, 2, 2])]))  # near 0 both ways?
    films[3] = np.unique(films[2][:5] ^ _flips([0, 0, 5, 5]))  # a few of 2's frames, 10 bits off
    films[4] = np.unique(np.concatenate([films[4][:200], films[2][:100] ^ _flips([3, 3, 3, 2])]))  # 11 bits: never
    films[5] = films[3][:1] ^ _flips([2, 2, 2, 2])  # 8 bits from one of 3's

    def first_queries_hit(a, b) -> bool:
        query = _queries(films[a])[:_ruled_out_after(min(len(films[a]), 256))]
        return bool((_nearest(query, films[b]) <= MAX_DISTANCE).any())

    brute = {(a, b) for a in range(len(films)) for b in range(a + 1, len(films))
             if first_queries_hit(a, b) and first_queries_hit(b, a)}
    assert _candidate_pairs(films, workers=2) == brute
    assert {(2, 3), (3, 5)} <= brute and not {pair for pair in brute if 4 in pair}
