"""The download stage: files in job order, at most ``max_connections`` at a time, each reserved before it starts.

A file that the loop picks again at once without the fetch finishing it (the ledger said it was
due, the fetcher left it) is parked with its error by :class:`~streamer.rules.download_retry.RepickGuard`
after a few such picks, in one log line, so no inconsistency between the two can spin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from streamer import clock
from streamer.config import format_size
from streamer.ledger.downloads import download_candidates, park_file
from streamer.rules.download_retry import RepickGuard
from streamer.service.context import Context
from streamer.service.dispatch import reserve_outputs_through
from streamer.service.fetcher import DownloadError

log = logging.getLogger("streamer.service")


def candidates(ctx: Context, limit: int) -> list[dict[str, Any]]:
    """The next files to download (the ledger's one download order), skipping those in flight."""
    return download_candidates(
        ctx.ledger, limit=limit, burst=ctx.burst, now=clock.now(),
        max_missing=ctx.config.archive.missing_max_attempts, exclude=ctx.downloading,
    )  # fmt: skip


async def downloader(ctx: Context) -> None:
    """Start downloads in job order; a download waiting for budget keeps its place."""
    in_flight: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(ctx.config.archive.max_connections)
    guard = RepickGuard()
    try:
        while not ctx.stopping.is_set():
            batch = candidates(ctx, ctx.config.archive.max_connections)
            if not batch:
                await ctx.wait_change(5.0)
                continue
            for row in batch:
                if guard.picked(row["id"], time.monotonic()):
                    park_repicked(ctx, row, guard)
                    continue
                if row.get("first_job") is not None and not reserve_outputs_through(ctx, row["first_job"]):
                    break  # what earlier jobs will write comes first; the evictor has been asked for room
                await slots.acquire()
                if ctx.stopping.is_set():
                    slots.release()
                    break
                ctx.downloading.add(row["id"])
                task = asyncio.create_task(download_one(ctx, row["id"], slots, guard))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await ctx.wait_change(0.5)
    finally:
        for task in list(in_flight):
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


async def download_one(ctx: Context, file_id: int, slots: asyncio.Semaphore, guard: RepickGuard | None = None) -> None:
    """One file through the fetcher; whatever goes wrong is logged in one line and the slot is freed.

    The fetcher logs its own give-ups; ``guard`` learns whether the pick finished the file.
    """
    done = False
    try:
        outcome = await ctx.fetcher.fetch(file_id)
        done = outcome.state == "on_disk"
        if not done:
            log.debug("%s: left %s (%s)", outcome.relpath, outcome.state, outcome.error)
    except asyncio.CancelledError:
        done = True  # a stop, not a failure of the file
        raise
    except DownloadError:
        pass  # recorded with its retry date and logged by the fetcher
    except Exception as err:
        log.error("download of file %d failed: %s: %s", file_id, type(err).__name__, " ".join(str(err).split()))
    finally:
        if guard is not None:
            guard.left(file_id, time.monotonic(), done=done)
        slots.release()
        ctx.downloading.discard(file_id)
        ctx.poke()


def park_repicked(ctx: Context, row: dict[str, Any], guard: RepickGuard) -> None:
    """Park a file the loop kept picking without progress: ``missing`` without a retry date, with its error."""
    reason = f"picked {guard.repicks(row['id'])} times in a row without progress (state {row['state']})"
    log.error("%s: parked: %s; last error: %s", row["relpath"], reason, row.get("last_error"))
    park_file(ctx.ledger, row["id"], row["relpath"], reason)
    guard.forget(row["id"])
    ctx.poke()


def report_stuck(ctx: Context, need: int) -> None:
    """Say once, in the log, the ledger and systemd's STATUS, that the budget is full of files that must stay."""
    budget = ctx.config.storage.budget
    reason = (
        f"disk budget full: {format_size(ctx.used_bytes())} of {format_size(budget)} used by files that "
        f"are pinned or kept, and the next download needs {format_size(need)}; raise storage.budget or "
        "narrow what consumers keep"
    )
    if reason != ctx.stuck_reason:
        log.error("%s", reason)
        ctx.ledger.event("stuck", reason, level="error")
        ctx.notifier.status("stuck: disk budget full of pinned or kept files")
    ctx.stuck_reason = reason
