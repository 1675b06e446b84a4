"""The local process pool, one implementation of :class:`streamer.execution.base.Executor`.

One worker process per slot, each in its own single-process pool, so that a job can be sent to
the worker that holds its masters and a worker's death breaks only its own slot. Worker processes
are started with the ``spawn`` method (they inherit neither the ledger's lock nor the event loop),
set their library settings in an initializer, and die with the service (Linux parent-death signal).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from streamer.execution.base import BrokenProcessPool
from streamer.rules.affinity import Slot, choose_slot

__all__ = ["LocalExecutor", "keep_freed_memory", "worker_initializer"]

_PR_SET_PDEATHSIG = 1
# read by the libraries when they are imported; numba's (the pocket-effect kernels) as well
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")


# glibc's mallopt parameters, and the values a worker uses: a quadrant's float32 array is 37.8 MB,
# above glibc's largest default mmap threshold (32 MB), so each one was mapped and unmapped afresh
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 2**20
TRIM_THRESHOLD_BYTES = 1024 * 2**20


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed arrays of up to 256 MB for reuse, and give memory back to
    the system only beyond 1 GB free at the top of the heap; True if glibc took both settings.

    By default every array larger than 32 MB (each full-size quadrant image, variance or stack)
    is a fresh ``mmap``, unmapped when freed, so every quadrant pays the page faults and the
    zeroing of its arrays again: about 5 ms of CPU per 38 MB array on the development machine
    (1.6 ms reused). A worker allocates the same sizes quadrant after quadrant, so its resident
    size stays at its high-water mark either way. A no-op (False) without glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mmap = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD_BYTES))
    trim = mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD_BYTES))
    return bool(mmap == 1 and trim == 1)


def worker_initializer() -> None:
    """Per-process settings of a pool worker: one BLAS and one numba thread, freed arrays kept for
    reuse (:func:`keep_freed_memory`), die with the parent, ignore Ctrl-C. Runs in the fresh
    (spawned) process before any job is unpickled, so before the job modules import numba; the
    pool has as many workers as cores, so a job runs on one."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = os.environ.get("STREAMER_PARENT_PID")
    if parent and os.getppid() != int(parent):
        os._exit(1)  # the parent died before the death signal was armed


class _Worker:
    """One slot of the pool: a single-process pool, the affinity key of its last job and its jobs in flight."""

    def __init__(self, pool: cf.ProcessPoolExecutor) -> None:
        self.pool = pool
        self.key: str | None = None
        self.load = 0
        self.broken = False


class LocalExecutor:
    """One single-process ``ProcessPoolExecutor`` per slot, so that a job can go to the worker that
    already holds its masters (:func:`streamer.rules.affinity.choose_slot`); a slot whose process
    died (``BrokenProcessPool``) is replaced by a fresh one, the others keep running."""

    def __init__(self, workers: int) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._workers = [_Worker(self._new_pool()) for _ in range(workers)]
        self.replacements = 0

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        os.environ["STREAMER_PARENT_PID"] = str(os.getpid())
        return cf.ProcessPoolExecutor(max_workers=1, mp_context=self._context, initializer=worker_initializer)

    @property
    def slots(self) -> int:
        return len(self._workers)

    @property
    def generation(self) -> int:
        return self.replacements

    def affinity_slots(self) -> list[Slot]:
        """What each worker last ran and how many jobs it holds, for the dispatcher's choice."""
        with self._lock:
            return [Slot(key=w.key, load=w.load) for w in self._workers]

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        return self.submit_with_affinity(None, fn, *args, **kwargs)

    def submit_with_affinity(self, key: str | None, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Run ``fn`` on the least loaded worker, preferring the one whose last job had affinity ``key``."""
        self.replace(self.replacements)
        with self._lock:
            worker = self._workers[choose_slot([Slot(w.key, w.load) for w in self._workers], key)]
            try:
                future = worker.pool.submit(fn, *args, **kwargs)
            except BrokenProcessPool:
                worker.broken = refused = True
            else:
                refused = False
                worker.load += 1
                worker.key = key if key is not None else worker.key
        if refused:
            return self.submit_with_affinity(key, fn, *args, **kwargs)  # on a fresh process for that slot
        future.add_done_callback(lambda done: self._finished(worker, done))
        return future

    def _finished(self, worker: _Worker, done: cf.Future[Any]) -> None:
        with self._lock:
            worker.load = max(0, worker.load - 1)
            if not done.cancelled() and isinstance(done.exception(), BrokenProcessPool):
                worker.broken = True

    def replace(self, broken_generation: int) -> None:
        """Start a fresh process for each slot whose process died; its tasks must be resubmitted.

        Several futures of one broken slot fail together and each asks for a replacement: a slot is
        replaced once (the fresh pool is not broken), so a job already resubmitted to it is not
        cancelled. One call that replaces any slot counts as one replacement (``generation``).
        """
        with self._lock:
            broken = [w for w in self._workers if w.broken]
            self._workers = [_Worker(self._new_pool()) if w.broken else w for w in self._workers]
            if broken:
                self.replacements += 1
        for worker in broken:  # outside the lock: cancelling its queued futures runs their callbacks here
            worker.pool.shutdown(wait=False, cancel_futures=True)

    def worker_pids(self) -> list[int]:
        pids: list[int] = []
        for worker in self._workers:
            processes = getattr(worker.pool, "_processes", None) or {}
            pids.extend(int(pid) for pid in processes)
        return sorted(pids)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            keys = [w.key for w in self._workers]
        return {"kind": "local", "workers": len(self._workers), "pool_replacements": self.replacements, "affinity": keys}

    def shutdown(self, *, cancel: bool = False) -> None:
        for worker in self._workers:
            worker.pool.shutdown(wait=not cancel, cancel_futures=cancel)
