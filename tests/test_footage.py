import json

import numpy as np
import pytest
from click.testing import CliRunner

from mhmd_builder.cli import main
from mhmd_builder.extract import extract
from mhmd_builder.footage import (INDEX_CANDIDATES, MAX_DISTANCE, MIN_SHARE, PROBES, RANGE_BITS, _candidate_pairs, _nearest,
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


def _every_pair(films: list[np.ndarray]) -> set[tuple[int, int]]:
    """The pairs `_candidate_pairs` must find, from comparing every pair."""
    def first_queries_hit(a, b) -> bool:
        query = _queries(films[a])[:_ruled_out_after(min(len(films[a]), 256))]
        return bool((_nearest(query, films[b]) <= MAX_DISTANCE).any())

    return {(a, b) for a in range(len(films)) for b in range(a + 1, len(films))
            if first_queries_hit(a, b) and first_queries_hit(b, a)}


@pytest.mark.parametrize("range_bits", [RANGE_BITS, 8])
def test_the_hash_index_finds_the_pairs_of_copies_with_any_bits_flipped(monkeypatch, range_bits):
    """Films that hold copies of others' hashes, each with 6 to 11 bits flipped anywhere: the index
    finds the pairs comparing every pair finds, wherever the bits fall (pieces, ranges, top bits)."""
    monkeypatch.setattr(footage, "RANGE_BITS", range_bits)
    rng = np.random.default_rng(3)
    films = [rng.integers(0, 2**64, 120, dtype=np.uint64) for _ in range(40)]
    for film in films:
        for other in rng.integers(0, len(films), 3):
            bits = [rng.choice(64, rng.integers(6, 12), replace=False) for _ in range(8)]
            film[rng.integers(0, len(film), 8)] = films[other][:8] ^ np.array([sum(1 << int(b) for b in chosen) for chosen in bits], np.uint64)
    films = [np.unique(film) for film in films]
    brute = _every_pair(films)
    assert len(brute) >= 20
    assert _candidate_pairs(films, workers=2) == brute


def _mask(positions: list) -> np.uint64:
    """A mask of the bits at `positions[i]` of each 16-bit piece i of the index."""
    return np.uint64(sum(1 << (16 * piece + bit) for piece, bits in enumerate(positions) for bit in bits))


def _flips(counts: list[int], at: int = 0) -> np.uint64:
    """A mask of counts[i] bits set from bit `at` of each piece i."""
    return _mask([range(at, at + n) for n in counts])


@pytest.mark.parametrize("most, range_bits, probes", [(INDEX_CANDIDATES, RANGE_BITS, PROBES), (7, 8, 500)])
def test_the_hash_index_finds_exactly_the_pairs_reaches_does_not_rule_out_at_once(monkeypatch, most, range_bits, probes):
    """A pair is a candidate when one of each film's first queries lies within MAX_DISTANCE bits of
    the other's hashes, found through the 16-bit pieces as comparing every pair finds it, whichever
    pieces the differing bits fall in (10 bits spread 1+3+3+3 or 0+3+3+4, 8 bits 2+2+2+2: near; 11
    bits 3+3+3+2: not); near hashes found only through the first or the last value of a range,
    through a probe in another range than its query's, or through the last nearby value of its top
    bits; with candidates, ranges and probes cut small (many spans, 256 ranges of a piece, a few
    queries' probes at a time) as with none."""
    monkeypatch.setattr(footage, "INDEX_CANDIDATES", most)
    monkeypatch.setattr(footage, "RANGE_BITS", range_bits)
    monkeypatch.setattr(footage, "PROBES", probes)
    rng = np.random.default_rng(2)
    films = [np.unique(rng.integers(0, 2**63, size, dtype=np.uint64)) for size in (300, 40, 700, 5, 300, 1)]
    range_firsts = films[0][:3] & ~np.uint64(0xFFF)  # piece 0 the first value of its range
    films[0] = np.unique(np.concatenate([range_firsts, films[0][3:]]))
    films[1] = np.unique(np.concatenate([films[1], range_firsts ^ _mask([[15], range(3), range(3), range(3)])]))
    range_lasts = films[2][:5] | np.uint64(0xFFF)  # piece 0 the last value of its range
    films[2] = np.unique(np.concatenate([range_lasts, films[2][5:]]))
    films[3] = np.unique(range_lasts ^ _flips([0, 3, 3, 4], at=4))  # a few of 2's frames, 10 bits off
    films[4] = np.unique(np.concatenate([films[4][:200], films[2][:100] ^ _flips([3, 3, 3, 2], at=8)]))  # 11 bits: never
    films[5] = films[3][:1] ^ _mask([[11, 15]] * 4)  # 8 bits from one of 3's: the last nearby value of their top bits
    films.append(np.unique(films[0][3:6] ^ _mask([[0], range(4, 7), range(4, 7), range(4, 7)])))  # bit 0 of a piece

    brute = _every_pair(films)
    assert _candidate_pairs(films, workers=2) == brute
    assert {(0, 1), (0, 6), (2, 3), (3, 5)} <= brute and not {pair for pair in brute if 4 in pair}
