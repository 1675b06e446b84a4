"""A lost quadrant leaves its IN2P3 catalogue unwritten: the job is done, the other three files are on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from streamer.config import load_config
from streamer.demo import write_config
from streamer.execution.jobs import Call
from streamer.execution.local import LocalExecutor
from streamer.ledger.core import Ledger
from streamer.service.context import Context
from streamer.service.records import Submitted, record
from streamer.storage.naming import RawName
from streamer.storage.paths import apcat_relpaths

RAW = RawName("20200924431759", 655, "zr", 13, "o")


async def _finished(result: Any) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


def _finish(tmp_path: Path, layout: str, written: int) -> tuple[Ledger, dict[str, Any]]:
    """A running exposure job whose catalogues are planned for ``layout``, of which the first ``written`` exist."""
    path = write_config(
        tmp_path / "config.toml", store=tmp_path / "store", catalog_dir=tmp_path / "refcat", base_url="http://127.0.0.1:9",
        budget=10**9,
    )  # fmt: skip
    (tmp_path / "store").mkdir()
    config = load_config(path)
    ledger = Ledger.memory()
    relpaths = apcat_relpaths(RAW, layout)
    with ledger.transaction() as conn:
        job_id = ledger.add_job(conn, kind="exposure", key="exposure:20200924431759:c13", night="2020-09-24", ccdid=13)
        for relpath in relpaths:
            file_id = ledger.want_file(conn, relpath=relpath, kind="apcat", night="2020-09-24")
            conn.execute("UPDATE files SET producer_job = ?, reserved_bytes = 5000 WHERE id = ?", (job_id, file_id))
        ledger.set_job_state(conn, job_id, "ready")
        ledger.set_job_state(conn, job_id, "running", attempts=1)
    for relpath in relpaths[:written]:
        target = config.storage.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"PAR1" * 100)
    job = ledger.rows("SELECT * FROM jobs WHERE id = ?", (job_id,))[0] | {"attempts": 0}
    executor = LocalExecutor(1)
    try:
        ctx = Context(config=config, ledger=ledger, executor=executor, burst=True)
        future = asyncio.run(_finished({"lost": [[4, "no WCS"]]}))
        ctx.running_jobs[job["id"]] = future
        record(ctx, Submitted(job=job, call=Call(function=print, kwargs={}, outputs=relpaths), future=future, generation=0))
    finally:
        executor.shutdown(cancel=True)
    return ledger, job


def test_a_lost_quadrant_leaves_its_in2p3_catalogue_wanted_and_the_job_done(tmp_path: Path) -> None:
    ledger, job = _finish(tmp_path, "in2p3", written=3)
    assert ledger.scalar("SELECT state FROM jobs WHERE id = ?", (job["id"],)) == "done"
    rows = ledger.rows("SELECT relpath, state, reserved_bytes FROM files WHERE producer_job = ? ORDER BY relpath", (job["id"],))
    assert [r["state"] for r in rows] == ["on_disk", "on_disk", "on_disk", "wanted"]
    assert rows[3]["relpath"].endswith("_q4_apcat.parquet") and rows[3]["reserved_bytes"] == 0


def test_a_missing_per_ccd_catalogue_still_fails_the_job(tmp_path: Path) -> None:
    ledger, job = _finish(tmp_path, "streamer", written=0)
    assert ledger.scalar("SELECT state FROM jobs WHERE id = ?", (job["id"],)) == "failed"
