"""A job whose worker process dies under it every time is parked, not run again for ever; a job lost beside it is not.

Two levels, both with real worker processes:

- the record stage over a real (in-memory) ledger and the real local pool, whose workers run a
  function that ends the process (``os._exit``), the way a segfault or an out-of-memory kill ends it;
- the real CLI backfill of a simulated night with one worker, where the test kills the worker
  process (SIGKILL, as the kernel's out-of-memory killer does) each time the ledger shows one chosen
  exposure running: that job ends parked, every other job done, and the backfill ends.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2e import NIGHT, backfill_args, config_for, offline_config, store_of, streamer_cmd
from streamer.crashpoints import ENVIRONMENT_VARIABLE
from streamer.demo import serve_archive
from streamer.execution.jobs import Call
from streamer.execution.local import LocalExecutor
from streamer.ledger import jobs as ledger_jobs
from streamer.ledger.core import Ledger
from streamer.rules.failures import MAX_WORKER_LOSSES
from streamer.service.context import Context
from streamer.service.records import Submitted, record
from streamer.sim.generate import generate_night

CULPRIT = "master_bias:2020-09-24:c13"
BYSTANDER = "master_bias:2020-09-24:c14"


def _die() -> None:
    os._exit(1)


def _pid() -> int:
    return os.getpid()


def _add_jobs(ledger: Ledger, keys: list[str]) -> None:
    with ledger.transaction() as conn:
        for ccdid, key in enumerate(keys, start=13):
            job_id = ledger.add_job(conn, kind="master_bias", key=key, night="2020-09-24", ccdid=ccdid)
            ledger.set_job_state(conn, job_id, "ready")


def _job(ledger: Ledger, key: str) -> dict[str, Any]:
    return ledger.rows("SELECT * FROM jobs WHERE key = ?", (key,))[0]


async def _run_round(ctx: Context, plan: list[tuple[str, Callable[[], Any]]]) -> None:
    """Start the jobs of ``plan`` in its order on the pool, as the dispatcher does, then record each as it ends."""
    items = []
    for key, function in plan:
        job = _job(ctx.ledger, key)
        ledger_jobs.start_job(ctx.ledger, job)
        generation = ctx.executor.generation
        future = asyncio.wrap_future(ctx.executor.submit(function))
        ctx.running_jobs[job["id"]] = future
        items.append(Submitted(job=job, call=Call(function=function, kwargs={}, outputs=()), future=future, generation=generation))
    for item in items:
        await asyncio.wait([item.future], timeout=120)
        record(ctx, item)


def test_a_job_that_kills_its_worker_is_parked_and_the_job_lost_beside_it_is_not(tmp_path: Path) -> None:
    ledger = Ledger.memory()
    executor = LocalExecutor(1)  # one process: a job queued behind the culprit dies with it
    ctx = Context(config=offline_config(tmp_path), ledger=ledger, executor=executor, burst=True)
    _add_jobs(ledger, [CULPRIT, BYSTANDER])
    try:
        before = time.time()
        asyncio.run(_run_round(ctx, [(CULPRIT, _die), (BYSTANDER, _pid)]))
        for key in (CULPRIT, BYSTANDER):
            row = _job(ledger, key)
            assert (row["state"], row["attempts"], row["worker_losses"]) == ("failed", 0, 1), row
            assert row["not_before"] > before  # a pause before it runs again, not at once
        asyncio.run(_run_round(ctx, [(BYSTANDER, _pid), (CULPRIT, _die)]))
        bystander = _job(ledger, BYSTANDER)
        assert (bystander["state"], bystander["worker_losses"]) == ("done", 0)
        assert _job(ledger, CULPRIT)["state"] == "failed"
        for _ in range(MAX_WORKER_LOSSES - 2):
            asyncio.run(_run_round(ctx, [(CULPRIT, _die)]))
    finally:
        executor.shutdown(cancel=True)
    culprit = _job(ledger, CULPRIT)
    assert culprit["state"] == "parked"
    assert culprit["worker_losses"] == MAX_WORKER_LOSSES
    assert f"the worker process died under it {MAX_WORKER_LOSSES} times in a row" in culprit["error"]
    assert "BrokenProcessPool" in culprit["error"]
    assert not ctx.running_jobs
    assert executor.generation == MAX_WORKER_LOSSES  # one fresh process for each death, none for the bystander's run


def test_an_ordinary_failure_ends_a_run_of_worker_losses(tmp_path: Path) -> None:
    ledger = Ledger.memory()
    executor = LocalExecutor(1)
    ctx = Context(config=offline_config(tmp_path), ledger=ledger, executor=executor, burst=True)
    _add_jobs(ledger, [CULPRIT])
    try:
        for _ in range(MAX_WORKER_LOSSES - 1):
            asyncio.run(_run_round(ctx, [(CULPRIT, _die)]))
        asyncio.run(_run_round(ctx, [(CULPRIT, _raise)]))
        row = _job(ledger, CULPRIT)
        assert (row["state"], row["attempts"], row["worker_losses"]) == ("failed", 1, 0)
        asyncio.run(_run_round(ctx, [(CULPRIT, _die)]))
    finally:
        executor.shutdown(cancel=True)
    assert _job(ledger, CULPRIT)["state"] == "failed"  # one loss in a row again: run again, not parked


def _raise() -> None:
    raise ValueError("an ordinary failure")


# ------------------------------------------------------------------ the real backfill


def _ledger_rows(store: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    try:
        with sqlite3.connect(f"file:{store / 'ledger.sqlite'}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []  # not created yet, or busy


def test_backfill_parks_the_job_whose_worker_dies_every_time_and_ends(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    generate_night(archive, NIGHT, ccds=(13,), n_exposures=3, flats_per_led=2, n_biases=8, seed=3, shape="small")
    culprit = sorted(p.name for p in (archive / "raw").rglob("*_o.fits.fz"))[0]
    # the worker that starts this exposure dies at once (SIGKILL to itself), every time it is given it
    env = {**os.environ, ENVIRONMENT_VARIABLE: f"exposure:{culprit}#*@process"}
    with serve_archive(archive) as url:
        config = config_for(tmp_path, archive, url, budget=50 * 10**9, workers=2)
        store = store_of(config)
        result = subprocess.run(streamer_cmd(config, *backfill_args()), capture_output=True, text=True, timeout=400, env=env)
    output = result.stdout + result.stderr
    assert output.count(f"crash point exposure:{culprit}") == MAX_WORKER_LOSSES, output
    assert result.returncode == 1, output  # incomplete: one job parked
    assert "1 parked" in output, output
    jobs = {key: (kind, state) for key, kind, state in _ledger_rows(store, "SELECT key, kind, state FROM jobs")}
    parked = [key for key, (_kind, state) in jobs.items() if state == "parked"]
    assert parked == [f"exposure:{culprit[4:18]}:c13"], jobs  # ztf_<14-digit time>_...: the culprit alone
    assert {state for key, (_kind, state) in jobs.items() if key != parked[0]} == {"done"}, jobs
    error = _ledger_rows(store, "SELECT error FROM jobs WHERE key = ?", (parked[0],))[0][0]
    assert f"the worker process died under it {MAX_WORKER_LOSSES} times in a row" in error
    assert "Traceback" not in output
