"""A job whose call cannot be made fails that job, never the service: retried with backoff, parked at the last attempt.

The real dispatch loop and its ``submit`` over a real (in-memory) ledger and the real local pool. The
calls fail for reasons of the job's own: a kind this program does not know (a ledger written by
another version), and an exposure whose focal-plane factors file, read when its call is built, is not JSON.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from e2e import offline_config
from streamer.execution.local import LocalExecutor
from streamer.ledger.core import Ledger
from streamer.service.context import Context
from streamer.service.dispatch import dispatcher, submit
from streamer.service.records import Submitted

RAW = "raw/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz"


def _unknown_kind(ledger: Ledger, root: Path) -> int:
    """A job of a kind this program has no worker call for (a ledger written by another version)."""
    del root
    with ledger.transaction() as conn:
        job_id = ledger.add_job(conn, kind="starflat", key="starflat:2020-09-24:c13", night="2020-09-24", ccdid=13)
        ledger.set_job_state(conn, job_id, "ready")
    return job_id


def _exposure_with_a_broken_focalplane_file(ledger: Ledger, root: Path) -> int:
    """An exposure ready to run whose focal-plane factors file is not JSON (cut short by hand, say)."""
    with ledger.transaction() as conn:
        pins = [ledger.want_file(conn, relpath=RAW, kind="raw", night="2020-09-24")]
        ledger.set_file_state(conn, pins[0], "on_disk")
        for kind, relpath in MASTERS.items():
            producer = ledger.add_job(conn, kind=kind, key=f"{kind}:2020-09-24", night="2020-09-24", ccdid=13, filtercode="zr")
            for state in ("ready", "running", "done"):
                ledger.set_job_state(conn, producer, state)
            file_id = ledger.want_file(conn, relpath=relpath, kind="masters", night="2020-09-24")
            conn.execute("UPDATE files SET producer_job = ? WHERE id = ?", (producer, file_id))
            ledger.set_file_state(conn, file_id, "on_disk")
            pins.append(file_id)
        job_id = ledger.add_job(
            conn, kind="exposure", key="exposure:20200924431759:c13", night="2020-09-24", ccdid=13, filtercode="zr",
            pins=pins,
        )  # fmt: skip
        ledger.set_job_state(conn, job_id, "ready")
    focalplane = root / MASTERS["focalplane"]
    focalplane.parent.mkdir(parents=True, exist_ok=True)
    focalplane.write_text('{"factors": {"13": 0.98')
    return job_id


MASTERS = {
    "master_bias": "masters/2020/0924/ztf_20200924_c13_bias.fits",
    "master_flat": "masters/2020/0924/ztf_20200924_zr_c13_flat.fits",
    "focalplane": "masters/2020/0924/ztf_20200924_zr_focalplane.json",
}
JOBS = {
    "unknown kind": (_unknown_kind, "ValueError"),
    "broken focal-plane file": (_exposure_with_a_broken_focalplane_file, "JSONDecodeError"),
}


def _row(ledger: Ledger, job_id: int) -> dict[str, Any]:
    return ledger.rows("SELECT * FROM jobs WHERE id = ?", (job_id,))[0]


async def _dispatch_until_it_leaves_ready(ctx: Context, job_id: int) -> asyncio.Task[None]:
    results: asyncio.Queue[Submitted] = asyncio.Queue()
    task = asyncio.create_task(dispatcher(ctx, results))
    deadline = time.monotonic() + 30
    while not task.done() and _row(ctx.ledger, job_id)["state"] == "ready" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ctx.stop()
    await asyncio.wait([task], timeout=10)
    assert results.empty() and not ctx.running_jobs
    return task


@pytest.mark.parametrize("case", sorted(JOBS))
def test_a_call_that_cannot_be_made_fails_the_job_with_one_line_then_parks_it(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_job, error_name = JOBS[case]
    ledger = Ledger.memory()
    executor = LocalExecutor(1)
    ctx = Context(config=offline_config(tmp_path), ledger=ledger, executor=executor, burst=False)
    job_id = make_job(ledger, ctx.config.storage.root)
    try:
        with caplog.at_level(logging.WARNING, logger="streamer"):
            before = time.time()
            task = asyncio.run(_dispatch_until_it_leaves_ready(ctx, job_id))
            assert task.done() and task.exception() is None  # the dispatch loop, and so the service, goes on
            row = _row(ledger, job_id)
            assert (row["state"], row["attempts"]) == ("failed", 1)
            assert row["error"].startswith(error_name) and row["not_before"] > before + 1
            lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(lines) == 1 and lines[0].exc_info is None and error_name in lines[0].getMessage()
            for _ in range(ctx.config.service.max_task_attempts - 1):  # the backoff passed: the next attempts
                submit(ctx, _row(ledger, job_id), asyncio.Queue())
    finally:
        executor.shutdown(cancel=True)
    row = _row(ledger, job_id)
    assert (row["state"], row["attempts"]) == ("parked", ctx.config.service.max_task_attempts)
    assert row["error"].startswith(error_name)
    assert not ctx.running_jobs


def test_an_executor_that_refuses_the_call_fails_the_job_and_releases_it(tmp_path: Path) -> None:
    ledger = Ledger.memory()
    executor = LocalExecutor(1)
    executor.shutdown()  # refuses every call: RuntimeError, not BrokenProcessPool
    ctx = Context(config=offline_config(tmp_path), ledger=ledger, executor=executor, burst=False)
    with ledger.transaction() as conn:
        job_id = ledger.add_job(conn, kind="master_bias", key="master_bias:2020-09-24:c13", night="2020-09-24", ccdid=13)
        ledger.set_job_state(conn, job_id, "ready")
    results: asyncio.Queue[Submitted] = asyncio.Queue()
    submit(ctx, _row(ledger, job_id), results)
    row = _row(ledger, job_id)
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert row["error"].startswith("RuntimeError") and "shutdown" in row["error"]
    assert results.empty() and not ctx.running_jobs
