"""The local process pool, one implementation of :class:`streamer.execution.base.Executor`.

Worker processes
of the local pool are started with the ``spawn`` method (they inherit neither the
ledger's lock nor the event loop), set their library settings in an initializer, and
die with the service (Linux parent-death signal).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any

from streamer.execution.base import BrokenProcessPool

__all__ = ["LocalExecutor", "worker_initializer"]

_PR_SET_PDEATHSIG = 1
# read by the libraries when they are imported; numba's (the pocket-effect kernels) as well
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")


def worker_initializer() -> None:
    """Per-process settings of a pool worker: one BLAS and one numba thread, die with the parent,
    ignore Ctrl-C. Runs in the fresh (spawned) process before any job is unpickled, so before the
    job modules import numba; the pool has as many workers as cores, so a job runs on one."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = os.environ.get("STREAMER_PARENT_PID")
    if parent and os.getppid() != int(parent):
        os._exit(1)  # the parent died before the death signal was armed


class LocalExecutor:
    """A ``ProcessPoolExecutor`` that is replaced when a worker dies (``BrokenProcessPool``)."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()
        self.replacements = 0

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        os.environ["STREAMER_PARENT_PID"] = str(os.getpid())
        return cf.ProcessPoolExecutor(
            max_workers=self._workers, mp_context=self._context, initializer=worker_initializer
        )

    @property
    def slots(self) -> int:
        return self._workers

    @property
    def generation(self) -> int:
        return self.replacements

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        try:
            return self._pool.submit(fn, *args, **kwargs)
        except BrokenProcessPool:
            self.replace(self.replacements)
            return self._pool.submit(fn, *args, **kwargs)

    def replace(self, broken_generation: int) -> None:
        """Start a fresh pool after a worker died; tasks that were running must be resubmitted.

        Several futures of one broken pool fail together and each asks for a replacement: only the
        first is carried out, so a job already resubmitted to the new pool is not cancelled with it.
        """
        if broken_generation != self.replacements:
            return
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()
        self.replacements += 1

    def worker_pids(self) -> list[int]:
        processes = getattr(self._pool, "_processes", None) or {}
        return sorted(int(pid) for pid in processes)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "workers": self._workers, "pool_replacements": self.replacements}

    def shutdown(self, *, cancel: bool = False) -> None:
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
