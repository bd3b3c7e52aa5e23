import threading
import time

from mhmd_builder.batching import batched, prefetched


def test_batched_groups_in_order_with_a_shorter_last_batch():
    assert list(batched(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == [] and list(batched(range(4), 2)) == [[0, 1], [2, 3]]


def test_prefetched_keeps_the_order_and_loads_ahead_in_threads():
    running, peak, lock = [0], [0], threading.Lock()

    def load(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 * (5 - i % 5))  # later items finish first
        with lock:
            running[0] -= 1
        return i * i

    assert list(prefetched(list(range(10)), load, threads=4, ahead=4)) == [(i, i * i) for i in range(10)]
    assert peak[0] > 1  # loads overlapped
