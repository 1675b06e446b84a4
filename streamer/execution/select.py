"""Choose the compute back end that ``[compute]`` asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamer.execution.base import Executor
from streamer.execution.local import LocalExecutor


def make_executor(compute: Any, storage_root: Path) -> Executor:
    """The executor that ``[compute]`` asks for; a dask cluster must see the storage root."""
    if compute.executor == "dask":
        from streamer.execution.dask_cluster import DaskExecutor

        executor = DaskExecutor.from_config(compute)
        try:
            executor.check_storage(storage_root)
        except Exception:
            executor.shutdown(cancel=True)
            raise
        return executor
    return LocalExecutor(compute.n_workers)
