"""The dispatch stage: decide which jobs can run, reserve what they will write, submit them to the executor."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from streamer import clock
from streamer.execution import jobs as job_kinds
from streamer.execution.base import BrokenProcessPool, ClusterLost
from streamer.execution.timing import run_timed
from streamer.ledger import jobs as ledger_jobs
from streamer.rules.affinity import jobs_for_slots
from streamer.rules.calibration import CalibrationUnavailable, MasterOption, choose_fallback
from streamer.rules.readiness import Blocked, NeedsMaster, PinnedInput, Readiness, Ready, Wait, readiness
from streamer.rules.reservations import PendingOutput, plan_reservations
from streamer.service.budget import estimate_product_bytes
from streamer.service.context import Context
from streamer.service.graph import build_configured_graph
from streamer.service.records import Submitted, record_job_failure

log = logging.getLogger("streamer.service")


#: Ready jobs looked at beyond the free slots, so that a worker can find one that uses the masters it holds.
AFFINITY_LOOKAHEAD = 32
#: The inputs whose identity makes a job's affinity key: a worker keeps these masters in memory.
CACHED_MASTER_KINDS = ("master_bias", "master_flat")


async def dispatcher(ctx: Context, results: asyncio.Queue[Submitted]) -> None:
    """Fill free executor slots with ready jobs while their outputs fit the budget.

    Jobs without an affinity key (masters) go in job order; an exposure goes preferably to the worker
    that last ran one with the same masters (:func:`streamer.rules.affinity.jobs_for_slots`).
    """
    while not ctx.stopping.is_set():
        free = ctx.executor.slots - len(ctx.running_jobs)
        if free > 0 and not ctx.disk.paused:  # a full filesystem holds new work (service.diskspace)
            for job, key in jobs_to_start(ctx, free):
                if not reserve_outputs_through(ctx, job["id"]):
                    break
                submit(ctx, job, results, affinity=key)
        await ctx.wait_change(2.0)


def jobs_to_start(ctx: Context, free: int) -> list[tuple[dict[str, Any], str | None]]:
    """Up to ``free`` ready jobs with their affinity keys, chosen for the workers that are free."""
    candidates = ready_jobs(ctx, free + AFFINITY_LOOKAHEAD)
    keys = [affinity_key(ctx, job) for job in candidates]
    chosen = jobs_for_slots(keys, ctx.executor.affinity_slots(), free)
    return [(candidates[i], keys[i]) for i in chosen]


def affinity_key(ctx: Context, job: dict[str, Any]) -> str | None:
    """The identity of the master files an exposure reads (ledger file ids); None for other jobs."""
    if job["kind"] != "exposure":
        return None
    pinned = ledger_jobs.pinned_inputs(ctx.ledger, job["id"])
    masters = sorted(int(r["id"]) for r in pinned if r["producer_kind"] in CACHED_MASTER_KINDS)
    return "masters:" + ",".join(map(str, masters)) if masters else None


def ready_jobs(ctx: Context, limit: int) -> list[dict[str, Any]]:
    """The first jobs that can run now; on the way, block those that never can and re-pin fallback masters."""
    ready: list[dict[str, Any]] = []
    for job in ledger_jobs.candidate_jobs(ctx.ledger, now=clock.now()):
        if job["id"] in ctx.running_jobs:
            continue
        verdict = resolve(ctx, job, job_readiness(ctx, job))
        if isinstance(verdict, Ready):
            ready.append(job)
            if len(ready) >= limit:
                break
        elif isinstance(verdict, Blocked):
            block(ctx, job, verdict.reason)
    return ready


def job_readiness(ctx: Context, job: dict[str, Any]) -> Readiness:
    inputs = [
        PinnedInput(
            file_id=r["id"], kind=r["kind"], state=r["state"], attempts=r["attempts"],
            producer_kind=r["producer_kind"], producer_state=r["producer_state"], relpath=r["relpath"],
            parked=bool(r["parked"]),
        )  # fmt: skip
        for r in ledger_jobs.pinned_inputs(ctx.ledger, job["id"])
    ]
    return readiness(job["kind"], inputs, burst=ctx.burst, max_missing_attempts=ctx.config.archive.missing_max_attempts)


def resolve(ctx: Context, job: dict[str, Any], verdict: Readiness) -> Readiness:
    """Carry out a ``NeedsMaster`` verdict: pin the nearest night's master (then wait for it), or block."""
    if not isinstance(verdict, NeedsMaster):
        return verdict
    night = dt.date.fromisoformat(job["night"])
    rows = ledger_jobs.master_options(ctx.ledger, verdict.producer_kind, job["ccdid"], job["filtercode"])
    options = [MasterOption(file_id=o["file_id"], night=dt.date.fromisoformat(o["night"])) for o in rows]
    choice = choose_fallback(
        night, verdict.producer_kind, job["filtercode"], options,
        max_gap_days=ctx.config.detrend.max_calibration_gap_days, replaces=verdict.replaces,
    )  # fmt: skip
    if isinstance(choice, CalibrationUnavailable):
        return Blocked(choice.reason)
    message = f"{job['key']}: using the {choice.description} of {choice.night.isoformat()}"
    if verdict.producer_kind == "master_flat" and ctx.config.detrend.flat_normalisation == "focalplane":
        message += repin_focalplane(ctx, job, choice.night.isoformat())
    ledger_jobs.repin_master(ctx.ledger, job, add=choice.file_id, drop=choice.replaces, message=message)
    if any(o["file_id"] == choice.file_id and o["file_state"] == "deleted" and o["job_state"] == "done" for o in rows):
        # made and since evicted: that night's graph, built again, reopens the master and pins its
        # inputs (now that this job pins it), down the chain; its files are fetched again. Once
        # reopened its job is no longer done, so the other jobs that fall back to it build nothing
        build_configured_graph(ctx.config, ctx.ledger, choice.night.isoformat(), [job["ccdid"]])
    return Wait()  # looked at again in the next round, with the new pin


def repin_focalplane(ctx: Context, job: dict[str, Any], night: str) -> str:
    """Pin the focal-plane factors of the night whose master flat an exposure falls back to; what to add to the event.

    Its own night's factors do not hold its CCD (no flat of it that night). Factors made and since
    evicted are not made again (that night's flats of every CCD would be needed): the exposure then
    has no factor, and its catalogue says so.
    """
    factors = ledger_jobs.focalplane_product(ctx.ledger, night, job["filtercode"])
    if factors is None or (factors["file_state"] == "deleted" and factors["job_state"] == "done"):
        ledger_jobs.repin_focalplane(ctx.ledger, job, None)
        return f", without a focal-plane factor (none of {night} is on disk)"
    ledger_jobs.repin_focalplane(ctx.ledger, job, int(factors["file_id"]))
    return " and its focal-plane factor"


def block(ctx: Context, job: dict[str, Any], reason: str) -> None:
    ledger_jobs.block_job(ctx.ledger, job, reason)
    log.warning("%s blocked: %s", job["key"], reason)


def reserve_outputs_through(ctx: Context, last_job: int) -> bool:
    """Reserve, in job order, the bytes that unfinished jobs up to ``last_job`` will write.

    Outputs are reserved in the same order as downloads, so a budget filled with inputs of later
    jobs can never keep an earlier job from writing the masters those later jobs wait for.
    False when the next reservation does not fit yet (the evictor is asked for the room).
    """
    pending = [
        PendingOutput(file_id=r["file_id"], job_id=r["job_id"], size=estimate_product_bytes(ctx.ledger, r["relpath"], r["kind"]))
        for r in ledger_jobs.unreserved_outputs_through(ctx.ledger, last_job)
    ]
    if not pending:
        ctx.output_bytes_wanted = 0
        return True
    plan = plan_reservations(
        pending, committed=ctx.ledger.committed_bytes(), overhead=ctx.overhead(), budget=ctx.budget
    )
    ledger_jobs.reserve_outputs(ctx.ledger, [(o.file_id, o.size) for o in plan.reserve])
    ctx.output_bytes_wanted = plan.blocked_size  # the evictor sees it within its next check
    return plan.complete


def submit(ctx: Context, job: dict[str, Any], results: asyncio.Queue[Submitted], *, affinity: str | None = None) -> None:
    """Mark the job running and hand its call to the executor (timed: :func:`run_timed`) with its
    affinity key; its result goes to the record stage.

    A call that cannot be built (an input the job kind does not expect) or that the executor refuses
    is a failure of this job, not of the service: recorded by the failure policy (retried with
    backoff, parked after the last attempt) with one log line.
    """
    ledger_jobs.start_job(ctx.ledger, job)  # first: the attempt counts even when the call cannot be made
    generation = ctx.executor.generation
    try:
        call = job_kinds.build_call(ctx.ledger, ctx.config, job)
        try:
            concurrent = ctx.executor.submit_with_affinity(affinity, run_timed, call.function, call.kwargs)
        except BrokenProcessPool:
            ctx.executor.replace(generation)
            generation = ctx.executor.generation
            concurrent = ctx.executor.submit_with_affinity(affinity, run_timed, call.function, call.kwargs)
    except ClusterLost:
        ledger_jobs.return_dropped(ctx.ledger, job, "not submitted: the compute cluster was lost")
        raise  # the service stops; the next start continues
    except Exception as err:
        outputs = ledger_jobs.output_relpaths(ctx.ledger, job["id"])
        record_job_failure(ctx, job, err, generation=generation, outputs=outputs)
        return
    future = asyncio.wrap_future(concurrent)
    ctx.running_jobs[job["id"]] = future
    item = Submitted(job=job, call=call, future=future, generation=generation)
    future.add_done_callback(lambda _f: results.put_nowait(item))
