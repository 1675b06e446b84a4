"""The record stage and the pool's replacement: errors are recorded, never swallowed, and no job is cancelled twice."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import time
from pathlib import Path
from typing import Any

import pytest

from e2e import offline_config
from streamer.execution.base import BrokenProcessPool
from streamer.execution.jobs import Call
from streamer.execution.local import LocalExecutor
from streamer.ledger.core import Ledger
from streamer.service.context import Context
from streamer.service.records import Submitted, record


def _running_job_with_output(ledger: Ledger) -> dict[str, Any]:
    with ledger.transaction() as conn:
        job_id = ledger.add_job(conn, kind="master_bias", key="master_bias:2020-09-24:c13", night="2020-09-24", ccdid=13)
        file_id = ledger.want_file(conn, relpath="masters/2020/0924/bias_c13.fits", kind="masters", night="2020-09-24")
        conn.execute("UPDATE files SET producer_job = ?, reserved_bytes = 5000 WHERE id = ?", (job_id, file_id))
        ledger.set_job_state(conn, job_id, "ready")
        ledger.set_job_state(conn, job_id, "running", attempts=1)
    return ledger.rows("SELECT * FROM jobs WHERE id = ?", (job_id,))[0] | {"attempts": 0}


async def _finished_future(result: Any) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


def test_a_job_that_finishes_without_its_product_is_failed_not_left_running(tmp_path: Path) -> None:
    config = offline_config(tmp_path)
    ledger = Ledger.memory()
    executor = LocalExecutor(1)
    try:
        job = _running_job_with_output(ledger)
        ctx = Context(config=config, ledger=ledger, executor=executor, burst=True)
        future = asyncio.run(_finished_future({"ok": True}))
        call = Call(function=print, kwargs={}, outputs=("masters/2020/0924/bias_c13.fits",))
        ctx.running_jobs[job["id"]] = future
        record(ctx, Submitted(job=job, call=call, future=future, generation=0))
    finally:
        executor.shutdown(cancel=True)
    row = ledger.rows("SELECT state, error, not_before FROM jobs WHERE id = ?", (job["id"],))[0]
    assert row["state"] == "failed"
    assert "finished without writing masters/2020/0924/bias_c13.fits" in row["error"]
    assert row["not_before"] > time.time()
    assert ledger.scalar("SELECT reserved_bytes FROM files WHERE producer_job = ?", (job["id"],)) == 0
    assert job["id"] not in ctx.running_jobs


def test_a_broken_pool_is_replaced_once_and_a_resubmitted_job_survives() -> None:
    executor = LocalExecutor(2)
    try:
        broken_generation = executor.generation
        dying = [executor.submit(os._exit, 1) for _ in range(2)]
        for future in dying:
            with pytest.raises(BrokenProcessPool):
                future.result(timeout=60)
        executor.replace(broken_generation)  # the first failed future asks for a new pool
        survivor = executor.submit(sum, [1, 2, 3])
        executor.replace(broken_generation)  # the second failed future of the same pool asks again
        assert survivor.result(timeout=60) == 6
        assert executor.generation == broken_generation + 1
    except cf.CancelledError:
        pytest.fail("the job resubmitted to the new pool was cancelled by a second replacement")
    finally:
        executor.shutdown(cancel=True)
