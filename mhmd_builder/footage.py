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
# differ in at most MAX_DISTANCE // 4 = 2 bits of one piece (pigeonhole), so a query's neighbours are
# among the hashes whose piece is one of the 137 values within 2 bits of the query's.
PIECES, PIECE_BITS = 4, 16
_NEAR_PIECES = np.array([v for v in range(1 << PIECE_BITS) if v.bit_count() <= MAX_DISTANCE // PIECES], np.int32)
INDEX_CANDIDATES = 1 << 18  # hashes compared with queries at once, a thread: bounds the lookup's memory (~15 MB)
RANGE_HASHES = 1 << 18  # hashes indexed at once (those of one range of a piece's values): bounds the index's memory


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
    Found through an index of the hashes by one piece at a time, over one range of its values at a
    time (about RANGE_HASHES hashes, so that the index's memory does not grow with the films), its
    lookups on `workers` threads."""
    if len(prints) < 2:
        return set()
    firsts = [_queries(p)[:_ruled_out_after(min(len(p), QUERY_HASHES))] for p in prints]
    queries, asker = np.concatenate(firsts), np.repeat(np.arange(len(prints), dtype=np.int32), [len(q) for q in firsts])
    ranges = math.ceil(sum(len(p) for p in prints) / RANGE_HASHES)
    bounds = np.linspace(0, 1 << PIECE_BITS, ranges + 1).astype(np.int32)
    hits: set[tuple[int, int]] = set()
    with ThreadPoolExecutor(workers) as pool:
        for piece in range(PIECES):
            shift = np.uint64(piece * PIECE_BITS)
            probes = (_piece(queries, shift)[:, None] ^ _NEAR_PIECES[None, :]).ravel()  # each query's 137, in order
            for low, high in zip(bounds[:-1], bounds[1:]):
                here = np.flatnonzero((probes >= low) & (probes < high))
                index = _RangeIndex(prints, shift, int(low), int(high), probes[here], (here // len(_NEAR_PIECES)))
                for found in pool.map(lambda span: index.hits(queries, asker, *span), _spans(index.ends, INDEX_CANDIDATES)):
                    hits |= found
    return {(a, b) for a, b in hits if a < b and (b, a) in hits}


def _piece(hashes: np.ndarray, shift: np.uint64) -> np.ndarray:
    """The 16-bit piece of each hash at `shift`, as int32."""
    return ((hashes >> shift) & np.uint64((1 << PIECE_BITS) - 1)).astype(np.int32)


class _RangeIndex:
    """The hashes whose piece at `shift` lies in [low, high), sorted by it, and the probes (a query's
    piece XOR one of _NEAR_PIECES) that fall in that range: each probe's candidates are a run of
    the sorted hashes."""

    def __init__(self, prints: list[np.ndarray], shift: np.uint64, low: int, high: int, probes: np.ndarray,
                 asking: np.ndarray):
        inside = []
        for hashes in prints:
            piece = _piece(hashes, shift)
            inside.append(hashes[(piece >= low) & (piece < high)])
        hashes = np.concatenate(inside)
        pieces = _piece(hashes, shift)
        order = np.argsort((pieces - low).astype(np.uint16), kind="stable")  # a radix sort
        self.hashes = hashes[order]
        self.owner = np.repeat(np.arange(len(prints), dtype=np.int32), [len(h) for h in inside])[order]
        self.query = asking  # the query of each probe
        starts = np.searchsorted(pieces[order], np.arange(low, high + 1, dtype=np.int32))
        self.lo, self.lengths = starts[probes - low], starts[probes - low + 1] - starts[probes - low]
        self.ends = np.cumsum(self.lengths)  # candidates up to each probe

    def hits(self, queries: np.ndarray, asker: np.ndarray, first: int, last: int) -> set[tuple[int, int]]:
        """(asking movie, other movie) of each query of probes first..last-1 within MAX_DISTANCE bits
        of a candidate of another movie."""
        count = self.lengths[first:last]
        before = self.ends[first:last] - count - (self.ends[first - 1] if first else 0)  # each run's start among them
        at = np.repeat(self.lo[first:last] - before, count) + np.arange(before[-1] + count[-1])
        which = np.repeat(self.query[first:last], count)  # each candidate's query
        near = np.bitwise_count(self.hashes[at] ^ queries[which]) <= MAX_DISTANCE
        found = np.unique(np.stack([asker[which[near]], self.owner[at[near]]], axis=1), axis=0)
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
