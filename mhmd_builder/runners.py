"""Runners decide where partitions run; stages decide what happens to them.

`LocalRunner` runs partitions in a pool of worker processes on this machine (or inline with one
worker); `RayRunner` runs them on a pool of Ray actors, on this machine or a cluster. Either way a
worker calls `stage.setup()` once, then `run_partition` for each partition it is given; progress
reports travel back on a queue and are drawn as one bar per running partition plus an overall bar.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm

from .devices import machine_cores
from .errors import InputError
from .logs import bars_disable
from .stages import Partition, PartitionError, PartitionResult, Stage, record_failure, run_partition


log = logging.getLogger(__name__)

PLAIN_PROGRESS_S = 30.0  # seconds between plain progress lines when stderr is not a terminal


def _on_terminal() -> bool:
    return getattr(sys.stderr, "isatty", lambda: False)()


class ProgressDisplay:
    """An overall bar over partitions and a bar for each partition while it runs; the same progress
    goes to the work directory (at most once a second per partition) for `mhmd status`. Where
    stderr is no terminal (nohup, Slurm, a pipe) tqdm draws nothing: a plain line ("extract: 12/40
    partitions, 3 failed") is logged every `every` seconds instead, and once at the end."""

    def __init__(self, stage: str, total: int, workdir=None, unit: str = "s", every: float = PLAIN_PROGRESS_S):
        self.stage, self.total, self.workdir, self.unit, self.written = stage, total, workdir, unit, {}
        self.lock = threading.Lock()
        self.bars_disabled = bars_disable()
        self.overall = tqdm(total=total, desc=f"{stage}", unit="part", position=0, disable=self.bars_disabled)
        self.bars: dict[str, tqdm] = {}
        self.finished: set[str] = set()
        self.failures = 0
        self.started: dict[str, float] = {}  # partition -> when its first progress report came
        self.plain_every = None if _on_terminal() else every
        self.plain_at = time.monotonic()
        self.free_rows: list[int] = []
        self.next_row = 1

    def update(self, pid: str, done: float, total: float) -> None:
        with self.lock:
            if pid in self.finished:  # a late report from a partition already finished
                return
            bar = self.bars.get(pid)
            if bar is None:
                row = self.free_rows.pop() if self.free_rows else self._new_row()
                self.started[pid] = time.monotonic()
                bar = tqdm(total=round(total, 1), desc=pid[:32], unit=self.unit, position=row, leave=False,
                           disable=self.bars_disabled, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} {unit} "
                                                    "[{elapsed}<{remaining}]")
                bar.row = row
                self.bars[pid] = bar
            bar.n = min(round(done, 1), bar.total)
            bar.refresh()
            if self.workdir is not None and time.monotonic() - self.written.get(pid, 0.0) >= 1.0:
                self.written[pid] = time.monotonic()
                self.workdir.write_progress(self.stage, pid, done, total)
            self._plain_line()

    def _plain_line(self, last: bool = False) -> None:
        """The overall progress as a plain line, when it is due (and bars are not drawn)."""
        if self.plain_every is None or not (last or time.monotonic() - self.plain_at >= self.plain_every):
            return
        self.plain_at = time.monotonic()
        log.info("%s: %d/%d partitions, %d failed", self.stage, len(self.finished), self.total, self.failures)

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
            since = self.started.pop(result.id, None)
            took = f" after {time.monotonic() - since:.1f} s" if since is not None else ""
            log.debug("%s: %s %s%s", self.stage, result.id, "done" if result.ok else "failed", took)
            if not result.ok:
                self.failures += 1
                log.warning("failed: %s: %s", result.id, result.reason)
            self._plain_line()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self._plain_line(last=True)
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


class _Worker:
    """A stage inside one worker process (a pool process or a Ray actor): set up once, on the
    first partition, then runs partitions and sends their progress with `send`."""

    def __init__(self, stage: Stage, send):
        self.stage, self.send, self.ready = stage, send, False

    def run(self, partition: Partition) -> PartitionResult:
        # Set up on the first partition rather than when the worker starts: a setup error (a model
        # that cannot load) then fails the partition with its reason instead of breaking the pool.
        if not self.ready:
            try:
                self.stage.setup()
            except Exception as e:  # noqa: BLE001
                return record_failure(self.stage, partition, e)
            self.ready = True
        return run_partition(self.stage, partition, _Throttled(partition.id, self.send))


# The worker of this pool process: the stage is set up once per process, not once per partition.
_worker: _Worker | None = None


def _worker_init(stage: Stage, progress_queue) -> None:
    global _worker
    _worker = _Worker(stage, progress_queue.put)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    signal.signal(signal.SIGTERM, _stopped)


def _stopped(signum: int, frame) -> None:
    # Unwinds the running partition, so its atomic writes remove their temporaries; once: the pool
    # terminates the other workers again when one ends, which must not break off their clean-up.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _worker_run(partition: Partition) -> PartitionResult:
    try:
        return _worker.run(partition)
    except SystemExit as stop:
        os._exit(stop.code)  # the pool would hand this process another partition


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the partitions not started and end the workers without waiting for the running ones."""
    processes = list(pool._processes.values())  # the executor has no public way to end them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def _worker_died(stage: Stage, partition: Partition, error: Exception, attempts: int = 1) -> PartitionResult:
    """Record a partition whose worker process died under it (killed, out of memory, node lost)."""
    tries = f" ({attempts} attempts)" if attempts > 1 else ""
    return _mark_lost(stage, partition, f"worker process died{tries}: {type(error).__name__}: {error}".splitlines()[0])


def _mark_lost(stage: Stage, partition: Partition, reason: str) -> PartitionResult:
    """Record a partition that no worker could run to its end."""
    stage.workdir.mark_failed(stage.name, partition.id, {**partition.record, "reason": reason})
    return PartitionResult(partition.id, False, reason, {})


class LocalRunner:
    """Worker processes on this machine: `workers` of them, else as many as the stage declares
    (`Resources.local_workers`: one per core unless it says otherwise), started as it declares.
    With one worker (or one partition) the stage runs in this process."""

    name = "local"

    def __init__(self, workers: int | None = None):
        self.workers = workers

    def worker_count(self, stage: Stage) -> int:
        return max(1, self.workers or stage.resources.local_workers or machine_cores())

    def run(self, stage: Stage, partitions: list[Partition], on_result=None) -> list[PartitionResult]:
        """Every partition's result; `on_result(result)` (optional) is called here as each ends."""
        if not partitions:
            return []
        display = ProgressDisplay(stage.name, len(partitions), stage.workdir, stage.unit)
        finish = _finisher(display, on_result)
        try:
            if self.worker_count(stage) == 1 or len(partitions) == 1:
                return self._run_inline(stage, partitions, display, finish)
            return self._run_pool(stage, partitions, display, finish)
        finally:
            display.close()

    @staticmethod
    def _run_inline(stage: Stage, partitions: list[Partition], display: ProgressDisplay,
                    finish) -> list[PartitionResult]:
        worker = _Worker(stage, lambda msg: display.update(*msg))
        results = []
        for partition in partitions:
            results.append(worker.run(partition))
            finish(results[-1])
        return results

    def _run_pool(self, stage: Stage, partitions: list[Partition], display: ProgressDisplay,
                  finish) -> list[PartitionResult]:
        ctx = mp.get_context(stage.resources.start_method)
        progress_queue = ctx.Queue()
        stop = threading.Event()
        results: list[PartitionResult] = []
        workers = min(self.worker_count(stage), len(partitions))
        try:
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(stage, progress_queue))
            # The progress thread starts after the pool: a forked worker must not copy a running thread.
            drainer = threading.Thread(target=_drain, args=(progress_queue, display, stop), daemon=True)
            drainer.start()
            with pool:
                try:
                    futures = {pool.submit(_worker_run, p): p for p in partitions}
                    for future in as_completed(futures):
                        results.append(self._result_of(stage, futures[future], future))
                        finish(results[-1])
                except KeyboardInterrupt:
                    _stop_pool(pool)
                    raise
        finally:
            stop.set()
            drainer.join()
        return results

    @staticmethod
    def _result_of(stage: Stage, partition: Partition, future) -> PartitionResult:
        try:
            return future.result()
        except Exception as e:  # noqa: BLE001 - a worker that died (killed, out of memory)
            return _worker_died(stage, partition, e)


def _finisher(display: ProgressDisplay, on_result):
    """What the driver does as each partition ends: the display's line, then the caller's `on_result`."""
    def finish(result: PartitionResult) -> None:
        display.finish(result)
        if on_result is not None:
            on_result(result)
    return finish


def _drain(progress_queue, display: ProgressDisplay, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            display.update(*progress_queue.get(timeout=0.1))
        except queue.Empty:
            continue


def connect_ray(address: str | None = None, **init_options):
    """The `ray` module, connected once per process: to the cluster at `address` ("ray://host:10001",
    "host:6379", "auto"), else as `ray.init()` finds one (RAY_ADDRESS, a cluster `ray start`ed on
    this machine) or a new local instance; `init_options` go to `ray.init` (e.g. num_cpus=2 for a
    new local instance). Never shut down here: a local instance ends with this process, and a
    joined cluster must keep running."""
    # Workers run this environment's Python. Under `uv run` Ray would otherwise run them with
    # `uv run` in an uploaded copy of the current folder, which is wherever mhmd was started.
    # (Ray reads this when it is first imported.)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    if not ray.is_initialized():
        # Workers' output stays in Ray's session logs: it would tear the progress bars, and every
        # partition's failure is recorded with its reason anyway.
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_options)
    return ray


class RayRunner:
    """Runs partitions on a pool of Ray actors, on this machine or on a cluster.

    Each actor asks Ray for the stage's resources (`num_cpus`, `num_gpus`: a GPU stage gets a GPU
    of its own), sets the stage up once (models load once per actor) and runs one partition at a
    time; the driver hands the next partition to whichever actor is free. A partition whose actor
    died (killed, out of memory, node lost) goes to a fresh actor, up to `retries` more times, and is
    then recorded failed. A failure inside the stage (an exception in `process`) is recorded by
    `run_partition` and not retried: it comes from the input and would fail again. Workers read and
    write the work directory themselves, so it must be on storage every node sees. Ctrl-C cancels
    the running partitions, which unwind at their next progress report (`_RayProgress`)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, retries: int = 2):
        self.address, self.workers, self.retries = address, workers, retries

    def run(self, stage: Stage, partitions: list[Partition], on_result=None) -> list[PartitionResult]:
        """Every partition's result; `on_result(result)` (optional) is called here as each ends."""
        if not partitions:
            return []
        ray = connect_ray(self.address)
        from ray.util.queue import Queue

        progress_queue = Queue(actor_options={"num_cpus": 0})
        display = ProgressDisplay(stage.name, len(partitions), stage.workdir, stage.unit)
        stop = threading.Event()
        drainer = threading.Thread(target=_drain, args=(progress_queue, display, stop), daemon=True)
        drainer.start()
        actor_class = ray.remote(_Worker).options(num_cpus=stage.resources.cpus, num_gpus=stage.resources.gpus)
        actors = []

        def new_actor():
            actors.append(actor_class.remote(stage, _RayProgress(progress_queue.put)))
            return actors[-1]

        try:
            return self._schedule(ray, stage, partitions, new_actor, _finisher(display, on_result))
        finally:
            stop.set()
            drainer.join()
            for actor in actors:  # free their CPUs and GPUs for the next stage
                ray.kill(actor)
            progress_queue.shutdown()
            display.close()

    def _schedule(self, ray, stage: Stage, partitions: list[Partition], new_actor,
                  finished) -> list[PartitionResult]:
        from ray.exceptions import RayActorError

        todo = deque(partitions)
        idle = [new_actor() for _ in range(min(len(partitions), self.worker_count(stage)))]
        running = {}  # the result's ObjectRef -> (actor, partition)
        attempts: Counter[str] = Counter()
        results: list[PartitionResult] = []
        cannot_start = None  # why the last actor that failed to start did

        def finish(result: PartitionResult) -> None:
            results.append(result)
            finished(result)

        try:
            while todo or running:
                if not idle and not running:  # no actor could start: the rest would fail the same way
                    for partition in todo:
                        finish(_mark_lost(stage, partition, cannot_start))
                    break
                while todo and idle:
                    actor, partition = idle.pop(), todo.popleft()
                    running[actor.run.remote(partition)] = (actor, partition)
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor, partition = running.pop(ref)
                attempts[partition.id] += 1
                try:
                    finish(_committed(stage, partition, ray.get(ref)))
                    idle.append(actor)
                except RayActorError as e:
                    ray.kill(actor)
                    if e.actor_init_failed:  # the stage does not unpickle there (mhmd_builder missing on a
                        # node, another version): a fresh actor would fail the same way, so the pool shrinks
                        cannot_start = f"worker could not start: {str(e).strip().splitlines()[-1]}"
                        finish(_mark_lost(stage, partition, cannot_start))
                        continue
                    idle.append(new_actor())  # its process died: a fresh actor takes its place
                    if attempts[partition.id] <= self.retries:
                        todo.append(partition)
                    else:
                        finish(_worker_died(stage, partition, e, attempts[partition.id]))
        except KeyboardInterrupt:
            _stop_running(ray, running)
            raise
        return results

    def worker_count(self, stage: Stage) -> int:
        """As many actors as the cluster's CPUs and GPUs hold now, at most `workers`, at least one.
        Never more than fit: an actor waiting for resources would hold its partition back until the
        others are done and release theirs."""
        have, need = connect_ray(self.address).cluster_resources(), stage.resources
        fits = [have.get(kind, 0) / amount for kind, amount in (("CPU", need.cpus), ("GPU", need.gpus)) if amount]
        return max(1, int(min([*fits, *([self.workers] if self.workers else [])], default=1)))


class _RayProgress:
    """An actor's progress callback: sends each report to the driver's queue, and stops the partition
    once the driver cancelled its task (Ctrl-C). The KeyboardInterrupt unwinds it as SIGTERM unwinds
    a local worker's, removing its temporaries; Ray cannot interrupt a running actor task itself."""

    def __init__(self, put):
        self.put = put

    def __call__(self, message) -> None:
        import ray

        if ray.get_runtime_context().is_canceled():
            raise KeyboardInterrupt
        self.put(message)


STOP_GRACE_S = 10.0  # how long partitions cancelled by Ctrl-C have to unwind before their actors are killed


def _stop_running(ray, running: dict) -> None:
    """Cancel the partitions running on actors and wait (at most STOP_GRACE_S) for them to stop at
    their next progress report; the actors are killed after, whether they did or not."""
    if not running:
        return
    for ref in running:
        ray.cancel(ref, recursive=False)  # not its progress reports: a report cancelled would fail the partition
    ray.wait(list(running), num_returns=len(running), timeout=STOP_GRACE_S)


def _committed(stage: Stage, partition: Partition, result: PartitionResult) -> PartitionResult:
    """The result, or a failure when its done marker is not in this machine's work directory: the
    worker then wrote to a disk of its own node, not to storage every node sees."""
    if not result.ok or stage.workdir.is_done(stage.name, result.id):
        return result
    error = PartitionError(f"done on its worker, but {stage.workdir.root} here has no record of it: "
                           "the work directory must be on storage every node sees")
    return record_failure(stage, partition, error)


def make_runner(name: str, workers: int | None = None, address: str | None = None) -> LocalRunner | RayRunner:
    """A runner by name: "local" (`workers` processes) or "ray" (`workers` actors on the cluster at
    `address`; by default as many as its resources hold)."""
    if name == "local":
        return LocalRunner(workers)
    if name == "ray":
        return RayRunner(address, workers)
    raise InputError(f"unknown runner {name!r} (available: local, ray)")
