"""The service: plan -> download -> execute -> record -> evict, as one asyncio program.

It only schedules and records: numerics run in worker processes (``executor.py``),
files move through ``archive/fetch.py``, retention is decided in ``evict.py``. It is the
only writer of the ledger. ``run`` is the daemon (backfill ranges, then follow new
nights); ``backfill`` is the same service in burst mode, which ends when nothing more
can happen.

Scheduling rules:
- downloads go in job order (``jobs.id``): a file is reserved only after every file of
  earlier jobs was, so a tight budget cannot fill up with inputs of jobs that wait for
  calibrations whose inputs no longer fit;
- a job is ready when its pinned files are settled (on disk, or given up) and its
  essential inputs are on disk; an exposure whose master cannot be made takes the
  nearest night's within ``max_calibration_gap_days``, or is blocked with that reason;
- when a reservation does not fit, the evictor frees erasable files first; when nothing
  can move, the service says so (and a backfill ends with exit code 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer import __version__
from streamer.execution import jobs as tasks
from streamer.config import Config, format_size
from streamer.errors import StreamerError
from streamer.rules.eviction import Watermarks, bytes_to_free, choose_victims
from streamer.storage.deleter import delete_files, recover_deletions, unlink_below
from streamer.execution.base import BrokenProcessPool, Executor, WorkerLost
from streamer.execution.select import make_executor
from streamer.service.budget import check_budget, estimate_product_bytes, record_minimum
from streamer.service.graph import build_night_graph
from streamer.ledger.core import Ledger
from streamer.storage.tree import walk_regular_files
from streamer.service.systemd import Notifier

log = logging.getLogger("streamer.service")

ESSENTIAL_KINDS = frozenset({"raw", "masters"})
JOB_BACKOFF_S = (5.0, 30.0, 120.0)


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11, ``wait_for`` loses a cancellation
    that arrives as the event is set, and a task that should end keeps looping. It always yields to
    the event loop once, so a loop woken by its own change cannot starve signals and results.
    """
    await asyncio.sleep(0)  # Event.wait() on a set event returns without yielding to the loop
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


@dataclass
class RunSummary:
    """What a backfill reports at its end."""

    jobs: dict[str, int] = field(default_factory=dict)
    missing_files: int = 0
    stuck_reason: str | None = None

    @property
    def complete(self) -> bool:
        unfinished = sum(n for state, n in self.jobs.items() if state != "done")
        return unfinished == 0 and self.missing_files == 0 and self.stuck_reason is None


class Service:
    """One running service over one ledger."""

    def __init__(self, config: Config, ledger: Ledger, executor: Executor, *, burst: bool) -> None:
        self.config = config
        self.ledger = ledger
        self.executor = executor
        self.burst = burst
        self.root = config.storage.root
        self.marks = Watermarks(config.storage.budget, config.storage.high_watermark, config.storage.low_watermark)
        self.notifier = Notifier()
        self.changed = asyncio.Event()
        self.stopping = asyncio.Event()
        self.planning_done = asyncio.Event()
        self.running_jobs: dict[int, asyncio.Future[Any]] = {}
        self.downloading: set[int] = set()
        self.stuck_reason: str | None = None
        self.output_bytes_wanted = 0
        self.started = time.time()
        self.fetcher: Any = None
        self.client: Any = None
        self.space: Any = None

    # --- entry -------------------------------------------------------------------------

    async def run(self, nights: Sequence[dt.date], ccds: Sequence[int]) -> RunSummary:
        self._recover()
        self._install_signal_handlers()
        from streamer.archive.auth import load_credentials
        from streamer.archive.client import ArchiveClient
        from streamer.archive.fetch import Fetcher, SpaceSignal

        auth = self.config.archive.auth
        credentials = load_credentials(auth) if auth is not None else None
        async with ArchiveClient(self.config.archive, credentials=credentials, ledger=self.ledger) as client:
            self.client = client
            self.space = SpaceSignal(poll_s=2.0)
            self.fetcher = Fetcher(client, self.ledger, self.config.storage, space=self.space, overhead=self._overhead)
            self.fetcher.remove_orphan_parts()
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._planner(nights, ccds))
                    group.create_task(self._downloader())
                    group.create_task(self._dispatcher())
                    group.create_task(self._evictor())
                    group.create_task(self._heartbeat())
                    group.create_task(self._until_finished())
            except* _Finished:
                pass
            except* StreamerError as group:
                raise group.exceptions[0] from None
            finally:
                self.stopping.set()
        await self._drain()
        if self.burst and self.stuck_reason is None:
            self._evict(force=True)
        record_minimum(self.config, self.ledger)
        return self._summary()

    def _recover(self) -> None:
        counts = self.ledger.recover()
        stale = self.ledger.rows(
            "SELECT id, relpath FROM files WHERE producer_job IS NOT NULL AND state NOT IN ('on_disk', 'deleting')"
        )
        for row in stale:
            unlink_below(self.root, row["relpath"])  # a product written but never recorded is made again
        for relpath in _orphan_product_temporaries(self.root):
            unlink_below(self.root, relpath)  # a worker killed while writing leaves its temporary file
        with self.ledger.transaction() as conn:
            conn.execute("UPDATE files SET reserved_bytes = 0 WHERE producer_job IS NOT NULL AND state != 'on_disk'")
        finished = recover_deletions(self.ledger, self.root)
        if any(counts.values()) or finished:
            log.info("recovered after an unclean stop: %s, %d deletions finished", counts, finished)
        self._record_service_info()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self.stop, signum)

    def stop(self, signum: int | None = None) -> None:
        """Stop taking work; running tasks get ``shutdown_grace_s`` to finish."""
        if not self.stopping.is_set():
            log.info("stopping (%s): no new work; waiting for running tasks", signal.Signals(signum).name if signum else "request")
            self.notifier.stopping()
            self.stopping.set()
            self.changed.set()

    def poke(self) -> None:
        self.changed.set()

    async def _wait_change(self, timeout: float) -> None:
        await wait_event(self.changed, timeout)
        self.changed.clear()

    # --- planning ----------------------------------------------------------------------

    async def _planner(self, nights: Sequence[dt.date], ccds: Sequence[int]) -> None:
        from streamer.service.plan import plan_night

        planned: set[dt.date] = set()
        while not self.stopping.is_set():
            for night in [n for n in self._nights_due(nights) if n not in planned]:
                if self.stopping.is_set():
                    return
                key = f"planned:{night.isoformat()}:{','.join(map(str, ccds))}"
                if self.ledger.get_meta(key) is None:
                    log.info("planning %s for CCDs %s", night, ",".join(map(str, ccds)))
                    await plan_night(self.client, self.ledger, self.config, night, ccds)
                    counts = build_night_graph(
                        self.ledger, night.isoformat(), ccds,
                        bias_skip_first=self.config.detrend.bias_skip_first,
                        focalplane=self.config.detrend.flat_normalisation == "focalplane",
                    )  # fmt: skip
                    self.ledger.set_meta(key, json.dumps(counts))
                    self.ledger.event("plan", f"night {night}: jobs {counts}")
                    await self._probe_sizes()
                    check_budget(self.config, self.ledger)
                planned.add(night)
                self.poke()
            if self.burst or not self.config.follow.enabled:
                self.planning_done.set()
                self.poke()
                return
            await wait_event(self.stopping, self.config.follow.poll_minutes * 60)

    async def _probe_sizes(self) -> None:
        """Learn the size of one file of each class with a HEAD, so the minimum budget scales with the data."""
        samples = self.ledger.rows(
            "SELECT MIN(f.id) AS id FROM files f LEFT JOIN exposures e ON e.id = f.exposure_id "
            "WHERE f.url != '' AND f.state = 'wanted' GROUP BY f.kind, e.imgtype "
            "HAVING MAX(COALESCE(f.actual_size, f.expected_size, 0)) = 0"
        )
        for sample in samples:
            try:
                await self.fetcher.probe_size(sample["id"])
            except Exception as err:  # a file the archive refuses is found out by its download
                log.info("size probe of file %d failed: %s", sample["id"], err)

    def _nights_due(self, nights: Sequence[dt.date]) -> list[dt.date]:
        due = list(nights)
        if not self.burst and self.config.follow.enabled:
            latest = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=self.config.follow.delay_hours)).date()
            start = self.ledger.get_meta("follow_start")
            if start is None:
                start = latest.isoformat()
                self.ledger.set_meta("follow_start", start)
            day = dt.date.fromisoformat(start)
            while day <= latest:
                due.append(day)
                day += dt.timedelta(days=1)
        return sorted(set(due))

    # --- downloads ---------------------------------------------------------------------

    def _download_candidates(self, limit: int) -> list[dict[str, Any]]:
        """Files that unfinished jobs need (in job order), then files that consumers keep, not yet on disk."""
        due = (
            "(f.state IN ('wanted', 'deleted', 'corrupt', 'reserved') "
            " OR (f.state = 'missing' AND :burst = 0 AND f.retry_at <= :now AND f.attempts < :max_missing))"
        )
        params = {
            "burst": int(self.burst), "now": time.time(), "max_missing": self.config.archive.missing_max_attempts,
            "n": limit + len(self.downloading),
        }  # fmt: skip
        pinned = self.ledger.rows(
            "SELECT f.*, MIN(p.job_id) AS first_job FROM jobs j JOIN pins p ON p.job_id = j.id "
            "JOIN files f ON f.id = p.file_id "
            f"WHERE j.state IN ('waiting', 'ready', 'failed') AND f.url != '' AND {due} "
            "GROUP BY f.id ORDER BY first_job, f.id LIMIT :n",
            params,
        )
        rows = [r for r in pinned if r["id"] not in self.downloading][:limit]
        if len(rows) < limit:
            kept = self.ledger.rows(
                f"SELECT f.* FROM files f WHERE f.kept = 1 AND f.url != '' AND {due} ORDER BY f.id LIMIT :n", params
            )
            chosen = {r["id"] for r in rows}
            rows += [r for r in kept if r["id"] not in self.downloading and r["id"] not in chosen][: limit - len(rows)]
        return rows

    async def _downloader(self) -> None:
        tasks_running: set[asyncio.Task[None]] = set()
        try:
            await self._download_loop(tasks_running)
        finally:
            for task in list(tasks_running):
                task.cancel()
            await asyncio.gather(*tasks_running, return_exceptions=True)

    async def _download_loop(self, tasks_running: set[asyncio.Task[None]]) -> None:
        # At most max_connections downloads are started at a time, in job order, and a download
        # waiting for budget keeps its place: later jobs' inputs cannot overtake earlier ones.
        slots = asyncio.Semaphore(self.config.archive.max_connections)
        while not self.stopping.is_set():
            candidates = self._download_candidates(self.config.archive.max_connections)
            if not candidates:
                await self._wait_change(5.0)
                continue
            for row in candidates:
                if row.get("first_job") is not None and not self._reserve_outputs_through(row["first_job"]):
                    break  # what earlier jobs will write comes first; the evictor has been asked for room
                await slots.acquire()
                if self.stopping.is_set():
                    slots.release()
                    break
                self.downloading.add(row["id"])
                task = asyncio.create_task(self._download_one(row["id"], slots))
                tasks_running.add(task)
                task.add_done_callback(tasks_running.discard)
            await self._wait_change(0.5)

    def _report_stuck(self, need: int) -> None:
        used = self.ledger.committed_bytes() + self._overhead()
        reason = (
            f"disk budget full: {format_size(used)} of {format_size(self.config.storage.budget)} used by files that "
            f"are pinned or kept, and the next download needs {format_size(need)}; raise storage.budget or "
            "narrow what consumers keep"
        )
        if reason != self.stuck_reason:
            log.error("%s", reason)
            self.ledger.event("stuck", reason, level="error")
            self.notifier.status("stuck: disk budget full of pinned or kept files")
        self.stuck_reason = reason

    async def _download_one(self, file_id: int, slots: asyncio.Semaphore) -> None:
        try:
            outcome = await self.fetcher.fetch(file_id)
            if outcome.state != "on_disk":
                log.warning("%s: %s (%s)", outcome.relpath, outcome.state, getattr(outcome, "error", None))
        except StreamerError as err:
            log.error("download of file %d failed: %s", file_id, err)
        finally:
            slots.release()
            self.downloading.discard(file_id)
            self.poke()

    def _overhead(self) -> int:
        """Bytes under the root that no file row accounts for: the ledger itself."""
        ledger_path = self.config.storage.ledger_path
        if not ledger_path.is_relative_to(self.root):
            return 0
        total = 0
        for suffix in ("", "-wal", "-shm", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{ledger_path}{suffix}").st_blocks * 512
        return total + 64 * 1024

    # --- jobs --------------------------------------------------------------------------

    async def _dispatcher(self) -> None:
        while not self.stopping.is_set():
            free = self.executor.slots - len(self.running_jobs)
            if free > 0:
                for job in self._ready_jobs(free):
                    if not self._reserve_outputs_through(job["id"]):
                        break
                    self._submit(job)
            await self._wait_change(2.0)

    def _reserve_outputs_through(self, last_job: int) -> bool:
        """Reserve, in job order, the bytes that unfinished jobs up to ``last_job`` will write.

        Outputs are reserved in the same order as downloads, so a budget filled with inputs of later
        jobs can never keep an earlier job from writing the masters those later jobs wait for.
        False when the next reservation does not fit yet (the evictor is asked for the room).
        """
        jobs = self.ledger.rows(
            "SELECT j.id, f.id AS file_id, f.relpath, f.kind, f.reserved_bytes FROM jobs j "
            "JOIN files f ON f.producer_job = j.id "
            "WHERE j.id <= ? AND j.state IN ('waiting', 'ready', 'failed') AND f.state != 'on_disk' "
            "AND f.reserved_bytes = 0 ORDER BY j.id, f.id",
            (last_job,),
        )
        for row in jobs:
            size = estimate_product_bytes(self.ledger, row["relpath"], row["kind"])
            with self.ledger.transaction() as conn:
                used = conn.execute("SELECT COALESCE(SUM(disk_bytes + reserved_bytes), 0) FROM file_totals").fetchone()[0]
                if used + size + self._overhead() > self.config.storage.budget:
                    self.output_bytes_wanted = size  # the evictor sees it within its next check
                    return False
                conn.execute("UPDATE files SET reserved_bytes = ? WHERE id = ?", (size, row["file_id"]))
        self.output_bytes_wanted = 0
        return True

    def _release_outputs(self, conn: Any, job_id: int) -> None:
        conn.execute(
            "UPDATE files SET reserved_bytes = 0 WHERE producer_job = ? AND state != 'on_disk' AND reserved_bytes != 0",
            (job_id,),
        )

    def _ready_jobs(self, limit: int) -> list[dict[str, Any]]:
        """Decide, for the first unfinished jobs, which can run; block those that never can."""
        now = time.time()
        candidates = self.ledger.rows(
            "SELECT * FROM jobs WHERE state IN ('waiting', 'ready', 'failed') "
            "AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT 500",
            (now,),
        )
        ready: list[dict[str, Any]] = []
        for job in candidates:
            if job["id"] in self.running_jobs:
                continue
            verdict = self._readiness(job)
            if verdict == "ready":
                ready.append(job)
                if len(ready) >= limit:
                    break
            elif verdict.startswith("blocked:"):
                self._block(job, verdict.removeprefix("blocked:"))
        return ready

    def _readiness(self, job: dict[str, Any]) -> str:
        inputs = self.ledger.rows(
            "SELECT f.id, f.kind, f.state, f.attempts, f.night, f.producer_job, j.state AS producer_state, j.kind AS producer_kind "
            "FROM pins p JOIN files f ON f.id = p.file_id LEFT JOIN jobs j ON j.id = f.producer_job "
            "WHERE p.job_id = ?",
            (job["id"],),
        )
        if job["kind"] == "exposure":
            for row in inputs:
                if row["kind"] == "masters" and row["producer_state"] in ("blocked", "parked"):
                    return self._fallback_master(job, row)
        pending = [r for r in inputs if not self._settled(r)]
        if pending:
            return "wait"
        on_disk = [r for r in inputs if r["state"] == "on_disk"]
        if job["kind"] == "exposure":
            lost = [r for r in inputs if r["kind"] in ESSENTIAL_KINDS and r["state"] != "on_disk"]
            if lost:
                return f"blocked:input not available: {', '.join(sorted({r['kind'] for r in lost}))}"
            if not any(r["kind"] == "masters" and r["producer_kind"] == "master_flat" for r in inputs):
                return self._fallback_master(job, None)
        elif not any(r["kind"] == "raw" for r in on_disk) and job["kind"] in ("master_bias", "led_flat"):
            return "blocked:no input frame could be downloaded"
        return "ready"

    def _settled(self, row: dict[str, Any]) -> bool:
        if row["state"] == "on_disk":
            return True
        if row["state"] == "missing":
            return self.burst or row["attempts"] >= self.config.archive.missing_max_attempts
        return False

    def _fallback_master(self, job: dict[str, Any], failed_master: dict[str, Any] | None) -> str:
        """Re-pin an exposure to the nearest usable master of its kind, or block it."""
        kinds = ["master_flat"] if failed_master is None else [failed_master["producer_kind"]]
        if failed_master is not None and failed_master["producer_kind"] == "focalplane":
            return "blocked:focal-plane normalisation failed for this night and filter"
        gap = self.config.detrend.max_calibration_gap_days
        night = dt.date.fromisoformat(job["night"])
        for kind in kinds:
            filter_clause = "AND j.filtercode = ?" if kind == "master_flat" else ""
            params: list[Any] = [kind, job["ccdid"]]
            if kind == "master_flat":
                params.append(job["filtercode"])
            options = self.ledger.rows(
                "SELECT j.id, j.night, j.state, f.id AS file_id FROM jobs j JOIN files f ON f.producer_job = j.id "
                f"WHERE j.kind = ? AND j.ccdid = ? {filter_clause} AND j.state NOT IN ('blocked', 'parked')",
                params,
            )
            options = [o for o in options if abs((dt.date.fromisoformat(o["night"]) - night).days) <= gap]
            options.sort(key=lambda o: (abs((dt.date.fromisoformat(o["night"]) - night).days), o["night"]))
            what = "master bias" if kind == "master_bias" else f"master flat for {job['filtercode']}"
            if not options:
                return f"blocked:no {what} within {gap} days of {night}"
            chosen = options[0]
            with self.ledger.transaction() as conn:
                if failed_master is not None:
                    conn.execute("DELETE FROM pins WHERE job_id = ? AND file_id = ?", (job["id"], failed_master["id"]))
                conn.execute("INSERT OR IGNORE INTO pins (file_id, job_id) VALUES (?, ?)", (chosen["file_id"], job["id"]))
                self.ledger.event(
                    "calibration", f"{job['key']}: using the {what} of {chosen['night']}", job_id=job["id"], conn=conn
                )
        return "wait"

    def _block(self, job: dict[str, Any], reason: str) -> None:
        with self.ledger.transaction() as conn:
            self._release_outputs(conn, job["id"])
            self.ledger.set_job_state(conn, job["id"], "blocked", error=reason, finished=time.time())
            conn.execute("DELETE FROM pins WHERE job_id = ?", (job["id"],))
            self.ledger.event("blocked", f"{job['key']}: {reason}", level="warning", job_id=job["id"], conn=conn)
        log.warning("%s blocked: %s", job["key"], reason)

    def _submit(self, job: dict[str, Any]) -> None:
        call = tasks.build_call(self.ledger, self.config, job)
        with self.ledger.transaction() as conn:
            if job["state"] == "failed":
                self.ledger.set_job_state(conn, job["id"], "ready")
            elif job["state"] == "waiting":
                self.ledger.set_job_state(conn, job["id"], "ready")
            self.ledger.set_job_state(conn, job["id"], "running", started=time.time(), attempts=job["attempts"] + 1)
        try:
            future = asyncio.wrap_future(self.executor.submit(call.function, **call.kwargs))
        except BrokenProcessPool:
            self._replace_pool()
            future = asyncio.wrap_future(self.executor.submit(call.function, **call.kwargs))
        self.running_jobs[job["id"]] = future
        future.add_done_callback(lambda f, job=job, call=call: self._finished(job, call, f))

    def _replace_pool(self) -> None:
        replace = getattr(self.executor, "replace", None)
        if replace is not None:
            replace()

    def _finished(self, job: dict[str, Any], call: tasks.Call, future: asyncio.Future[Any]) -> None:
        self.running_jobs.pop(job["id"], None)
        self.poke()
        if future.cancelled():
            return
        error = future.exception()
        try:
            if error is None:
                self._record_done(job, call, future.result())
            else:
                self._record_failure(job, error)
        except Exception:
            log.exception("recording the result of %s failed", job["key"])

    def _record_done(self, job: dict[str, Any], call: tasks.Call, result: Any) -> None:
        record = tasks.result_record(result)
        with self.ledger.transaction() as conn:
            for relpath in call.outputs:
                row = conn.execute("SELECT id FROM files WHERE relpath = ?", (relpath,)).fetchone()
                path = self.root / relpath
                if not path.is_file():
                    raise StreamerError(f"{job['key']}: finished without writing {relpath}")
                info = path.stat()
                self.ledger.set_file_state(
                    conn, row[0], "on_disk", disk_bytes=info.st_blocks * 512, actual_size=info.st_size,
                    reserved_bytes=0, fetched_at=time.time(),
                )
                conn.execute(
                    "INSERT INTO products (file_id, job_id, kind, night, ccdid, filtercode, provenance, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (file_id) DO UPDATE SET "
                    "job_id = excluded.job_id, provenance = excluded.provenance, created = excluded.created",
                    (row[0], job["id"], job["kind"], job["night"], job["ccdid"], job["filtercode"],
                     json.dumps(record, sort_keys=True, default=str), time.time()),
                )  # fmt: skip
            self.ledger.set_job_state(conn, job["id"], "done", finished=time.time(), error=None, result=record)
            conn.execute(
                "UPDATE files SET last_used = ? WHERE id IN (SELECT file_id FROM pins WHERE job_id = ?)",
                (time.time(), job["id"]),
            )
        log.info("%s done", job["key"])

    def _record_failure(self, job: dict[str, Any], error: BaseException) -> None:
        if isinstance(error, BrokenProcessPool | WorkerLost):
            if isinstance(error, BrokenProcessPool):
                self._replace_pool()
            with self.ledger.transaction() as conn:
                self._release_outputs(conn, job["id"])
                self.ledger.set_job_state(conn, job["id"], "ready", error="worker process died; retried")
                self.ledger.event("worker", f"{job['key']}: worker died, task requeued", level="warning", job_id=job["id"], conn=conn)
            return
        verdict = tasks.classify_failure(error)
        message = f"{type(error).__name__}: {error}"
        with self.ledger.transaction() as conn:
            self._release_outputs(conn, job["id"])
            if verdict.kind == "blocked":
                self.ledger.set_job_state(conn, job["id"], "blocked", error=verdict.reason, finished=time.time())
                conn.execute("DELETE FROM pins WHERE job_id = ?", (job["id"],))
                self.ledger.event("blocked", f"{job['key']}: {verdict.reason}", level="warning", job_id=job["id"], conn=conn)
            elif verdict.kind == "refetch" and job["attempts"] < 1:
                raw = conn.execute(
                    "SELECT f.id, f.relpath FROM pins p JOIN files f ON f.id = p.file_id "
                    "WHERE p.job_id = ? AND f.kind = 'raw' AND f.state = 'on_disk'",
                    (job["id"],),
                ).fetchall()
                for file_id, relpath in raw:
                    unlink_below(self.root, relpath)
                    self.ledger.set_file_state(conn, file_id, "corrupt", last_error=verdict.reason, disk_bytes=0)
                self.ledger.set_job_state(conn, job["id"], "failed", error=message, not_before=time.time())
                self.ledger.event("corrupt", f"{job['key']}: {verdict.reason}; fetching its raw file again", level="warning", job_id=job["id"], conn=conn)
            elif job["attempts"] + 1 >= self.config.service.max_task_attempts:
                self.ledger.set_job_state(conn, job["id"], "parked", error=message, finished=time.time())
                conn.execute("DELETE FROM pins WHERE job_id = ?", (job["id"],))
                self.ledger.event("parked", f"{job['key']}: {message}", level="error", job_id=job["id"], conn=conn)
            else:
                backoff = JOB_BACKOFF_S[min(job["attempts"], len(JOB_BACKOFF_S) - 1)]
                self.ledger.set_job_state(conn, job["id"], "failed", error=message, not_before=time.time() + backoff)
                self.ledger.event("failed", f"{job['key']}: {message}", level="warning", job_id=job["id"], conn=conn)
        log.warning("%s: %s", job["key"], message)

    # --- eviction ----------------------------------------------------------------------

    async def _evictor(self) -> None:
        still_stuck = 0
        while not self.stopping.is_set():
            need = (self.space.bytes_wanted if self.space.space_wanted.is_set() else 0) + self.output_bytes_wanted
            freed = self._evict(need=need)
            if freed or not need:
                still_stuck = 0
            if freed:
                self.space.space_freed()
            elif need and self._nothing_moves():
                still_stuck += 1
                if still_stuck >= 3:  # seen three times in a row, not a moment between two steps
                    self._report_stuck(need)
                    if self.burst:
                        raise _Finished
            elif self.stuck_reason is not None and not need:
                self.ledger.event("unstuck", "downloads resumed: space was freed")
                self.stuck_reason = None
            await self._wait_change(1.0 if need else 2.0)

    def _nothing_moves(self) -> bool:
        """Every download waits for budget, no task runs, and none could start."""
        waiting = self.space.bytes_wanted > 0 or self.output_bytes_wanted > 0
        transfers = len(self.downloading) - len(self.space.waiting_files)
        return waiting and transfers <= 0 and not self.running_jobs

    def _evict(self, *, need: int = 0, force: bool = False) -> int:
        """Free erasable files as the watermarks (or a pending reservation) ask; return bytes freed."""
        freed_total = 0
        while True:
            used = self.ledger.committed_bytes() + self._overhead()
            amount = bytes_to_free(used, self.marks, need=need, force=force)
            if amount <= 0:
                break
            victims = choose_victims(self.ledger.erasable(limit=200), amount)
            if not victims:
                break
            freed = delete_files(self.ledger, self.root, victims)
            freed_total += freed
            if freed == 0:
                break
        if freed_total:
            log.info("evicted %s", format_size(freed_total))
            self.poke()
        return freed_total

    # --- liveness and the end ----------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Liveness from the event loop: watchdog pings, a STATUS line, progress, executor load, pruning."""
        self.notifier.ready("started")
        interval = self.notifier.watchdog_interval_s or 30.0
        last_prune = last_line = 0.0
        progress = Progress(self.ledger) if self.burst else None
        try:
            while not self.stopping.is_set():
                self.notifier.watchdog()
                line = self._status_line()
                self.notifier.status(line)
                self._record_service_info()
                if progress is not None:
                    progress.update()
                elif time.monotonic() - last_line > 300:
                    log.info("%s", line)
                    last_line = time.monotonic()
                if time.monotonic() - last_prune > 3600:
                    self.ledger.prune_events(older_than_s=self.config.service.event_retention_days * 86400)
                    last_prune = time.monotonic()
                await wait_event(self.stopping, min(interval, 5.0))
        finally:
            if progress is not None:
                progress.close()

    def _record_service_info(self) -> None:
        """What status shows of the running service, executor workers and load included."""
        try:
            executor = self.executor.describe()
        except Exception as err:  # a cluster that went away must not stop the heartbeat
            executor = {"error": f"{type(err).__name__}: {err}"}
        self.ledger.set_meta(
            "service",
            json.dumps({"pid": os.getpid(), "started": self.started, "burst": self.burst, "executor": executor,
                        "version": __version__, "running_tasks": len(self.running_jobs),
                        "downloads": len(self.downloading)}),
        )  # fmt: skip

    def _status_line(self) -> str:
        jobs = self.ledger.rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        counts = ", ".join(f"{r['state']} {r['n']}" for r in jobs)
        used = self.ledger.committed_bytes() + self._overhead()
        return f"jobs: {counts or 'none'}; disk {format_size(used)} of {format_size(self.config.storage.budget)}"

    async def _until_finished(self) -> None:
        """In burst mode, end when planning is over and no job can still progress."""
        while True:
            if self.stopping.is_set():
                raise _Finished
            if self.burst and self.planning_done.is_set() and not self.running_jobs and not self.downloading:
                pending = self.ledger.scalar("SELECT COUNT(*) FROM jobs WHERE state IN ('waiting', 'ready', 'failed')")
                if pending == 0:
                    raise _Finished
                if not self._ready_jobs(1) and not self._download_candidates(1):
                    wait_s = self.ledger.scalar("SELECT MIN(not_before) FROM jobs WHERE state = 'failed'")
                    if wait_s is None:
                        self._block_unreachable()
                        raise _Finished
            await self._wait_change(1.0)

    def _block_unreachable(self) -> None:
        for job in self.ledger.rows("SELECT * FROM jobs WHERE state IN ('waiting', 'ready') ORDER BY id"):
            self._block(job, "inputs cannot be obtained (missing from the archive)")

    async def _drain(self) -> None:
        if not self.running_jobs:
            return
        grace = self.config.service.shutdown_grace_s
        log.info("waiting up to %.0f s for %d running tasks", grace, len(self.running_jobs))
        done, pending = await asyncio.wait(list(self.running_jobs.values()), timeout=grace)
        if pending:
            log.warning("%d tasks did not finish in time; they will run again at the next start", len(pending))
            self.executor.shutdown(cancel=True)
            with self.ledger.transaction() as conn:
                for job_id in list(self.running_jobs):
                    self.ledger.set_job_state(conn, job_id, "ready", error="interrupted by shutdown")
        await asyncio.sleep(0)

    def _summary(self) -> RunSummary:
        jobs = {r["state"]: r["n"] for r in self.ledger.rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
        missing = self.ledger.scalar(
            "SELECT COUNT(*) FROM files f WHERE f.state IN ('missing', 'corrupt') AND f.url != ''"
        )
        return RunSummary(jobs=jobs, missing_files=int(missing or 0), stuck_reason=self.stuck_reason)


PRODUCT_DIRECTORIES = ("masters", "apcat", "detrended")


def _orphan_product_temporaries(root: Path) -> list[str]:
    """Temporary files (hidden, ``.part`` or ``.tmp``) that workers left in the product directories."""
    found = []
    for top in PRODUCT_DIRECTORIES:
        for relpath, _info in walk_regular_files(root / top):
            name = relpath.rsplit("/", 1)[-1]
            if name.startswith(".") and name.endswith((".part", ".tmp")):
                found.append(f"{top}/{relpath}")
    return found


class Progress:
    """Backfill progress: a bar on a terminal (rich), a plain line every 30 s otherwise."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.last_line = 0.0
        self.bar: Any = None
        self.task: Any = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self.bar = RichProgress(
                TextColumn("backfill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                TimeElapsedColumn(), transient=False,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("", total=None)

    def update(self) -> None:
        counts = {r["state"]: r["n"] for r in self.ledger.rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
        total = sum(counts.values())
        finished = sum(counts.get(state, 0) for state in ("done", "blocked", "parked"))
        on_disk = self.ledger.scalar("SELECT COALESCE(SUM(files), 0) FROM file_totals WHERE state = 'on_disk'")
        detail = f"running {counts.get('running', 0)}, files on disk {on_disk}"
        if self.bar is not None:
            self.bar.update(self.task, total=total or None, completed=finished, description=detail)
        elif time.monotonic() - self.last_line >= 30:
            print(f"progress: {finished}/{total} tasks finished, {detail}", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.update()
            self.bar.stop()


class _Finished(Exception):
    """Raised inside the task group to end the service."""


def _nights(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def _configured_nights(config: Config) -> list[dt.date]:
    nights: set[dt.date] = set()
    for start, end in config.backfill.ranges:
        nights.update(_nights(start, end))
    return sorted(nights)


def setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=getattr(logging, config.service.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _execute(config: Config, nights: Iterable[dt.date], ccds: Sequence[int], *, burst: bool) -> RunSummary:
    setup_logging(config)
    ledger = Ledger.open(config.storage.ledger_path)
    try:
        if ledger.scalar("SELECT COUNT(*) FROM jobs"):
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
    summary = _execute(config, _nights(start, end), ccds or config.backfill.ccds, burst=True)
    done = summary.jobs.get("done", 0)
    total = sum(summary.jobs.values())
    if summary.complete:
        print(f"backfill complete: {done} jobs done")
        return 0
    parts = [f"{n} {state}" for state, n in sorted(summary.jobs.items())]
    print(f"backfill incomplete: jobs {', '.join(parts)} of {total}; {summary.missing_files} files missing or corrupt")
    if summary.stuck_reason:
        print(f"stopped: {summary.stuck_reason}")
    return 1


__all__ = ["RunSummary", "Service", "run_backfill", "run_daemon"]
