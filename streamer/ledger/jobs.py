"""Job transitions and the queries the service schedules by (readiness, reservations, results).

Each function that changes state is one transaction and goes through
:meth:`Ledger.set_job_state` / :meth:`Ledger.set_file_state`, so the state machine is checked.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from streamer import clock
from streamer.crashpoints import crash_point
from streamer.ledger.core import Ledger
from streamer.ledger.planning import focalplane_key

UNFINISHED = ("waiting", "ready", "failed")


# --- queries -------------------------------------------------------------------------------


def candidate_jobs(ledger: Ledger, *, now: float, limit: int = 500) -> list[dict[str, Any]]:
    """The first unfinished jobs (in job order) whose backoff has passed."""
    return ledger.rows(
        "SELECT * FROM jobs WHERE state IN ('waiting', 'ready', 'failed') "
        "AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT ?",
        (now, limit),
    )


def pinned_inputs(ledger: Ledger, job_id: int) -> list[dict[str, Any]]:
    """A job's pinned files with the kind and state of the job that produces each (if any); ``parked``:
    the file's download was given up for good (missing or corrupt without a retry date)."""
    return ledger.rows(
        "SELECT f.id, f.relpath, f.kind, f.state, f.attempts, f.night, f.producer_job, "
        "(f.state IN ('missing', 'corrupt') AND f.retry_at IS NULL) AS parked, "
        "j.state AS producer_state, j.kind AS producer_kind "
        "FROM pins p JOIN files f ON f.id = p.file_id LEFT JOIN jobs j ON j.id = f.producer_job "
        "WHERE p.job_id = ?",
        (job_id,),
    )


def master_options(ledger: Ledger, producer_kind: str, ccdid: int, filtercode: str | None) -> list[dict[str, Any]]:
    """Masters of one kind for a CCD (and filter, for flats) whose job has not failed for good, in job order,
    with the state of the master file (``file_state``: ``deleted`` for one made and since evicted) and of its job."""
    if producer_kind == "master_flat":
        return ledger.rows(
            "SELECT j.id, j.night, j.state AS job_state, f.id AS file_id, f.state AS file_state FROM jobs j JOIN files f ON f.producer_job = j.id "
            "WHERE j.kind = ? AND j.ccdid = ? AND j.filtercode = ? AND j.state NOT IN ('blocked', 'parked') ORDER BY j.id",
            (producer_kind, ccdid, filtercode),
        )
    return ledger.rows(
        "SELECT j.id, j.night, j.state AS job_state, f.id AS file_id, f.state AS file_state FROM jobs j JOIN files f ON f.producer_job = j.id "
        "WHERE j.kind = ? AND j.ccdid = ? AND j.state NOT IN ('blocked', 'parked') ORDER BY j.id",
        (producer_kind, ccdid),
    )


def unreserved_outputs_through(ledger: Ledger, last_job: int) -> list[dict[str, Any]]:
    """Outputs of unfinished jobs up to ``last_job`` that have no reservation yet, in job order."""
    return ledger.rows(
        "SELECT j.id AS job_id, f.id AS file_id, f.relpath, f.kind FROM jobs j "
        "JOIN files f ON f.producer_job = j.id "
        "WHERE j.id <= ? AND j.state IN ('waiting', 'ready', 'failed') AND f.state != 'on_disk' "
        "AND f.reserved_bytes = 0 ORDER BY j.id, f.id",
        (last_job,),
    )


def output_relpaths(ledger: Ledger, job_id: int) -> tuple[str, ...]:
    """The files a job writes, in id order."""
    return tuple(r["relpath"] for r in ledger.rows("SELECT relpath FROM files WHERE producer_job = ? ORDER BY id", (job_id,)))


def job_state_counts(ledger: Ledger) -> dict[str, int]:
    return {r["state"]: int(r["n"]) for r in ledger.rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}


def job_count(ledger: Ledger) -> int:
    return int(ledger.scalar("SELECT COUNT(*) FROM jobs") or 0)


def unfinished_count(ledger: Ledger) -> int:
    return int(ledger.scalar("SELECT COUNT(*) FROM jobs WHERE state IN ('waiting', 'ready', 'failed')") or 0)


def earliest_retry(ledger: Ledger) -> float | None:
    """When the first failed job may run again; None when no job waits for a retry."""
    value = ledger.scalar("SELECT MIN(not_before) FROM jobs WHERE state = 'failed'")
    return None if value is None else float(value)


def waiting_or_ready(ledger: Ledger) -> list[dict[str, Any]]:
    return ledger.rows("SELECT * FROM jobs WHERE state IN ('waiting', 'ready') ORDER BY id")


def missing_input_count(ledger: Ledger) -> int:
    """Downloadable files that ended missing or corrupt."""
    return int(ledger.scalar("SELECT COUNT(*) FROM files f WHERE f.state IN ('missing', 'corrupt') AND f.url != ''") or 0)


def files_on_disk(ledger: Ledger) -> int:
    return int(ledger.scalar("SELECT COALESCE(SUM(files), 0) FROM file_totals WHERE state = 'on_disk'") or 0)


def unrecorded_products(ledger: Ledger) -> list[dict[str, Any]]:
    """Products whose job never recorded them: whatever is at their path is half-made."""
    return ledger.rows(
        "SELECT id, relpath FROM files WHERE producer_job IS NOT NULL AND state NOT IN ('on_disk', 'deleting')"
    )


def size_probe_samples(ledger: Ledger) -> list[int]:
    """One wanted file per (kind, image type) whose size nothing has told us yet."""
    rows = ledger.rows(
        "SELECT MIN(f.id) AS id FROM files f LEFT JOIN exposures e ON e.id = f.exposure_id "
        "WHERE f.url != '' AND f.state = 'wanted' GROUP BY f.kind, e.imgtype "
        "HAVING MAX(COALESCE(f.actual_size, f.expected_size, 0)) = 0"
    )
    return [int(r["id"]) for r in rows]


# --- transitions ---------------------------------------------------------------------------


def release_output_reservations(conn: sqlite3.Connection, job_id: int | None = None) -> None:
    """Drop the reservations of a job's unwritten outputs (of every job when ``job_id`` is None)."""
    if job_id is None:
        conn.execute("UPDATE files SET reserved_bytes = 0 WHERE producer_job IS NOT NULL AND state != 'on_disk'")
        return
    conn.execute(
        "UPDATE files SET reserved_bytes = 0 WHERE producer_job = ? AND state != 'on_disk' AND reserved_bytes != 0",
        (job_id,),
    )


def clear_product_reservations(ledger: Ledger) -> None:
    """At start: no job is running, so no unwritten product holds a reservation."""
    with ledger.transaction() as conn:
        release_output_reservations(conn)


def reserve_outputs(ledger: Ledger, sizes: Iterable[tuple[int, int]]) -> None:
    """Record reservations ``(file_id, bytes)`` for outputs, in one transaction."""
    with ledger.transaction() as conn:
        conn.executemany("UPDATE files SET reserved_bytes = ? WHERE id = ?", [(size, file_id) for file_id, size in sizes])


def repin_master(ledger: Ledger, job: dict[str, Any], *, add: int, drop: int | None, message: str) -> None:
    """Pin another night's master to an exposure (dropping the failed one), with an event."""
    with ledger.transaction() as conn:
        if drop is not None:
            conn.execute("DELETE FROM pins WHERE job_id = ? AND file_id = ?", (job["id"], drop))
        conn.execute("INSERT OR IGNORE INTO pins (file_id, job_id) VALUES (?, ?)", (add, job["id"]))
        ledger.event("calibration", message, job_id=job["id"], conn=conn)


def focalplane_product(ledger: Ledger, night: str, filtercode: str) -> dict[str, Any] | None:
    """The focal-plane factors file of (night, filter) with its state and its job's, or None when none is planned."""
    rows = ledger.rows(
        "SELECT f.id AS file_id, f.state AS file_state, j.state AS job_state FROM jobs j "
        "JOIN files f ON f.producer_job = j.id WHERE j.key = ?",
        (focalplane_key(night, filtercode),),
    )
    return rows[0] if rows else None


def repin_focalplane(ledger: Ledger, job: dict[str, Any], file_id: int | None) -> None:
    """Pin this focal-plane factors file to an exposure instead of the one it pins (None: pin none)."""
    with ledger.transaction() as conn:
        conn.execute(
            "DELETE FROM pins WHERE job_id = ? AND file_id IN (SELECT f.id FROM files f JOIN jobs j "
            "ON j.id = f.producer_job WHERE j.kind = 'focalplane')",
            (job["id"],),
        )
        if file_id is not None:
            conn.execute("INSERT OR IGNORE INTO pins (file_id, job_id) VALUES (?, ?)", (file_id, job["id"]))


def _end_job(ledger: Ledger, conn: sqlite3.Connection, job: dict[str, Any], state: str, reason: str) -> None:
    ledger.set_job_state(conn, job["id"], state, error=reason, finished=clock.now())
    conn.execute("DELETE FROM pins WHERE job_id = ?", (job["id"],))


def block_job(ledger: Ledger, job: dict[str, Any], reason: str) -> None:
    """The job can never run: blocked with ``reason``, its pins and reservations released."""
    with ledger.transaction() as conn:
        release_output_reservations(conn, job["id"])
        _end_job(ledger, conn, job, "blocked", reason)
        ledger.event("blocked", f"{job['key']}: {reason}", level="warning", job_id=job["id"], conn=conn)


def start_job(ledger: Ledger, job: dict[str, Any]) -> None:
    """Waiting, ready or failed -> running, counting the attempt."""
    with ledger.transaction() as conn:
        if job["state"] in ("failed", "waiting"):
            ledger.set_job_state(conn, job["id"], "ready")
        ledger.set_job_state(conn, job["id"], "running", started=clock.now(), attempts=job["attempts"] + 1)


def record_done(
    ledger: Ledger, job: dict[str, Any], outputs: Sequence[tuple[str, int, int]], record: dict[str, Any]
) -> None:
    """Outputs ``(relpath, disk_bytes, size)`` on disk as products, the job done, its inputs marked used."""
    now = clock.now()
    with ledger.transaction() as conn:
        for relpath, disk_bytes, size in outputs:
            row = conn.execute("SELECT id FROM files WHERE relpath = ?", (relpath,)).fetchone()
            ledger.set_file_state(
                conn, row[0], "on_disk", disk_bytes=disk_bytes, actual_size=size, reserved_bytes=0, fetched_at=now
            )
            conn.execute(
                "INSERT INTO products (file_id, job_id, kind, night, ccdid, filtercode, provenance, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (file_id) DO UPDATE SET "
                "job_id = excluded.job_id, provenance = excluded.provenance, created = excluded.created",
                (row[0], job["id"], job["kind"], job["night"], job["ccdid"], job["filtercode"],
                 json.dumps(record, sort_keys=True, default=str), now),
            )  # fmt: skip
        release_output_reservations(conn, job["id"])  # outputs the job may leave unwritten
        ledger.set_job_state(conn, job["id"], "done", finished=now, error=None, result=record, worker_losses=0)
        conn.execute(
            "UPDATE files SET last_used = ? WHERE id IN (SELECT file_id FROM pins WHERE job_id = ?)", (now, job["id"])
        )
        crash_point("record", job["key"])


def requeue_job(ledger: Ledger, job: dict[str, Any], reason: str, *, not_before: float) -> None:
    """The worker died under the job: failed, to run again at ``not_before``; the attempt is not counted,
    the worker loss is (``worker_losses``, in a row: any other outcome of a run sets it back to 0)."""
    losses = job["worker_losses"] + 1
    with ledger.transaction() as conn:
        release_output_reservations(conn, job["id"])
        ledger.set_job_state(
            conn, job["id"], "failed", error=reason, not_before=not_before, attempts=job["attempts"], worker_losses=losses
        )
        ledger.event(
            "worker", f"{job['key']}: worker died, task requeued (worker loss {losses} in a row)", level="warning",
            job_id=job["id"], conn=conn,
        )  # fmt: skip


def return_for_disk(ledger: Ledger, job: dict[str, Any], reason: str) -> None:
    """The filesystem had no room for the job's products: back to ready, the attempt not counted."""
    with ledger.transaction() as conn:
        release_output_reservations(conn, job["id"])
        ledger.set_job_state(conn, job["id"], "ready", error=reason, attempts=job["attempts"], worker_losses=0)
        ledger.event("disk_full", f"{job['key']}: {reason}; back to ready", level="warning", job_id=job["id"], conn=conn)


def return_dropped(ledger: Ledger, job: dict[str, Any], reason: str) -> None:
    """The cluster dropped the job (its scheduler went away): back to ready, neither the attempt nor a worker loss counted."""
    with ledger.transaction() as conn:
        release_output_reservations(conn, job["id"])
        ledger.set_job_state(conn, job["id"], "ready", error=reason, attempts=job["attempts"])
        ledger.event("worker", f"{job['key']}: {reason}; back to ready", level="warning", job_id=job["id"], conn=conn)


def fail_job(ledger: Ledger, job: dict[str, Any], message: str, *, not_before: float) -> None:
    """Failed, to be retried at ``not_before``."""
    with ledger.transaction() as conn:
        release_output_reservations(conn, job["id"])
        ledger.set_job_state(conn, job["id"], "failed", error=message, not_before=not_before, worker_losses=0)
        ledger.event("failed", f"{job['key']}: {message}", level="warning", job_id=job["id"], conn=conn)


def park_job(ledger: Ledger, job: dict[str, Any], message: str, *, worker_lost: bool = False) -> None:
    """Given up after the last attempt (``worker_lost``: after the last worker loss in a row, counted); pins
    released, the error kept."""
    with ledger.transaction() as conn:
        release_output_reservations(conn, job["id"])
        if worker_lost:
            conn.execute("UPDATE jobs SET worker_losses = ? WHERE id = ?", (job["worker_losses"] + 1, job["id"]))
        _end_job(ledger, conn, job, "parked", message)
        ledger.event("parked", f"{job['key']}: {message}", level="error", job_id=job["id"], conn=conn)


def refetch_raw(ledger: Ledger, job: dict[str, Any], message: str, reason: str, unlink: Any) -> None:
    """The job's raw is unreadable: ``unlink(relpath)`` it, mark it wanted (fetched again at once), retry the job."""
    with ledger.transaction() as conn:
        release_output_reservations(conn, job["id"])
        raws = conn.execute(
            "SELECT f.id, f.relpath FROM pins p JOIN files f ON f.id = p.file_id "
            "WHERE p.job_id = ? AND f.kind = 'raw' AND f.state = 'on_disk'",
            (job["id"],),
        ).fetchall()
        for file_id, relpath in raws:
            unlink(relpath)
            ledger.set_file_state(conn, file_id, "wanted", last_error=reason, disk_bytes=0)
        ledger.set_job_state(conn, job["id"], "failed", error=message, not_before=clock.now(), worker_losses=0)
        ledger.event(
            "corrupt", f"{job['key']}: {reason}; fetching its raw file again", level="warning", job_id=job["id"], conn=conn
        )


def interrupt_jobs(ledger: Ledger, job_ids: Iterable[int]) -> None:
    """Jobs still running at shutdown go back to ready for the next start."""
    with ledger.transaction() as conn:
        for job_id in job_ids:
            ledger.set_job_state(conn, job_id, "ready", error="interrupted by shutdown")
