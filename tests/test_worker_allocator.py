"""Workers keep freed quadrant-sized arrays for reuse: checked through glibc's own statistics.

``mallinfo2().hblkhd`` is what glibc holds in separately mapped blocks. By default an array
above its mmap threshold (at most 32 MB) is such a block, mapped afresh and unmapped when freed;
a worker set up by :func:`streamer.execution.local.keep_freed_memory` takes it from its heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing

import numpy as np
import pytest
from distributed import LocalCluster

from streamer.config import ComputeConfig
from streamer.execution.dask_cluster import DaskExecutor
from streamer.execution.local import LocalExecutor

QUADRANT = (3080, 3072)  # float32: 37.8 MB


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _mallinfo2() -> _MallInfo2 | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    function = getattr(libc, "mallinfo2", None)
    if function is None:
        return None
    function.restype = _MallInfo2
    return function()


def _mapped_bytes_of_a_quadrant_array() -> int | None:
    """How much glibc's separately mapped blocks grow while one float32 quadrant array lives (None without glibc)."""
    before = _mallinfo2()
    if before is None:
        return None
    image = np.ones(QUADRANT, dtype=np.float32)
    during = _mallinfo2()
    assert during is not None
    del image
    return int(during.hblkhd) - int(before.hblkhd)


@pytest.fixture(scope="module")
def default_mapped() -> int:
    """The same in a plain spawned process, with glibc's defaults: the array is its own mapping."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        mapped = pool.apply(_mapped_bytes_of_a_quadrant_array)
    if mapped is None:
        pytest.skip("not glibc: no mallinfo2")
    return int(mapped)


def test_by_default_a_quadrant_array_is_mapped_afresh(default_mapped: int) -> None:
    assert default_mapped >= 4 * QUADRANT[0] * QUADRANT[1]


def test_a_local_pool_worker_takes_it_from_its_heap(default_mapped: int) -> None:
    executor = LocalExecutor(1)
    try:
        assert executor.submit(_mapped_bytes_of_a_quadrant_array).result(timeout=120) == 0
    finally:
        executor.shutdown()


def test_a_dask_worker_takes_it_from_its_heap(default_mapped: int) -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        executor = DaskExecutor.from_config(ComputeConfig(executor="dask", scheduler=cluster.scheduler_address, worker_wait_s=30.0))
        try:
            assert executor.submit(_mapped_bytes_of_a_quadrant_array).result(timeout=60) == 0
        finally:
            executor.shutdown()
