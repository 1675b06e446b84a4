"""The dask executor on a real LocalCluster: results, affinity, a killed worker, and clear errors at start."""

from __future__ import annotations

import io
import logging
import operator
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import LocalCluster

from streamer.config import ComputeConfig
from streamer.errors import StreamerError, UsageError
from streamer.execution.base import WorkerLost
from streamer.execution.dask_cluster import DaskExecutor, OneLineRecords


def _pid_then_sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _pid() -> int:
    return os.getpid()


def _numba_threads() -> tuple[str | None, int]:
    import numba

    return os.environ.get("NUMBA_NUM_THREADS"), numba.config.NUMBA_NUM_THREADS


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as local:
        yield local


def _executor(address: str, *, worker_wait_s: float = 30.0) -> DaskExecutor:
    return DaskExecutor.from_config(ComputeConfig(executor="dask", scheduler=address, worker_wait_s=worker_wait_s))


def test_submit_returns_results_and_describes_workers(cluster: LocalCluster, tmp_path: Path) -> None:
    executor = _executor(cluster.scheduler_address)
    try:
        futures = [executor.submit(operator.mul, i, 3) for i in range(10)]
        assert [f.result(timeout=60) for f in futures] == [3 * i for i in range(10)]
        assert executor.slots == 2
        info = executor.describe()
        assert info["kind"] == "dask" and info["workers"] == 2
        executor.check_storage(tmp_path)
        with pytest.raises(StreamerError, match="not visible from dask worker"):
            executor.check_storage(tmp_path / "nowhere")
    finally:
        executor.shutdown()


def test_workers_run_numba_on_one_thread(cluster: LocalCluster) -> None:
    executor = _executor(cluster.scheduler_address)
    try:
        assert executor.submit(_numba_threads).result(timeout=60) == ("1", 1)
    finally:
        executor.shutdown()


def test_a_key_goes_back_to_the_worker_that_ran_it(cluster: LocalCluster) -> None:
    executor = _executor(cluster.scheduler_address)
    try:
        pids: dict[str, set[int]] = {"g": set(), "r": set()}
        for key in ["g", "r", "g", "g", "r", "r", "g", "r"]:
            pids[key].add(executor.submit_with_affinity(key, _pid).result(timeout=60))
        assert len(pids["g"]) == 1 and len(pids["r"]) == 1 and pids["g"] != pids["r"]
        together = [executor.submit_with_affinity(key, _pid_then_sleep, 0.5) for key in ("r", "g")]
        assert [f.result(timeout=60) for f in together] == [*pids["r"], *pids["g"]]
        slots = executor.affinity_slots()
        assert sorted(s.key for s in slots) == ["g", "r"] and [s.load for s in slots] == [0, 0]
        assert sorted(executor.describe()["affinity"].values()) == ["g", "r"]
    finally:
        executor.shutdown()


def test_killed_worker_gives_worker_lost_and_the_cluster_goes_on(tmp_path: Path) -> None:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as local:
        executor = _executor(local.scheduler_address)
        try:
            pids = executor.client.run(os.getpid)
            slow = executor.submit(_pid_then_sleep, 60.0)
            deadline = time.monotonic() + 30
            running_on: list[str] = []
            while not running_on and time.monotonic() < deadline:
                running_on = [addr for addr, keys in executor.client.processing().items() if keys]
                time.sleep(0.2)
            assert running_on, "the slow task never started"
            os.kill(pids[running_on[0]], signal.SIGKILL)
            with pytest.raises(WorkerLost):
                slow.result(timeout=90)
            assert executor.submit(operator.add, 2, 2).result(timeout=120) == 4
        finally:
            executor.shutdown()


def test_unanswering_scheduler_is_a_clear_usage_error() -> None:
    started = time.monotonic()
    with pytest.raises(UsageError, match="no dask scheduler answered"):
        DaskExecutor.from_config(
            ComputeConfig(executor="dask", scheduler="tcp://127.0.0.1:9", worker_wait_s=1), connect_timeout_s=2
        )
    assert time.monotonic() - started < 30


def test_scheduler_without_workers_is_waited_for_a_bounded_time() -> None:
    with LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0") as empty:
        started = time.monotonic()
        with pytest.raises(StreamerError, match="no worker after"):
            _executor(empty.scheduler_address, worker_wait_s=2)
        assert time.monotonic() - started < 30


def test_dask_log_records_with_a_traceback_become_one_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(OneLineRecords())
    logger = logging.getLogger("distributed.client.test-one-line")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            logger.exception("Failed to reconnect to %s", "tcp://127.0.0.1:1")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert text.count("\n") == 1 and "Traceback" not in text, text
    assert "Failed to reconnect to tcp://127.0.0.1:1 (ConnectionRefusedError: [Errno 111] Connection refused)" in text
