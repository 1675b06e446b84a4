"""The heartbeat stage: watchdog pings, the STATUS line, progress, executor load for status, event pruning."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from streamer import __version__, clock
from streamer.config import format_size
from streamer.ledger import jobs as ledger_jobs
from streamer.ledger import report as ledger_report
from streamer.ledger.core import Ledger
from streamer.ledger.disk import pause_line
from streamer.service.context import Context, wait_event

log = logging.getLogger("streamer.service")

STATUS_LOG_EVERY_S = 300.0
PRUNE_EVERY_S = 3600.0


async def heartbeat(ctx: Context) -> None:
    """Liveness from the event loop itself, so a stuck loop stops the watchdog pings."""
    ctx.notifier.ready("started")
    interval = ctx.notifier.watchdog_interval_s or 30.0
    last_prune = last_line = 0.0
    progress = Progress(ctx.ledger) if ctx.burst else None
    try:
        while not ctx.stopping.is_set():
            ctx.notifier.watchdog()
            line = status_line(ctx)
            ctx.notifier.status(line)
            record_service_info(ctx)
            ledger_report.record_disk_sample(ctx.ledger, budget=ctx.budget, overhead=ctx.overhead())
            if progress is not None:
                progress.update()
            elif time.monotonic() - last_line > STATUS_LOG_EVERY_S:
                log.info("%s", line)
                last_line = time.monotonic()
            if clock.now() - last_prune > PRUNE_EVERY_S:  # the service's clock: a test's jump of a day prunes
                ctx.ledger.prune_events(older_than_s=ctx.config.service.event_retention_days * 86400)
                ledger_report.prune_disk_samples(ctx.ledger, older_than_s=ctx.config.service.event_retention_days * 86400)
                last_prune = clock.now()
            await wait_event(ctx.stopping, min(interval, 5.0))
    finally:
        if progress is not None:
            progress.close()


def record_service_info(ctx: Context, *, stopped: bool = False) -> None:
    """What status shows of the running service, executor workers and load included; ``stopped`` at its end."""
    try:
        executor = ctx.executor.describe()
    except Exception as err:  # a cluster that went away must not stop the heartbeat
        executor = {"error": f"{type(err).__name__}: {err}"}
    ctx.ledger.set_meta(
        "service",
        json.dumps({"pid": os.getpid(), "started": ctx.started, "burst": ctx.burst, "executor": executor,
                    "version": __version__, "running_tasks": len(ctx.running_jobs),
                    "downloads": len(ctx.downloading), "stopped": clock.now() if stopped else None}),
    )  # fmt: skip


def status_line(ctx: Context) -> str:
    """systemd's STATUS: the disk pause first when there is one, the jobs by state, the disk against the budget in effect."""
    counts = ", ".join(f"{state} {n}" for state, n in sorted(ledger_jobs.job_state_counts(ctx.ledger).items()))
    line = f"jobs: {counts or 'none'}; disk {format_size(ctx.used_bytes())} of {format_size(ctx.budget)}"
    paused = pause_line(ctx.disk.describe())
    return f"{paused}; {line}" if paused else line


class Progress:
    """Backfill progress: a bar on a terminal (rich), a plain line every 30 s otherwise."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.last_line = 0.0
        self.bar: Any = None
        self.task: Any = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("backfill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                TimeElapsedColumn(), transient=False,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("", total=None)

    def update(self) -> None:
        counts = ledger_jobs.job_state_counts(self.ledger)
        total = sum(counts.values())
        finished = sum(counts.get(state, 0) for state in ("done", "blocked", "parked"))
        detail = f"running {counts.get('running', 0)}, files on disk {ledger_jobs.files_on_disk(self.ledger)}"
        if self.bar is not None:
            self.bar.update(self.task, total=total or None, completed=finished, description=detail)
        elif time.monotonic() - self.last_line >= 30:
            print(f"progress: {finished}/{total} tasks finished, {detail}", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.update()
            self.bar.stop()
