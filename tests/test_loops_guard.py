"""The retry rules with plain values, and the download loop's guard against picking a file again and again.

The guard test runs the real download loop over a real (in-memory) ledger with a fetcher that
leaves the file exactly as it found it, the shape of every spin seen so far (a ``deleted`` row
the fetcher did not take, an error that left the row ``wanted``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from streamer.config import config_from_dict
from streamer.ledger.core import Ledger
from streamer.rules.download_retry import (
    FILE_RETRY_S,
    MAX_FILE_FAILURES,
    MAX_IMMEDIATE_REPICKS,
    ParkFile,
    RepickGuard,
    RetryFile,
    after_download_failure,
)
from streamer.rules.nights import night_ends_at
from streamer.rules.replan import (
    INGESTION_WINDOW_S,
    REPLAN_DELAYS_S,
    PlanRecord,
    next_look_s,
    partial_look_at,
    plan_due,
    replan_delay,
)
from streamer.service.context import Context
from streamer.service.downloads import downloader
from streamer.service.fetcher import FetchOutcome

RAW = "raw/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz"


def test_failures_back_off_with_growing_delays_then_park() -> None:
    actions = [after_download_failure(n) for n in range(1, MAX_FILE_FAILURES + 2)]
    delays = [a.delay_s for a in actions if isinstance(a, RetryFile)]
    assert len(delays) == MAX_FILE_FAILURES - 1 and delays == sorted(delays) and len(set(delays)) == len(delays)
    assert delays[0] >= 3600  # a retry is never "immediate" for the guard (its window is a minute)
    assert actions[MAX_FILE_FAILURES - 1 :] == [ParkFile(), ParkFile()]
    assert after_download_failure(1, max_failures=1) == ParkFile()
    assert tuple(sorted(FILE_RETRY_S)) == FILE_RETRY_S


def test_replan_delays_grow_and_end() -> None:
    delays = [replan_delay(n) for n in range(0, len(REPLAN_DELAYS_S) + 2)]
    assert delays[0] is None and delays[-1] is None
    middle = [d for d in delays[1:-1] if d is not None]
    assert len(middle) == len(REPLAN_DELAYS_S) and middle == sorted(middle) and middle[0] >= 3600


def test_an_empty_night_is_planned_again_by_a_backfill_once_and_by_a_daemon_at_its_date() -> None:
    never = PlanRecord(planned=False)
    full = PlanRecord(planned=True)
    empty = PlanRecord(planned=True, empty_plans=1, replan_at=1000.0)
    exhausted = PlanRecord(planned=True, empty_plans=len(REPLAN_DELAYS_S) + 1, replan_at=None)
    for burst in (False, True):
        assert plan_due(never, now=0.0, burst=burst, seen_this_run=False)
        assert not plan_due(full, now=1e9, burst=burst, seen_this_run=False)
    assert not plan_due(empty, now=1e9, burst=True, seen_this_run=True)
    assert plan_due(empty, now=1e9, burst=False, seen_this_run=True)
    assert plan_due(empty, now=0.0, burst=True, seen_this_run=False)
    assert plan_due(exhausted, now=0.0, burst=True, seen_this_run=False)
    assert not plan_due(empty, now=999.0, burst=False, seen_this_run=False)
    assert plan_due(empty, now=1000.0, burst=False, seen_this_run=False)
    assert not plan_due(exhausted, now=1e9, burst=False, seen_this_run=False)
    assert next_look_s([full, empty, exhausted], now=400.0) == 600.0
    assert next_look_s([full, exhausted], now=400.0) is None


def test_a_night_planned_with_jobs_soon_after_its_end_is_looked_at_again_until_ingestion_is_over() -> None:
    night = dt.date(2026, 11, 30)
    end = dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()  # midnight UTC after the night, written out
    assert night_ends_at(night) == end
    early = PlanRecord(planned=True, replan_at=end + 7200.0, last_plan_at=end + 3600.0, night_ends_at=end)
    late = PlanRecord(planned=True, replan_at=None, last_plan_at=end + INGESTION_WINDOW_S + 1, night_ends_at=end)
    unknown = PlanRecord(planned=True, night_ends_at=end)  # a ledger from before the time of a plan was recorded
    assert early.maybe_partial and not late.maybe_partial and not unknown.maybe_partial
    assert plan_due(early, now=0.0, burst=True, seen_this_run=False)
    assert not plan_due(early, now=0.0, burst=True, seen_this_run=True)
    assert not plan_due(early, now=end + 7199.0, burst=False, seen_this_run=False)
    assert plan_due(early, now=end + 7200.0, burst=False, seen_this_run=False)
    for burst in (False, True):
        assert not plan_due(late, now=1e12, burst=burst, seen_this_run=False)
        assert not plan_due(unknown, now=1e12, burst=burst, seen_this_run=False)
    assert next_look_s([late, early], now=end + 3600.0) == 3600.0
    # the daemon's looks: after 1 h, 6 h, 24 h ... of each plan, none once a plan falls after the window
    assert partial_look_at(1, now=end + 100.0, night_end=end) == end + 100.0 + 3600.0
    assert partial_look_at(2, now=end + 100.0, night_end=end) == end + 100.0 + 6 * 3600.0
    assert partial_look_at(1, now=end + INGESTION_WINDOW_S, night_end=end) is None
    assert partial_look_at(len(REPLAN_DELAYS_S) + 1, now=end, night_end=end) is None


def test_repick_guard_counts_only_immediate_repicks_in_a_row() -> None:
    guard = RepickGuard(limit=3, window_s=60.0)
    assert not guard.picked("a", 0.0)
    guard.left("a", 1.0, done=False)
    assert not guard.picked("a", 2.0) and not guard.picked("b", 2.0)
    guard.left("a", 3.0, done=False)
    assert not guard.picked("a", 4.0)
    guard.left("a", 5.0, done=False)
    assert guard.picked("a", 6.0) and guard.repicks("a") == 3
    guard.forget("a")
    assert not guard.picked("a", 7.0)
    # a pick after the window, or after one that finished the item, starts the count again
    guard.left("a", 8.0, done=False)
    assert not guard.picked("a", 100.0) and guard.repicks("a") == 0
    guard.left("a", 101.0, done=True)
    assert not guard.picked("a", 102.0) and guard.repicks("a") == 0


class LeavesItAlone:
    """A fetcher that returns at once and changes nothing."""

    def __init__(self) -> None:
        self.calls = 0

    async def fetch(self, file_id: int) -> FetchOutcome:
        self.calls += 1
        return FetchOutcome(file_id, RAW, "wanted")


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_the_download_loop_parks_a_file_it_picks_again_without_progress(tmp_path: Path) -> None:
    config = config_from_dict(
        {"storage": {"root": str(tmp_path), "budget": "1 GB"}, "photometry": {"catalog_dir": str(tmp_path)}}
    )
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        file_id = ledger.want_file(conn, relpath=RAW, kind="raw", url="http://127.0.0.1:9/x", kept=True)
    executor: Any = None
    ctx = Context(config=config, ledger=ledger, executor=executor, burst=True)
    fetcher = LeavesItAlone()
    ctx.fetcher = fetcher
    loop = asyncio.create_task(downloader(ctx))
    for _ in range(200):
        await asyncio.sleep(0.05)
        if ledger.file(file_id)["state"] != "wanted":
            break
    await asyncio.sleep(0.5)  # the loop goes on: a parked file is not picked again
    ctx.stop()
    await loop
    row = ledger.file(file_id)
    assert row["state"] == "missing" and row["retry_at"] is None, row
    assert "without progress" in row["last_error"]
    assert fetcher.calls == MAX_IMMEDIATE_REPICKS
    assert [e["kind"] for e in ledger.rows("SELECT kind FROM events WHERE file_id = ?", (file_id,))] == ["file_parked"]
