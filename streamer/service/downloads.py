"""The download stage: files in job order, at most ``max_connections`` at a time, each reserved before it starts."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from streamer.config import format_size
from streamer.ledger.downloads import download_candidates
from streamer.service.context import Context
from streamer.service.dispatch import reserve_outputs_through

log = logging.getLogger("streamer.service")


def candidates(ctx: Context, limit: int) -> list[dict[str, Any]]:
    """The next files to download (the ledger's one download order), skipping those in flight."""
    return download_candidates(
        ctx.ledger, limit=limit, burst=ctx.burst, now=time.time(),
        max_missing=ctx.config.archive.missing_max_attempts, exclude=ctx.downloading,
    )  # fmt: skip


async def downloader(ctx: Context) -> None:
    """Start downloads in job order; a download waiting for budget keeps its place."""
    in_flight: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(ctx.config.archive.max_connections)
    try:
        while not ctx.stopping.is_set():
            batch = candidates(ctx, ctx.config.archive.max_connections)
            if not batch:
                await ctx.wait_change(5.0)
                continue
            for row in batch:
                if row.get("first_job") is not None and not reserve_outputs_through(ctx, row["first_job"]):
                    break  # what earlier jobs will write comes first; the evictor has been asked for room
                await slots.acquire()
                if ctx.stopping.is_set():
                    slots.release()
                    break
                ctx.downloading.add(row["id"])
                task = asyncio.create_task(download_one(ctx, row["id"], slots))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await ctx.wait_change(0.5)
    finally:
        for task in list(in_flight):
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


async def download_one(ctx: Context, file_id: int, slots: asyncio.Semaphore) -> None:
    """One file through the fetcher; whatever goes wrong is logged in one line and the slot is freed."""
    try:
        outcome = await ctx.fetcher.fetch(file_id)
        if outcome.state != "on_disk":
            log.warning("%s: %s (%s)", outcome.relpath, outcome.state, getattr(outcome, "error", None))
    except asyncio.CancelledError:
        raise
    except Exception as err:  # the fetcher has put the row where it is not picked again at once
        log.error("download of file %d failed: %s: %s", file_id, type(err).__name__, err)
    finally:
        slots.release()
        ctx.downloading.discard(file_id)
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
