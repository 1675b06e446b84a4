"""The service: plan -> download -> dispatch -> record -> evict, as one asyncio program.

It only schedules and records: the decisions are pure rules (``streamer.rules``), the SQL is
in ``streamer.ledger``, numerics run in worker processes (``streamer.execution``), files move
through the fetcher. Each stage is a small coroutine over a shared :class:`Context`; this
module wires them into one task group. ``run`` is the daemon (backfill ranges, then follow new
nights); ``backfill`` is the same service in burst mode, which ends when nothing more can happen.

Scheduling rules:
- downloads go in job order (``jobs.id``): a file is reserved only after every file of
  earlier jobs was, so a tight budget cannot fill up with inputs of jobs that wait for
  calibrations whose inputs no longer fit;
- a job is ready when its pinned files are settled (on disk, or given up) and its
  essential inputs are on disk; an exposure whose master cannot be made takes the
  nearest night's within ``max_calibration_gap_days``, or is blocked with that reason;
- when a reservation does not fit, the evictor frees erasable files first; when nothing
  can move, the service says so (and a backfill ends with exit code 1);
- the budget in effect is capped by what the filesystem can hold, and a full filesystem pauses
  downloads and dispatch until there is room again; a full ledger filesystem stops the service
  with one line (``streamer.service.diskspace``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import signal
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from streamer.config import Config
from streamer.errors import StreamerError
from streamer.execution.base import Executor
from streamer.execution.select import make_executor
from streamer.ledger import jobs as ledger_jobs
from streamer.ledger.core import Ledger
from streamer.ledger.downloads import outage_recorder
from streamer.ledger.report import record_disk_sample
from streamer.rules.nights import night_range
from streamer.service.budget import check_budget, record_minimum
from streamer.service.context import Context, Finished
from streamer.service.diskspace import LedgerFullError, disk_watcher, fit_budget, ledger_full
from streamer.service.dispatch import block, dispatcher, ready_jobs
from streamer.service.downloads import candidates, downloader
from streamer.service.evictor import evict, evictor
from streamer.service.heartbeat import heartbeat, record_service_info
from streamer.service.metrics import metrics_server
from streamer.service.planner import planner
from streamer.service.records import Submitted, record, recorder
from streamer.service.report import reporter, write_pending_reports
from streamer.storage.deleter import recover_deletions, unlink_below
from streamer.storage.tree import orphan_product_temporaries

log = logging.getLogger("streamer.service")

@dataclass
class RunSummary:
    """What a backfill reports at its end."""

    jobs: dict[str, int] = field(default_factory=dict)
    missing_files: int = 0
    stuck_reason: str | None = None
    stopped_by: str | None = None

    @property
    def complete(self) -> bool:
        """Every job done, nothing missing, and the run was not stopped before its end."""
        unfinished = sum(n for state, n in self.jobs.items() if state != "done")
        return unfinished == 0 and self.missing_files == 0 and self.stuck_reason is None and self.stopped_by is None


class Service:
    """One running service over one ledger: the stages, wired in one task group."""

    def __init__(self, config: Config, ledger: Ledger, executor: Executor, *, burst: bool) -> None:
        self.ctx = Context(config=config, ledger=ledger, executor=executor, burst=burst)
        self.results: asyncio.Queue[Submitted] = asyncio.Queue()

    def stop(self, signum: int | None = None) -> None:
        self.ctx.stop(signum)

    async def run(self, nights: Sequence[dt.date], ccds: Sequence[int]) -> RunSummary:
        from streamer.archive.auth import load_credentials
        from streamer.archive.client import ArchiveClient
        from streamer.service.fetcher import Fetcher, SpaceSignal

        ctx = self.ctx
        self._install_signal_handlers()
        recover(ctx)
        ctx.budget = fit_budget(ctx)
        ctx.disk.poll()  # no pause left over from an earlier run
        auth = ctx.config.archive.auth
        credentials = load_credentials(auth) if auth is not None else None
        record_outage = outage_recorder(ctx.ledger)
        async with ArchiveClient(ctx.config.archive, credentials=credentials, outage_recorder=record_outage) as client:
            ctx.client = client
            ctx.space = SpaceSignal(poll_s=2.0)
            storage = dataclasses.replace(ctx.config.storage, budget=ctx.budget)
            ctx.fetcher = Fetcher(client, ctx.ledger, storage, space=ctx.space, overhead=ctx.overhead)
            ctx.fetcher.disk = ctx.disk  # one disk pause for downloads and dispatch
            ctx.fetcher.remove_orphan_parts()
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(planner(ctx, nights, ccds))
                    group.create_task(downloader(ctx))
                    group.create_task(dispatcher(ctx, self.results))
                    group.create_task(recorder(ctx, self.results))
                    group.create_task(evictor(ctx))
                    group.create_task(heartbeat(ctx))
                    group.create_task(disk_watcher(ctx))
                    group.create_task(until_finished(ctx))
                    if ctx.config.metrics.listen is not None:
                        group.create_task(metrics_server(ctx))
                    if ctx.config.report.after_night and not ctx.burst:
                        group.create_task(reporter(ctx))
            except* Finished:
                pass
            except* StreamerError as group:
                raise group.exceptions[0] from None
            finally:
                ctx.stopping.set()
        await drain(ctx, self.results)
        if ctx.config.report.after_night:
            await write_pending_reports(ctx)  # before the final eviction, so the masters are still there
        if ctx.burst and ctx.stuck_reason is None:
            evict(ctx, force=True)
        record_minimum(ctx.config, ctx.ledger)
        record_disk_sample(ctx.ledger, budget=ctx.budget, overhead=ctx.overhead())
        record_service_info(ctx, stopped=True)
        return summary(ctx)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self.ctx.stop, signum)


def recover(ctx: Context) -> None:
    """After any stop: finish what a crash interrupted, and remove half-made products and temporaries."""
    root = ctx.config.storage.root
    counts = ctx.ledger.recover()
    forgotten = ctx.ledger.forget_consumers([c.name for c in ctx.config.consumers])
    if forgotten:
        log.info("%d keeps rows of consumers no longer configured dropped", forgotten)
    for row in ledger_jobs.unrecorded_products(ctx.ledger):
        unlink_below(root, row["relpath"])  # a product written but never recorded is made again
    for relpath in orphan_product_temporaries(root):
        unlink_below(root, relpath)  # a worker killed while writing leaves its temporary file
    ledger_jobs.clear_product_reservations(ctx.ledger)
    finished = recover_deletions(ctx.ledger, root)
    if any(counts.values()) or finished:
        log.info("recovered after an unclean stop: %s, %d deletions finished", counts, finished)
    record_service_info(ctx)


async def until_finished(ctx: Context) -> None:
    """In burst mode, end when planning is over and no job can still progress."""
    while True:
        if ctx.stopping.is_set():
            raise Finished
        if ctx.burst and ctx.planning_done.is_set() and not ctx.running_jobs and not ctx.downloading:
            if ledger_jobs.unfinished_count(ctx.ledger) == 0:
                raise Finished
            if not ready_jobs(ctx, 1) and not candidates(ctx, 1) and ledger_jobs.earliest_retry(ctx.ledger) is None:
                for job in ledger_jobs.waiting_or_ready(ctx.ledger):
                    block(ctx, job, "inputs cannot be obtained (missing from the archive)")
                raise Finished
        await ctx.wait_change(1.0)


async def drain(ctx: Context, results: asyncio.Queue[Submitted]) -> None:
    """Give running tasks ``shutdown_grace_s`` to finish and record them; the rest run again next time."""
    interrupted: set[int] = set()
    if ctx.running_jobs:
        grace = ctx.config.service.shutdown_grace_s
        log.info("waiting up to %.0f s for %d running tasks", grace, len(ctx.running_jobs))
        _done, pending = await asyncio.wait(list(ctx.running_jobs.values()), timeout=grace)
        if pending:
            log.warning("%d tasks did not finish in time; they will run again at the next start", len(pending))
            interrupted = {job_id for job_id, future in ctx.running_jobs.items() if future in pending}
            ctx.executor.shutdown(cancel=True)
            ledger_jobs.interrupt_jobs(ctx.ledger, sorted(interrupted))
        await asyncio.sleep(0)  # let the done callbacks queue their results
    while not results.empty():
        item = results.get_nowait()
        if item.job["id"] not in interrupted:
            record(ctx, item)


def summary(ctx: Context) -> RunSummary:
    return RunSummary(
        jobs=ledger_jobs.job_state_counts(ctx.ledger),
        missing_files=ledger_jobs.missing_input_count(ctx.ledger),
        stuck_reason=ctx.stuck_reason,
        stopped_by=ctx.stopped_by,
    )


def _configured_nights(config: Config) -> list[dt.date]:
    nights: set[dt.date] = set()
    for start, end in config.backfill.ranges:
        nights.update(night_range(start, end))
    return sorted(nights)


def setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=getattr(logging, config.service.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _execute(config: Config, nights: Iterable[dt.date], ccds: Sequence[int], *, burst: bool) -> RunSummary:
    setup_logging(config)
    try:
        return _execute_on_ledger(config, nights, ccds, burst=burst)
    except Exception as err:
        if not ledger_full(err):
            raise
        raise LedgerFullError(
            f"{config.storage.ledger_path}: no room to write the ledger, its lock or the store (a full filesystem); "
            "stopped with the ledger intact: free space there and start again to continue"
        ) from None


def _execute_on_ledger(config: Config, nights: Iterable[dt.date], ccds: Sequence[int], *, burst: bool) -> RunSummary:
    ledger = Ledger.open(config.storage.ledger_path)
    try:
        if ledger_jobs.job_count(ledger):
            check_budget(config, ledger)
        executor = make_executor(config.compute, config.storage.root)
        try:
            service = Service(config, ledger, executor, burst=burst)
            return asyncio.run(service.run(list(nights), ccds))
        finally:
            executor.shutdown(cancel=True)
    finally:
        ledger.close()


def run_daemon(config: Config) -> int:
    """``streamer run``: backfill the configured ranges, then follow new nights until SIGTERM."""
    _execute(config, _configured_nights(config), config.backfill.ccds, burst=False)
    return 0


def run_backfill(config: Config, start: dt.date, end: dt.date, ccds: Sequence[int]) -> int:
    """``streamer backfill``: process the nights once; 0 when everything is done, 1 otherwise."""
    result = _execute(config, night_range(start, end), ccds or config.backfill.ccds, burst=True)
    done = result.jobs.get("done", 0)
    total = sum(result.jobs.values())
    if result.complete:
        print(f"backfill complete: {done} jobs done")
        return 0
    if result.stopped_by is not None:
        print(f"backfill interrupted ({result.stopped_by}): run it again to continue where it stopped")
    parts = [f"{n} {state}" for state, n in sorted(result.jobs.items())]
    print(f"backfill incomplete: jobs {', '.join(parts)} of {total}; {result.missing_files} files missing or corrupt")
    if result.stuck_reason:
        print(f"stopped: {result.stuck_reason}")
    return 1


__all__ = ["RunSummary", "Service", "run_backfill", "run_daemon"]
