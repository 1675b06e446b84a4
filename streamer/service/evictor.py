"""The eviction stage: free erasable files between the watermarks, or when a reservation waits for room.

A backfill ends by removing every erasable file (``evict(force=True)`` in the app). A daemon does the
same each time its work is done since the last sweep (:func:`daemon_idle`), so that each night ends
with only what consumers keep, as after a backfill, rather than with raws cached up to the watermark.
"""

from __future__ import annotations

import logging

from streamer.config import format_size
from streamer.ledger import jobs as ledger_jobs
from streamer.ledger import report as report_queries
from streamer.rules.eviction import bytes_to_free, choose_victims
from streamer.service.context import Context, Finished
from streamer.service.downloads import report_stuck
from streamer.storage.deleter import delete_files

log = logging.getLogger("streamer.service")

#: Checks in a row that must find nothing moving before the service says it is stuck.
STUCK_CHECKS = 3


async def evictor(ctx: Context) -> None:
    """Evict as the budget asks; when nothing can move three checks running, say so (a backfill then ends)."""
    still_stuck = 0
    while not ctx.stopping.is_set():
        need = (ctx.space.bytes_wanted if ctx.space.space_wanted.is_set() else 0) + ctx.output_bytes_wanted
        freed = evict(ctx, need=need)
        if freed or not need:
            still_stuck = 0
        if freed:
            ctx.space.space_freed()
        elif need and nothing_moves(ctx):
            still_stuck += 1
            if still_stuck >= STUCK_CHECKS:
                report_stuck(ctx, need)
                if ctx.burst:
                    raise Finished
        elif ctx.stuck_reason is not None and not need:
            ctx.ledger.event("unstuck", "downloads resumed: space was freed")
            ctx.stuck_reason = None
        if ctx.sweep_due and daemon_idle(ctx):
            ctx.sweep_due = False
            evict(ctx, force=True)
        await ctx.wait_change(1.0 if need else 2.0)


def daemon_idle(ctx: Context) -> bool:
    """A daemon with nothing to do: no plan under way, nothing running or downloading, every task
    finished, and (with ``report.after_night``) no night waiting for its report, which reads the masters."""
    if ctx.burst or ctx.planning or ctx.running_jobs or ctx.downloading or ctx.stopping.is_set():
        return False
    if ledger_jobs.unfinished_count(ctx.ledger):
        return False
    return not (ctx.config.report.after_night and report_queries.finished_nights_without_report(ctx.ledger))


def nothing_moves(ctx: Context) -> bool:
    """Every download waits for budget, no task runs, and none could start (a disk pause is not stuck: it waits for room)."""
    waiting = ctx.space.bytes_wanted > 0 or ctx.output_bytes_wanted > 0
    transfers = len(ctx.downloading) - len(ctx.space.waiting_files)
    return waiting and transfers <= 0 and not ctx.running_jobs and not ctx.disk.waiting


def evict(ctx: Context, *, need: int = 0, force: bool = False) -> int:
    """Free erasable files as the watermarks (or a pending reservation) ask; return bytes freed.

    Disk use is read again after every batch, so a figure that moved meanwhile is not acted on.
    """
    freed_total = 0
    while True:
        amount = bytes_to_free(ctx.used_bytes(), ctx.marks, need=need, force=force)
        if amount <= 0:
            break
        victims = choose_victims(ctx.ledger.erasable(limit=200), amount)
        if not victims:
            break
        freed = delete_files(ctx.ledger, ctx.config.storage.root, victims)
        freed_total += freed
        if freed == 0:
            break
    if freed_total:
        log.info("evicted %s", format_size(freed_total))
        ctx.poke()
    return freed_total
