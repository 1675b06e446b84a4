"""The planning stage: search the archive for each due night, build its work graph, check the budget.

A night is planned once, unless its plan had no job, was made while IRSA may still have been
ingesting it, or was made for other consumers: then it is planned again by the rules of
:mod:`streamer.rules.replan` (by every later backfill; by a daemon after growing delays, or at
once for changed consumers). The ledger's meta keeps, per night and CCD list, the job counts of
the last plan (``planned:<night>:<ccds>``), the hash of the consumers it was planned for
(``consumers:<night>:<ccds>``) and the count of empty plans, the count of plans with jobs
(``looks``), the time of the last plan and the date of the daemon's
next look (``empty_plan:<night>:<ccds>``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Sequence

from streamer import clock
from streamer.archive.client import BURST_MAX_OUTAGE_S, BURST_MAX_WAIT_PER_OPERATION_S
from streamer.ledger import jobs as ledger_jobs
from streamer.rules.nights import follow_nights, night_ends_at
from streamer.rules.replan import (
    INGESTION_WINDOW_S,
    PlanRecord,
    next_look_s,
    partial_look_at,
    plan_due,
    replan_delay,
)
from streamer.service.budget import check_budget
from streamer.service.context import Context, wait_event
from streamer.service.graph import build_configured_graph
from streamer.service.plan import PlanError, plan_night

log = logging.getLogger("streamer.service")

#: Seconds a backfill gives the planning of one night (searches, flat LED reads) before it gives up with an error.
BURST_PLAN_TIMEOUT_S = 1800.0


async def planner(ctx: Context, nights: Sequence[dt.date], ccds: Sequence[int]) -> None:
    """Plan every due night; plan empty ones again when due; in follow mode, look again every ``poll_minutes``."""
    if ctx.burst and ctx.client is not None:
        ctx.client.bound_waiting(per_operation_s=BURST_MAX_WAIT_PER_OPERATION_S, per_outage_s=BURST_MAX_OUTAGE_S)
    seen: set[dt.date] = set()
    while not ctx.stopping.is_set():
        ctx.planning = True
        try:
            for night in nights_due(ctx, nights):
                if ctx.stopping.is_set():
                    return
                if plan_due(plan_record(ctx, night, ccds), now=clock.now(), burst=ctx.burst, seen_this_run=night in seen):
                    await plan_one_night(ctx, night, ccds)
                    ctx.sweep_due = True
                    ctx.poke()
                seen.add(night)
        finally:
            ctx.planning = False
        ctx.planning_done.set()
        ctx.poke()
        if ctx.burst:
            return
        wait = next_look_s([plan_record(ctx, n, ccds) for n in nights_due(ctx, nights)], now=clock.now())
        if ctx.config.follow.enabled:
            wait = min(wait if wait is not None else float("inf"), ctx.config.follow.poll_minutes * 60)
        if wait is None:
            return
        await wait_event(ctx.stopping, wait)


def plan_key(night: dt.date, ccds: Sequence[int], what: str = "planned") -> str:
    return f"{what}:{night.isoformat()}:{','.join(map(str, ccds))}"


def plan_record(ctx: Context, night: dt.date, ccds: Sequence[int]) -> PlanRecord:
    """What the ledger's meta says of this night's plans (see the module docstring)."""
    counts = ctx.ledger.get_meta(plan_key(night, ccds))
    if counts is None:
        return PlanRecord(planned=False)
    # a ledger from before the hash was recorded: planned again once, to write its ``keeps`` rows
    changed = ctx.ledger.get_meta(plan_key(night, ccds, "consumers")) != ctx.config.consumers_hash()
    empty = ctx.ledger.get_meta(plan_key(night, ccds, "empty_plan"))
    if empty is None:  # a ledger from before empty plans were counted: an empty one is due at once
        no_job = sum(json.loads(counts).values()) == 0
        return PlanRecord(planned=True, empty_plans=int(no_job), replan_at=0.0 if no_job else None, consumers_changed=changed)
    record = json.loads(empty)
    return PlanRecord(
        planned=True, empty_plans=int(record["plans"]), replan_at=record["replan_at"],
        last_plan_at=record.get("last_plan_at"), night_ends_at=night_ends_at(night), consumers_changed=changed,
    )  # fmt: skip


async def plan_one_night(ctx: Context, night: dt.date, ccds: Sequence[int]) -> None:
    log.info("planning %s for CCDs %s", night, ",".join(map(str, ccds)))
    try:
        async with asyncio.timeout(BURST_PLAN_TIMEOUT_S if ctx.burst else None):
            await plan_night(ctx.client, ctx.ledger, ctx.config, night, ccds)
    except TimeoutError:
        raise PlanError(
            f"night {night}: the archive did not answer its searches within {BURST_PLAN_TIMEOUT_S:.0f} s "
            "(a backfill waits no longer; run it again later)"
        ) from None
    counts = build_configured_graph(ctx.config, ctx.ledger, night.isoformat(), ccds)
    ctx.ledger.set_meta(plan_key(night, ccds), json.dumps(counts))
    ctx.ledger.set_meta(plan_key(night, ccds, "consumers"), ctx.config.consumers_hash())
    ctx.ledger.event("plan", f"night {night}: jobs {counts}")
    if sum(counts.values()) == 0:
        record_empty_plan(ctx, night, ccds)
    else:
        record_plan_with_jobs(ctx, night, ccds)
    await probe_sizes(ctx)
    check_budget(ctx.config, ctx.ledger)


def record_plan_with_jobs(ctx: Context, night: dt.date, ccds: Sequence[int]) -> None:
    """A plan with jobs: while it may be partial (within the ingestion window), schedule the daemon's next look."""
    earlier = json.loads(ctx.ledger.get_meta(plan_key(night, ccds, "empty_plan")) or "{}")
    now = clock.now()
    looks = int(earlier.get("looks", 0)) + 1
    replan_at = partial_look_at(looks, now=now, night_end=night_ends_at(night))
    record = {"plans": 0, "replan_at": replan_at, "looks": looks, "last_plan_at": now}
    ctx.ledger.set_meta(plan_key(night, ccds, "empty_plan"), json.dumps(record))
    if replan_at is not None:
        log.info("night %s: planned within %.0f h of its end, looked at again in %.0f h for files IRSA adds later",
                 night, INGESTION_WINDOW_S / 3600, (replan_at - now) / 3600)  # fmt: skip


def record_empty_plan(ctx: Context, night: dt.date, ccds: Sequence[int]) -> None:
    """Count one more empty plan of the night and schedule the daemon's next look (none after the last)."""
    earlier = ctx.ledger.get_meta(plan_key(night, ccds, "empty_plan"))
    plans = (0 if earlier is None else int(json.loads(earlier)["plans"])) + 1
    delay = replan_delay(plans)
    now = clock.now()
    replan_at = None if delay is None else now + delay
    ctx.ledger.set_meta(
        plan_key(night, ccds, "empty_plan"), json.dumps({"plans": plans, "replan_at": replan_at, "last_plan_at": now})
    )
    when = "a daemon looks no more" if delay is None else f"planned again in {delay / 3600:.0f} h by a daemon"
    message = f"night {night}: nothing planned (empty plan {plans}); every backfill plans it again, {when}"
    log.warning("%s", message)
    ctx.ledger.event("plan_empty", message, level="warning")


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
    now = clock.utcnow()
    first = None if start is None else dt.date.fromisoformat(start)
    due = follow_nights(now, delay_hours=ctx.config.follow.delay_hours, first=first)
    if start is None and due:
        ctx.ledger.set_meta("follow_start", due[0].isoformat())
    return sorted(set(nights) | set(due))
