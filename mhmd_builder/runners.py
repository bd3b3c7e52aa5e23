"""Runners decide where partitions run; stages decide what happens to them.

`LocalRunner` runs partitions in a pool of worker processes on this machine (or inline with one
worker). Each worker calls `stage.setup()` once, then `run_partition` for each partition it is
given; progress reports travel back on a queue and are drawn as one bar per running partition
plus an overall bar.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm

from .stages import Partition, PartitionResult, Stage, record_failure, run_partition


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ProgressDisplay:
    """An overall bar over partitions and a bar for each partition while it runs; the same progress
    goes to the work directory (at most once a second per partition) for `mhmd status`."""

    def __init__(self, stage: str, total: int, workdir=None):
        self.stage, self.workdir, self.written = stage, workdir, {}
        self.lock = threading.Lock()
        self.overall = tqdm(total=total, desc=f"{stage}", unit="part", position=0, disable=None)
        self.bars: dict[str, tqdm] = {}
        self.finished: set[str] = set()
        self.free_rows: list[int] = []
        self.next_row = 1

    def update(self, pid: str, done: float, total: float) -> None:
        with self.lock:
            if pid in self.finished:  # a late report from a partition already finished
                return
            bar = self.bars.get(pid)
            if bar is None:
                row = self.free_rows.pop() if self.free_rows else self._new_row()
                bar = tqdm(total=round(total, 1), desc=pid[:32], unit="s", position=row, leave=False,
                           disable=None, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]")
                bar.row = row
                self.bars[pid] = bar
            bar.n = min(round(done, 1), bar.total)
            bar.refresh()
            if self.workdir is not None and time.monotonic() - self.written.get(pid, 0.0) >= 1.0:
                self.written[pid] = time.monotonic()
                self.workdir.write_progress(self.stage, pid, done, total)

    def _new_row(self) -> int:
        self.next_row += 1
        return self.next_row - 1

    def finish(self, result: PartitionResult) -> None:
        with self.lock:
            self.finished.add(result.id)
            if self.workdir is not None:
                self.workdir.clear_progress(self.stage, result.id)
            bar = self.bars.pop(result.id, None)
            if bar is not None:
                self.free_rows.append(bar.row)
                bar.close()
            self.overall.update(1)
            if not result.ok:
                self.overall.write(f"failed: {result.id}: {result.reason}")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()


class _Throttled:
    """Progress callback that reports at most every `interval` seconds (and always the end)."""

    def __init__(self, pid: str, send, interval: float = 0.25):
        self.pid, self.send, self.interval, self.last = pid, send, interval, 0.0

    def __call__(self, done: float, total: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval or done >= total:
            self.last = now
            self.send((self.pid, done, total))


# Worker-process state: the stage is set up once per process, not once per partition.
_worker_stage: Stage | None = None
_worker_queue = None
_worker_ready = False


def _worker_init(stage: Stage, progress_queue) -> None:
    global _worker_stage, _worker_queue
    _worker_stage, _worker_queue = stage, progress_queue


def _worker_run(partition: Partition) -> PartitionResult:
    # Set up on the first partition rather than in the pool's initializer: a setup error (a model
    # that cannot load) then fails the partition with its reason instead of breaking the pool.
    global _worker_ready
    if not _worker_ready:
        try:
            _worker_stage.setup()
        except Exception as e:  # noqa: BLE001
            return record_failure(_worker_stage, partition, e)
        _worker_ready = True
    return run_partition(_worker_stage, partition, _Throttled(partition.id, _worker_queue.put))


class LocalRunner:
    name = "local"

    def __init__(self, workers: int | None = None, start_method: str = "spawn"):
        self.workers = max(1, workers or default_workers())
        # spawn by default: the parent has threads (progress), and later stages hold CUDA state.
        # fork only for stages whose workers do plain file work with what the parent imported.
        self.start_method = start_method

    def run(self, stage: Stage, partitions: list[Partition]) -> list[PartitionResult]:
        if not partitions:
            return []
        display = ProgressDisplay(stage.name, len(partitions), getattr(stage, "workdir", None))
        try:
            if self.workers == 1 or len(partitions) == 1:
                return self._run_inline(stage, partitions, display)
            return self._run_pool(stage, partitions, display)
        finally:
            display.close()

    def _run_inline(self, stage: Stage, partitions: list[Partition], display: ProgressDisplay) -> list[PartitionResult]:
        stage.setup()
        results = []
        for partition in partitions:
            report = _Throttled(partition.id, lambda msg: display.update(*msg))
            results.append(run_partition(stage, partition, report))
            display.finish(results[-1])
        return results

    def _run_pool(self, stage: Stage, partitions: list[Partition], display: ProgressDisplay) -> list[PartitionResult]:
        ctx = mp.get_context(self.start_method)
        progress_queue = ctx.Queue()
        stop = threading.Event()
        results: list[PartitionResult] = []
        workers = min(self.workers, len(partitions))
        try:
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(stage, progress_queue))
            # The progress thread starts after the pool: a forked worker must not copy a running thread.
            drainer = threading.Thread(target=_drain, args=(progress_queue, display, stop), daemon=True)
            drainer.start()
            with pool:
                futures = {pool.submit(_worker_run, p): p for p in partitions}
                for future in as_completed(futures):
                    results.append(self._result_of(stage, futures[future], future))
                    display.finish(results[-1])
        finally:
            stop.set()
            drainer.join()
        return results

    @staticmethod
    def _result_of(stage: Stage, partition: Partition, future) -> PartitionResult:
        try:
            return future.result()
        except Exception as e:  # noqa: BLE001 - a worker that died (killed, out of memory)
            reason = f"worker process died: {type(e).__name__}: {e}".splitlines()[0]
            stage.workdir.mark_failed(stage.name, partition.id, {**partition.info, "reason": reason})
            return PartitionResult(partition.id, False, reason, {})


def _drain(progress_queue, display: ProgressDisplay, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            display.update(*progress_queue.get(timeout=0.1))
        except queue.Empty:
            continue


def make_runner(name: str, workers: int | None = None) -> LocalRunner:
    if name == "local":
        return LocalRunner(workers)
    raise ValueError(f"unknown runner {name!r} (available: local)")
