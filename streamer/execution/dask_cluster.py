"""The executor on a dask.distributed cluster: an existing scheduler, or Slurm through dask-jobqueue.

Only the pure work functions travel; downloads, the ledger and eviction stay in the
service. Tasks are submitted with ``pure=False`` and no dask-side retries (the service
has its own policy): a task whose worker died comes back as :class:`WorkerLost`, and the
service puts it back to ready. Files are passed by path, so the storage root must be on
a filesystem that the workers share; :meth:`DaskExecutor.check_storage` says so at start.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
from distributed import Client
from distributed.client import FuturesCancelledError
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.scheduler import KilledWorker

from streamer.errors import StreamerError, UsageError
from streamer.execution.base import ClusterLost, TaskDropped, WorkerLost
from streamer.execution.local import _THREAD_VARIABLES, keep_freed_memory
from streamer.rules.affinity import Slot, choose_slot

ONE_THREAD_PLUGIN = "streamer-one-thread-numerics"

LOST_WORKER_ERRORS = (KilledWorker, FuturesCancelledError, cf.CancelledError)


class OneThreadNumerics(WorkerPlugin):
    """One BLAS and one numba thread in each worker process, and freed arrays kept for reuse
    (:func:`streamer.execution.local.keep_freed_memory`), as in the local pool: the variables are
    read when the libraries load, so this must run before a job imports them (a worker that loaded
    numba before the plugin keeps its thread count)."""

    name = ONE_THREAD_PLUGIN

    def setup(self, worker: Any) -> None:
        for variable in _THREAD_VARIABLES:
            os.environ[variable] = "1"
        keep_freed_memory()


class OneLineRecords(logging.Filter):
    """Folds the traceback of a record from dask's own loggers into its line: a scheduler that goes
    away is an expected event, answered in one line, not a page of tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("distributed") and record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {error})".replace("\n", " ")
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def fold_dask_tracebacks() -> None:
    """Install :class:`OneLineRecords` on the handlers that dask's records reach (its own and the root's)."""
    for handler in [*logging.getLogger("distributed").handlers, *logging.getLogger().handlers]:
        if not any(isinstance(f, OneLineRecords) for f in handler.filters):
            handler.addFilter(OneLineRecords())


class DaskExecutor:
    """Runs worker functions on a dask cluster through its ``concurrent.futures`` interface."""

    def __init__(self, client: Client, *, memory_per_task: int | None = None, cluster: Any = None) -> None:
        self.client = client
        client.register_plugin(OneThreadNumerics(), name=ONE_THREAD_PLUGIN)  # on the workers now and those to come
        self._cluster = cluster
        self._resources = {"memory": memory_per_task} if memory_per_task else None
        self._executor = client.get_executor(pure=False, retries=0, resources=self._resources)
        self._lock = threading.Lock()
        self._keys: dict[str, str | None] = {}  # worker address -> affinity key of the last job sent there
        self._loads: dict[str, int] = {}  # worker address -> our tasks not finished there

    @classmethod
    def from_config(cls, compute: Any, *, connect_timeout_s: float = 10.0) -> DaskExecutor:
        """Connect to ``compute.scheduler`` or start a Slurm cluster; wait (bounded) for a first worker."""
        dask.config.set({"distributed.scheduler.allowed-failures": 0})
        fold_dask_tracebacks()
        cluster = None
        if compute.slurm is not None:
            cluster = _slurm_cluster(compute)
            address: Any = cluster
        else:
            address = compute.scheduler
        try:
            client = Client(address, timeout=f"{connect_timeout_s}s", set_as_default=False)
        except (OSError, TimeoutError) as err:
            raise UsageError(
                f"compute.scheduler = {compute.scheduler!r}: no dask scheduler answered within "
                f"{connect_timeout_s:.0f} s ({type(err).__name__}); expected a running scheduler at that address"
            ) from None
        executor = cls(client, memory_per_task=compute.memory_per_task, cluster=cluster)
        executor.wait_for_workers(compute.worker_wait_s)
        return executor

    def wait_for_workers(self, timeout_s: float) -> None:
        try:
            self.client.wait_for_workers(1, timeout=timeout_s)
        except TimeoutError:
            self.shutdown()
            raise StreamerError(
                f"the dask scheduler has no worker after {timeout_s:.0f} s (compute.worker_wait_s); "
                "start workers with `dask worker <scheduler address>`"
            ) from None

    def check_storage(self, root: Path) -> None:
        """Every worker must see the storage root (a shared filesystem)."""
        seen = self.client.run(os.path.isdir, str(root))
        blind = sorted(worker for worker, ok in seen.items() if not ok)
        if blind:
            raise StreamerError(
                f"storage.root {root} is not visible from dask worker(s) {', '.join(blind)}: "
                "the storage root must be on a filesystem that the workers share"
            )

    def _nthreads(self) -> dict[str, int]:
        """Threads per worker address; :class:`ClusterLost` once the client gave up reconnecting."""
        if self.client.status in ("closing", "closed"):
            raise self._lost()
        try:
            return dict(self.client.nthreads())
        except (RuntimeError, OSError) as err:
            raise self._lost(err) from None

    def _lost(self, err: BaseException | None = None) -> ClusterLost:
        cause = f" ({type(err).__name__}: {err})" if err is not None else ""
        return ClusterLost(
            f"lost the dask scheduler at {self.address}: no answer after the client's reconnection attempts{cause}; "
            "stopping, the next start continues once the scheduler is back"
        )

    @property
    def address(self) -> str:
        return str(getattr(self.client.scheduler, "address", None) or self.client.scheduler_info().get("address", "?"))

    @property
    def slots(self) -> int:
        return max(1, sum(self._nthreads().values()))

    def affinity_slots(self) -> list[Slot]:
        """Each worker (by address): the key of the last job sent to it, our tasks on it, its threads."""
        return self._slots(self._nthreads())

    def _slots(self, nthreads: dict[str, int]) -> list[Slot]:
        with self._lock:
            return [Slot(self._keys.get(a), self._loads.get(a, 0), n) for a, n in sorted(nthreads.items())]

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        return self.submit_with_affinity(None, fn, *args, **kwargs)

    def submit_with_affinity(self, key: str | None, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Send ``fn`` to the worker that :func:`choose_slot` picks (loose restriction: another worker
        takes it if that one is gone); without workers yet, to wherever the scheduler likes."""
        nthreads = self._nthreads()
        where: dict[str, Any] = {}
        address = None
        if nthreads:
            address = sorted(nthreads)[choose_slot(self._slots(nthreads), key)]
            where = {"workers": [address], "allow_other_workers": True}
            with self._lock:
                self._loads[address] = self._loads.get(address, 0) + 1
                self._keys[address] = key if key is not None else self._keys.get(address)
        try:
            inner = self._executor.submit(fn, *args, **where, **kwargs)
        except RuntimeError as err:  # the client closed between the check above and the submission
            raise self._lost(err) from None
        outer: cf.Future[Any] = cf.Future()

        def relay(done: cf.Future[Any]) -> None:
            if address is not None:
                with self._lock:
                    self._loads[address] = max(0, self._loads.get(address, 0) - 1)
            if done.cancelled():
                outer.set_exception(TaskDropped("the cluster cancelled the task (its scheduler was lost or restarted)"))
                return
            error = done.exception()
            if isinstance(error, LOST_WORKER_ERRORS):
                outer.set_exception(WorkerLost(f"{type(error).__name__}: {error}"))
            elif error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(done.result())

        inner.add_done_callback(relay)
        return outer

    @property
    def generation(self) -> int:
        return 0  # the cluster replaces its own workers

    def replace(self, broken_generation: int) -> None:
        """Nothing to do: a lost dask worker is replaced by the cluster, not by the service."""

    def describe(self) -> dict[str, Any]:
        self._nthreads()  # ClusterLost rather than stale figures once the scheduler is gone
        info = self.client.scheduler_info()
        workers = info.get("workers", {})
        return {
            "kind": "dask",
            "scheduler": info.get("address"),
            "workers": len(workers),
            "threads": sum(w.get("nthreads", 0) for w in workers.values()),
            "load": {addr: w.get("metrics", {}).get("task_counts", {}) for addr, w in workers.items()},
            "affinity": {addr: self._keys.get(addr) for addr in workers},
        }

    def shutdown(self, *, cancel: bool = False) -> None:
        self._executor.shutdown(wait=not cancel)
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def _slurm_cluster(compute: Any) -> Any:
    from dask_jobqueue import SLURMCluster

    slurm = compute.slurm
    cluster = SLURMCluster(
        queue=slurm.queue,
        account=slurm.account,
        cores=slurm.cores,
        processes=slurm.processes,
        memory=f"{slurm.memory}B",
        walltime=slurm.walltime,
    )
    cluster.scale(jobs=slurm.jobs)
    return cluster
