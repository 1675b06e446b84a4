"""Throughput of the dask engine against the local process pool, on the same exposure tasks.

    python -m bench.executor [--workdir DIR] [--tasks N]

Both run ``streamer.work.exposure.process_exposure`` on full-size simulated raw CCD files (the data of
``bench.photometry``), ``N`` tasks over 2 worker processes: once through the service's
``LocalExecutor`` (a spawned process pool), once through ``DaskExecutor`` on a
``distributed.LocalCluster`` of 2 single-threaded worker processes. Each executor first runs
a few warm-up tasks (imports, each worker's master cache), then the timed batch. Prints the wall
time of each batch and the ratio dask / local (the cost of the engine itself).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

from bench.photometry import prepare, run_ours
from streamer.config import ComputeConfig
from streamer.execution.base import Executor
from streamer.execution.local import LocalExecutor

WARM_UP_TASKS = 6  # enough that every worker has read the masters whichever worker the engine picks


def exposure_task(workdir: str, index: int, root: str) -> int:
    """One exposure of the prepared data, written below ``root``; returns the rows measured."""
    data = prepare(Path(workdir))
    file = data["files"][index % len(data["files"])]
    result = run_ours(data, file, Path(root))
    return sum(n for _qid, n in result.rows)


def _batch(executor: Executor, workdir: Path, out: Path, tasks: int, tag: str) -> float:
    warm: list[Future[Any]] = [
        executor.submit(exposure_task, str(workdir), i, str(out / f"{tag}-warm-{i}")) for i in range(WARM_UP_TASKS)
    ]
    wait(warm)
    for future in warm:
        future.result()
    started = time.perf_counter()
    futures = [executor.submit(exposure_task, str(workdir), i, str(out / f"{tag}-{i}")) for i in range(tasks)]
    rows = [f.result() for f in futures]
    elapsed = time.perf_counter() - started
    assert all(r > 0 for r in rows)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, help="where the simulated data is kept between runs")
    parser.add_argument("--tasks", type=int, default=12)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-executor-"))
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(workdir)
    out = Path(tempfile.mkdtemp(prefix="bench-executor-out-"))

    local = LocalExecutor(2)
    try:
        local_s = _batch(local, workdir, out, args.tasks, "local")
    finally:
        local.shutdown()

    from distributed import LocalCluster

    from streamer.execution.dask_cluster import DaskExecutor

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster:
        dask_executor = DaskExecutor.from_config(
            ComputeConfig(executor="dask", scheduler=cluster.scheduler_address, worker_wait_s=60)
        )
        try:
            dask_s = _batch(dask_executor, workdir, out, args.tasks, "dask")
        finally:
            dask_executor.shutdown()
    print(f"{args.tasks} exposure tasks on 2 workers")
    print(f"local process pool:          {local_s:7.1f} s  ({args.tasks / local_s:.2f} tasks/s)")
    print(f"dask LocalCluster (2 procs): {dask_s:7.1f} s  ({args.tasks / dask_s:.2f} tasks/s)")
    print(f"throughput dask / local:     {local_s / dask_s:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
