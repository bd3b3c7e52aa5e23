"""Iterating in batches: loads ahead in threads, and fixed-size groups."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def prefetched(items: list, load, threads: int, ahead: int) -> Iterator[tuple]:
    """(item, load(item)) in order, with up to `ahead` loads running in threads ahead of use
    (cv2.imdecode and resize release the GIL, so threads decode in parallel)."""
    with ThreadPoolExecutor(threads) as pool:
        pending = [pool.submit(load, item) for item in items[:ahead]]
        for i, item in enumerate(items):
            if i + ahead < len(items):
                pending.append(pool.submit(load, items[i + ahead]))
            yield item, pending[i].result()
            pending[i] = None


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last one shorter): itertools.batched of Python 3.12."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
