"""The record stage: each finished job's result or failure goes into the ledger, in the order they finish.

Results arrive on a queue rather than in future callbacks, so an error while recording is not
lost: a product the job did not write makes the job fail (and retry), and anything unexpected
ends the service, whose restart puts the job back to ready. A job that found no room on the
filesystem goes back to ready, its attempt not counted, what it wrote removed, and the disk pause
holds new work until there is room (:mod:`streamer.service.diskspace`). A job whose worker process
died runs again after a short pause, its attempt not counted, and is parked after a few such
losses in a row (:mod:`streamer.rules.failures`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from streamer import clock
from streamer.errors import StreamerError
from streamer.execution import jobs as job_kinds
from streamer.execution.base import BrokenProcessPool, TaskDropped, WorkerLost
from streamer.ledger import jobs as ledger_jobs
from streamer.rules.failures import Block, ErrorClass, Park, Refetch, Requeue, Retry, WaitForDisk, failure_action
from streamer.service.budget import estimate_product_bytes
from streamer.service.context import Context
from streamer.storage.deleter import unlink_below
from streamer.storage.paths import is_quadrant_product, kind_of

log = logging.getLogger("streamer.service")


class MissingOutput(StreamerError):
    """A job reported success without writing one of its products."""


@dataclass(frozen=True)
class Submitted:
    """A job handed to the executor: its row as submitted, its call, and the pool generation it went to."""

    job: dict[str, Any]
    call: job_kinds.Call
    future: asyncio.Future[Any]
    generation: int


async def recorder(ctx: Context, results: asyncio.Queue[Submitted]) -> None:
    """Record every finished job until the service stops (the drain records the last ones)."""
    while True:
        item = await results.get()
        record(ctx, item)


def record(ctx: Context, item: Submitted) -> None:
    """The ledger's side of a finished future: done, or the failure policy's action."""
    ctx.running_jobs.pop(item.job["id"], None)
    ctx.sweep_due = True
    ctx.poke()
    if item.future.cancelled():
        return
    error = item.future.exception()
    if error is None:
        try:
            record_done(ctx, item.job, item.call, item.future.result())
            return
        except MissingOutput as err:
            error = err
    record_failure(ctx, item, error)


def record_done(ctx: Context, job: dict[str, Any], call: job_kinds.Call, result: Any) -> None:
    outputs = []
    for relpath in call.outputs:
        path = ctx.config.storage.root / relpath
        if not path.is_file():
            if is_quadrant_product(relpath):
                continue  # a lost quadrant has no detrended image or IN2P3 catalogue: the row stays wanted, unreserved
            raise MissingOutput(f"{job['key']}: finished without writing {relpath}")
        info = path.stat()
        outputs.append((relpath, info.st_blocks * 512, info.st_size))
    ledger_jobs.record_done(ctx.ledger, job, outputs, job_kinds.result_record(result))
    log.info("%s done", job["key"])


def error_class(error: BaseException) -> tuple[ErrorClass, str]:
    """The failure policy's name for ``error``, with the reason to record."""
    if isinstance(error, BrokenProcessPool | WorkerLost):
        return "worker_lost", f"worker process died ({type(error).__name__}: {error})"
    verdict = job_kinds.classify_failure(error)
    return verdict.kind, verdict.reason


def record_failure(ctx: Context, item: Submitted, error: BaseException) -> None:
    record_job_failure(ctx, item.job, error, generation=item.generation, outputs=item.call.outputs)


def record_job_failure(
    ctx: Context, job: dict[str, Any], error: BaseException, *, generation: int, outputs: tuple[str, ...]
) -> None:
    """The failure policy's action for a running ``job`` that failed with ``error`` (in the pool of
    ``generation``), carried out in the ledger, with one log line; ``outputs``: the files it writes."""
    if isinstance(error, TaskDropped):
        ledger_jobs.return_dropped(ctx.ledger, job, str(error))
        log.warning("%s: %s; back to ready", job["key"], error)
        return
    if isinstance(error, BrokenProcessPool):
        ctx.executor.replace(generation)  # only the pool this job ran in: a newer one keeps its jobs
    kind, reason = error_class(error)
    action = failure_action(
        kind, reason, attempts_before=job["attempts"], max_attempts=ctx.config.service.max_task_attempts,
        worker_losses_before=job["worker_losses"],
    )  # fmt: skip
    message = f"{type(error).__name__}: {error}"
    if isinstance(action, Requeue):
        ledger_jobs.requeue_job(ctx.ledger, job, reason, not_before=clock.now() + action.delay_s)
        losses = job["worker_losses"] + 1
        log.warning("%s: %s, %d in a row; run again in %.0f s", job["key"], reason, losses, action.delay_s)
        return
    if isinstance(action, WaitForDisk):
        wait_for_disk(ctx, job, outputs, reason)
        return
    if isinstance(action, Block):
        ledger_jobs.block_job(ctx.ledger, job, action.reason)
    elif isinstance(action, Refetch):
        root = ctx.config.storage.root
        ledger_jobs.refetch_raw(ctx.ledger, job, message, reason, lambda relpath: unlink_below(root, relpath))
    elif isinstance(action, Park):
        message = f"{action.reason}; last error: {message}" if action.reason else message
        ledger_jobs.park_job(ctx.ledger, job, message, worker_lost=kind == "worker_lost")
    elif isinstance(action, Retry):
        ledger_jobs.fail_job(ctx.ledger, job, message, not_before=clock.now() + action.delay_s)
    log.warning("%s: %s", job["key"], message)


def wait_for_disk(ctx: Context, job: dict[str, Any], outputs: tuple[str, ...], reason: str) -> None:
    """The job found no room: remove what it wrote, put it back to ready (uncounted), pause new work until there is room."""
    root = ctx.config.storage.root
    need = 0
    for relpath in outputs:
        row = ctx.ledger.file_by_relpath(relpath)
        if row is not None and row["state"] == "on_disk":
            continue
        unlink_below(root, relpath)  # a product of this failed run, never recorded: it is made again
        need += estimate_product_bytes(ctx.ledger, relpath, kind_of(relpath) or "")
    ledger_jobs.return_for_disk(ctx.ledger, job, reason)
    ctx.disk.trip(f"{job['key']}: {reason}", need)
