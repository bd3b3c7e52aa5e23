"""Near-duplicate films: one film under two files that are not byte for byte the same (a
re-encode, another scale, a cut), found from what extract recorded, without decoding again.

A movie's fingerprint is the set of perceptual hashes (`quality.phash`, the extract table's
`phash_hi` / `phash_lo`) of its sampled frames that passed quality: black fades, title cards and
other frames every film has would otherwise look shared. Two movies are near-duplicates when, both
ways, at least MIN_SHARE of one's hashes lie within MAX_DISTANCE bits of one of the other's; groups
are the connected movies. Measured both ways, a film that merely shares some shots with another
(a reused scene, the same photo) is not grouped, while a re-encode (share ~1) or a cut of a few
minutes (the share of the film that was left) is. Most pairs of films share no frame: an index of
the films' hashes by their 16-bit pieces finds the few pairs worth comparing, instead of passing over
every pair's hashes.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .devices import machine_cores

# The same picture re-encoded or scaled stays within a few bits of 64; a frame sampled a fraction of
# a second off (a cut does not keep the sampling instants) moves a few more; unrelated frames differ
# in about 32.
MAX_DISTANCE = 10
MIN_SHARE = 0.75
QUERY_HASHES = 256  # hashes of one movie looked up in the other: bounds the cost of a pair
CHUNK = 8192  # hashes of the other movie compared at once: bounds the memory
# The index of every movie's hashes by their four 16-bit pieces: two hashes within MAX_DISTANCE bits
# differ in at most MAX_DISTANCE // 4 = 2 bits of one piece (pigeonhole), so a query's neighbours
# are among the hashes whose piece is one of the 137 values within 2 bits of the query's.
PIECE_BITS = (16, 16, 16, 16)
PIECE_RADIUS = MAX_DISTANCE // len(PIECE_BITS)
# The index holds one range of a piece's values at a time, those that share their bits above these
# (16 ranges of a piece, on as many threads): the start of each value's hashes (4,096 of them, 16 KB)
# stays in the CPU's cache while the probes look them up in no order.
RANGE_BITS = 12
PROBES = 1 << 20  # probes (a query's piece XOR a nearby value) made at once: bounds their memory (~20 MB)
INDEX_CANDIDATES = 1 << 18  # hashes compared with queries at once, a thread: bounds the lookup's memory (~15 MB)


def fingerprints(frames: pa.Table) -> dict[str, np.ndarray]:
    """movie_id -> the distinct hashes (uint64) of its frames that passed quality (no flags; null
    flags, unknown, do not pass)."""
    if "phash_hi" not in frames.column_names:
        return {}
    passed = frames.filter(pc.equal(pc.list_value_length(frames["flags"]), 0))
    hi, lo = (passed[name].to_numpy(zero_copy_only=False).astype(np.uint64) for name in ("phash_hi", "phash_lo"))
    hashes = (hi << np.uint64(32)) | lo
    movies = pc.dictionary_encode(passed["movie_id"]).combine_chunks()  # not numpy's sort of Python strings
    which = movies.indices.to_numpy()
    return {movie: np.unique(hashes[which == i]) for i, movie in enumerate(movies.dictionary.to_pylist())}


def share(a: np.ndarray, b: np.ndarray) -> float:
    """The share of a's hashes (QUERY_HASHES of them at most, evenly spread) within MAX_DISTANCE
    bits of one of b's."""
    return float(np.mean(_nearest(_queries(a), b) <= MAX_DISTANCE))


def reaches(a: np.ndarray, b: np.ndarray) -> bool:
    """share(a, b) >= MIN_SHARE, from the fewest queries that can rule it out first: most pairs of
    films share no frame, and a query costs a pass over all of b's hashes."""
    query = _queries(a)
    first = _ruled_out_after(len(query))  # all of these missing rules it out
    hits = int(np.sum(_nearest(query[:first], b) <= MAX_DISTANCE))
    if not hits:
        return False
    return (hits + int(np.sum(_nearest(query[first:], b) <= MAX_DISTANCE))) / len(query) >= MIN_SHARE


def _queries(a: np.ndarray) -> np.ndarray:
    return a[np.linspace(0, len(a) - 1, min(len(a), QUERY_HASHES)).astype(int)]


def _nearest(query: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distance in bits from each query hash to the nearest of b's."""
    nearest = np.full(len(query), 64)
    for start in range(0, len(b), CHUNK):
        distances = np.bitwise_count(query[:, None] ^ b[None, start:start + CHUNK])
        nearest = np.minimum(nearest, distances.min(axis=1))
    return nearest


def near_duplicates(frames: pd.DataFrame) -> list[list[str]]:
    """Groups of near-duplicate movies (each sorted, the groups in order of their first id)."""
    columns = [c for c in ("movie_id", "flags", "phash_hi", "phash_lo") if c in frames]
    return duplicate_groups(fingerprints(pa.Table.from_pandas(frames[columns], preserve_index=False)))


def duplicate_groups(prints: dict[str, np.ndarray], workers: int | None = None) -> list[list[str]]:
    """`near_duplicates` of the movies' fingerprints (`fingerprints`, of one movie or several). A
    film's near duplicates may be anywhere, but most pairs share no frame: the pairs that `reaches`
    would not rule out at once both ways are found through an index of the hashes by their pieces
    (`_candidate_pairs`), and only those are compared, by `workers` threads (default: one per core;
    numpy lets go of the GIL while it compares)."""
    movies = sorted(prints)
    workers = workers or machine_cores()
    pairs = sorted(_candidate_pairs([prints[movie] for movie in movies], workers))

    def both_ways(pair: tuple[int, int]) -> bool:
        a, b = (prints[movies[i]] for i in pair)
        return reaches(a, b) and reaches(b, a)

    with ThreadPoolExecutor(workers) as pool:
        near = [(movies[a], movies[b]) for (a, b), found in zip(pairs, pool.map(both_ways, pairs)) if found]
    group = {movie: {movie} for movie in movies}
    for a, b in near:
        merged = group[a] | group[b]
        group.update({movie: merged for movie in merged})
    return [list(g) for g in sorted({tuple(sorted(g)) for g in group.values() if len(g) > 1})]


def _candidate_pairs(prints: list[np.ndarray], workers: int = 1) -> set[tuple[int, int]]:
    """Pairs (a, b), a < b, of movies (their places in `prints`) where one of a's first queries (those
    `reaches` tries before it can rule a pair out) lies within MAX_DISTANCE bits of one of b's hashes,
    and one of b's of one of a's: exactly the pairs `reaches` does not rule out at once both ways.
    Found through an index of the hashes by one piece and one range of its values at a time
    (`_PieceIndex`), the ranges on `workers` threads."""
    if len(prints) < 2:
        return set()
    firsts = [_queries(p)[:_ruled_out_after(min(len(p), QUERY_HASHES))] for p in prints]
    queries, asker = np.concatenate(firsts), np.repeat(np.arange(len(prints), dtype=np.int32), [len(q) for q in firsts])
    hashes, ends = np.concatenate(prints), np.cumsum([len(p) for p in prints])
    hits: set[tuple[int, int]] = set()
    with ThreadPoolExecutor(workers) as pool:
        for shift, bits in zip(np.cumsum([0, *PIECE_BITS[:-1]]).tolist(), PIECE_BITS):
            piece = _PieceIndex(hashes, ends, queries, asker, shift, bits)
            for found in pool.map(piece.range_hits, range(piece.ranges)):
                hits |= found
            del piece  # before the next piece's
    return {(a, b) for a, b in hits if a < b and (b, a) in hits}


def _piece(hashes: np.ndarray, shift: int, bits: int) -> np.ndarray:
    """The piece of `bits` bits at `shift` of each hash, as int32."""
    return ((hashes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int32)


def _near_values(bits: int) -> np.ndarray:
    """The values of `bits` bits with at most PIECE_RADIUS bits set, in order (a piece XOR one: its
    neighbours)."""
    return np.array(sorted(sum(1 << b for b in chosen) for n in range(PIECE_RADIUS + 1)
                           for chosen in combinations(range(bits), n)), np.int32)


class _PieceIndex:
    """The lookups of every query's probes (its piece XOR a nearby value) in the hashes by one piece
    (`bits` at `shift`), a range of the piece's values at a time: a range holds the values of the
    same top bits (those above RANGE_BITS). A probe's top bits are its query's XOR its nearby
    value's, so a range takes the nearby values of each top bits from the queries whose top bits
    XOR those make its own."""

    def __init__(self, hashes: np.ndarray, ends: np.ndarray, queries: np.ndarray, asker: np.ndarray,
                 shift: int, bits: int):
        # ends: where each movie's hashes end in `hashes`
        self.hashes, self.ends, self.queries, self.asker, self.shift = hashes, ends, queries, asker, shift
        self.low = low = min(bits, RANGE_BITS)
        self.ranges = 1 << (bits - low)
        near = _near_values(bits)
        self.near_tops = np.unique(near >> low).tolist()
        self.near = [near[(near >> low) == top] & ((1 << low) - 1) for top in self.near_tops]
        pieces = _piece(queries, shift, bits)
        self.low_pieces = pieces & ((1 << low) - 1)
        self.queries_by_top, self.query_tops = _by_top(pieces >> low, self.ranges)
        self.hash_tops = _tops(hashes, shift + low, bits - low)

    def range_hits(self, top: int) -> set[tuple[int, int]]:
        """(asking movie, other movie) of the queries within MAX_DISTANCE bits of another movie's
        hash through the range of top bits `top`: its index, then its probes, PROBES at most at once."""
        here = np.flatnonzero(self.hash_tops == top)  # a pass over 2 bytes a hash: no order of them all held
        owner = np.searchsorted(self.ends, here, side="right").astype(np.int32)
        index, hits = _RangeIndex(self.hashes[here], owner, self.shift, self.low), set()
        for near_top, nearby in zip(self.near_tops, self.near):
            start = top ^ near_top  # the queries of these top bits
            asking = self.queries_by_top[self.query_tops[start]:self.query_tops[start + 1]]
            block = max(1, PROBES // len(nearby))
            for first in range(0, len(asking), block):
                asks = asking[first:first + block]
                probes = index.probe(np.repeat(asks, len(nearby)), (self.low_pieces[asks][:, None] ^ nearby[None, :]).ravel())
                for span in _spans(probes.ends, INDEX_CANDIDATES):
                    hits |= index.hits(probes, self.queries, self.asker, *span)
        return hits


def _tops(hashes: np.ndarray, shift: int, bits: int) -> np.ndarray:
    """`_piece` of every hash as uint16 (bits: 16 at most), PROBES hashes at a time: no temporary
    array as large as all the hashes."""
    tops = np.empty(len(hashes), np.uint16)
    for start in range(0, len(hashes), PROBES):
        tops[start:start + PROBES] = _piece(hashes[start:start + PROBES], shift, bits)
    return tops


def _by_top(tops: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The places of `tops` (values below `count`) in order of their value, and where each value's
    places start there (count + 1 of them)."""
    order = np.argsort(tops.astype(np.uint16), kind="stable")  # a radix sort
    return order, np.searchsorted(tops[order], np.arange(count + 1))


@dataclass
class _Probes:
    """Probes of a range's index: the query of each, and the run of the index's hashes that are its
    candidates (start, length; `ends`: candidates up to each probe)."""

    query: np.ndarray
    lo: np.ndarray
    lengths: np.ndarray
    ends: np.ndarray


class _RangeIndex:
    """Hashes whose pieces (`low` bits at `shift`, the range's part of a piece) are sorted: each
    probe's candidates (the hashes of its value) are a run of them."""

    def __init__(self, hashes: np.ndarray, owner: np.ndarray, shift: int, low: int):
        values = _piece(hashes, shift, low)
        order = np.argsort(values.astype(np.uint16), kind="stable")  # a radix sort (RANGE_BITS is under 16)
        self.hashes, self.owner = hashes[order], owner[order]
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(values, minlength=1 << low))]).astype(np.int32)

    def probe(self, asking: np.ndarray, values: np.ndarray) -> _Probes:
        """The probes of values (their places in the range) asked by queries `asking`."""
        lo = self.starts[values]
        lengths = self.starts[values + 1] - lo
        return _Probes(asking, lo, lengths, np.cumsum(lengths))

    def hits(self, probes: _Probes, queries: np.ndarray, asker: np.ndarray, first: int, last: int) -> set[tuple[int, int]]:
        """(asking movie, other movie) of each query of probes first..last-1 within MAX_DISTANCE bits
        of a candidate of another movie."""
        count = probes.lengths[first:last]
        ends = probes.ends[first:last] - (probes.ends[first - 1] if first else 0)  # candidates up to each probe here
        if not ends[-1]:
            return set()
        at = np.repeat(probes.lo[first:last] - (ends - count), count) + np.arange(ends[-1])  # each probe's run
        asked = np.repeat(queries[probes.query[first:last]], count)  # each candidate's query
        near = np.flatnonzero(np.bitwise_count(self.hashes[at] ^ asked) <= MAX_DISTANCE)
        which = probes.query[first:last][np.searchsorted(ends, near, side="right")]
        found = np.unique(np.stack([asker[which], self.owner[at[near]]], axis=1), axis=0)
        return set(map(tuple, found[found[:, 0] != found[:, 1]].tolist()))


def _spans(ends: np.ndarray, most: int) -> list[tuple[int, int]]:
    """Consecutive spans [first, last) of items whose cumulative sizes are `ends`, each of at most
    `most` in size (or one item, when an item alone is larger)."""
    spans, first = [], 0
    while first < len(ends):
        base = ends[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(ends, base + most, side="right")))
        spans.append((first, last))
        first = last
    return spans


def _ruled_out_after(queries: int) -> int:
    """How many of `queries` query hashes must all miss for a share of MIN_SHARE to be out of reach."""
    return queries - math.ceil(MIN_SHARE * queries) + 1
