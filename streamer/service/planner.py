"""The planning stage: search the archive for each due night, build its work graph, check the budget."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence

from streamer.ledger import jobs as ledger_jobs
from streamer.rules.nights import follow_nights
from streamer.service.budget import check_budget
from streamer.service.context import Context, wait_event
from streamer.service.graph import build_night_graph
from streamer.service.plan import plan_night

log = logging.getLogger("streamer.service")


async def planner(ctx: Context, nights: Sequence[dt.date], ccds: Sequence[int]) -> None:
    """Plan every due night once; in follow mode, look again every ``poll_minutes``."""
    planned: set[dt.date] = set()
    while not ctx.stopping.is_set():
        for night in [n for n in nights_due(ctx, nights) if n not in planned]:
            if ctx.stopping.is_set():
                return
            key = f"planned:{night.isoformat()}:{','.join(map(str, ccds))}"
            if ctx.ledger.get_meta(key) is None:
                await plan_one_night(ctx, night, ccds, key)
            planned.add(night)
            ctx.poke()
        if ctx.burst or not ctx.config.follow.enabled:
            ctx.planning_done.set()
            ctx.poke()
            return
        await wait_event(ctx.stopping, ctx.config.follow.poll_minutes * 60)


async def plan_one_night(ctx: Context, night: dt.date, ccds: Sequence[int], key: str) -> None:
    log.info("planning %s for CCDs %s", night, ",".join(map(str, ccds)))
    await plan_night(ctx.client, ctx.ledger, ctx.config, night, ccds)
    counts = build_night_graph(
        ctx.ledger, night.isoformat(), ccds,
        bias_skip_first=ctx.config.detrend.bias_skip_first,
        focalplane=ctx.config.detrend.flat_normalisation == "focalplane", consumers=ctx.config.consumers,
        catalogue_layout=ctx.config.photometry.layout,
    )  # fmt: skip
    ctx.ledger.set_meta(key, json.dumps(counts))
    ctx.ledger.event("plan", f"night {night}: jobs {counts}")
    await probe_sizes(ctx)
    check_budget(ctx.config, ctx.ledger)


async def probe_sizes(ctx: Context) -> None:
    """Learn the size of one file of each class with a HEAD, so the minimum budget scales with the data."""
    for file_id in ledger_jobs.size_probe_samples(ctx.ledger):
        try:
            await ctx.fetcher.probe_size(file_id)
        except Exception as err:  # a file the archive refuses is found out by its download
            log.info("size probe of file %d failed: %s", file_id, err)


def nights_due(ctx: Context, nights: Sequence[dt.date]) -> list[dt.date]:
    """The configured nights, and in follow mode every night since the first followed one."""
    if ctx.burst or not ctx.config.follow.enabled:
        return sorted(set(nights))
    start = ctx.ledger.get_meta("follow_start")
    now = dt.datetime.now(dt.UTC)
    first = None if start is None else dt.date.fromisoformat(start)
    due = follow_nights(now, delay_hours=ctx.config.follow.delay_hours, first=first)
    if start is None and due:
        ctx.ledger.set_meta("follow_start", due[0].isoformat())
    return sorted(set(nights) | set(due))
