"""Near-duplicate films: one film under two files that are not byte for byte the same (a
re-encode, another scale, a cut), found from what extract recorded, without decoding again.

A movie's fingerprint is the set of perceptual hashes (`quality.phash`, the extract table's
`phash_hi` / `phash_lo`) of its sampled frames that passed quality: black fades, title cards and
other frames every film has would otherwise look shared. Two movies are near-duplicates when, both
ways, at least MIN_SHARE of one's hashes lie within MAX_DISTANCE bits of one of the other's; groups
are the connected movies. Measured both ways, a film that merely shares some shots with another
(a reused scene, the same photo) is not grouped, while a re-encode (share ~1) or a cut of a few
minutes (the share of the film that was left) is.
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
    first = len(query) - math.ceil(MIN_SHARE * len(query)) + 1  # all of these missing rules it out
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
    """`near_duplicates` of the movies' fingerprints (`fingerprints`, of one movie or several). Every
    pair is compared (a film's near duplicates may be anywhere), by `workers` threads (default: one
    per core): numpy lets go of the GIL while it compares."""
    movies = sorted(prints)
    with ThreadPoolExecutor(workers or machine_cores()) as pool:
        near = [pair for pairs in pool.map(lambda i: _near_later(movies, prints, i), range(len(movies)))
                for pair in pairs]
    group = {movie: {movie} for movie in movies}
    for a, b in near:
        merged = group[a] | group[b]
        group.update({movie: merged for movie in merged})
    return [list(g) for g in sorted({tuple(sorted(g)) for g in group.values() if len(g) > 1})]


def _near_later(movies: list[str], prints: dict[str, np.ndarray], i: int) -> list[tuple[str, str]]:
    """The pairs of movies[i] and a later movie that are near duplicates."""
    a = movies[i]
    return [(a, b) for b in movies[i + 1:] if reaches(prints[a], prints[b]) and reaches(prints[b], prints[a])]
