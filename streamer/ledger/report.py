"""The queries behind ``streamer report`` (a night's QA), and the disk-use history it plots."""

from __future__ import annotations

from typing import Any, Final

from streamer import clock
from streamer.ledger.core import Ledger

DISK_SAMPLE_EVERY_S: Final = 60.0
"""A disk sample is recorded at least this often while the service runs, and whenever the use changes."""


def record_disk_sample(ledger: Ledger, *, budget: int, overhead: int, t: float | None = None) -> bool:
    """Record the disk use now (files on disk, reservations, the ledger's own bytes) against ``budget``.

    Nothing is written when the figures equal the last sample's and that sample is recent, so an idle
    daemon adds one row a minute. True when a row was written.
    """
    now = clock.now() if t is None else t
    totals = ledger.rows(
        "SELECT COALESCE(SUM(disk_bytes), 0) AS disk, COALESCE(SUM(reserved_bytes), 0) AS reserved FROM file_totals"
    )[0]
    disk, reserved = int(totals["disk"]) + overhead, int(totals["reserved"])
    last = ledger.rows("SELECT t, disk_bytes, reserved_bytes, budget_bytes FROM disk_samples ORDER BY t DESC LIMIT 1")
    unchanged = bool(last) and (last[0]["disk_bytes"], last[0]["reserved_bytes"], last[0]["budget_bytes"]) == (disk, reserved, budget)
    if unchanged and now - float(last[0]["t"]) < DISK_SAMPLE_EVERY_S:
        return False
    with ledger.transaction() as conn:
        conn.execute(
            "INSERT OR REPLACE INTO disk_samples (t, disk_bytes, reserved_bytes, budget_bytes) VALUES (?, ?, ?, ?)",
            (now, disk, reserved, budget),
        )
    return True


def prune_disk_samples(ledger: Ledger, *, older_than_s: float) -> int:
    """Drop disk samples older than the retention (the events' retention)."""
    with ledger.transaction() as conn:
        return int(conn.execute("DELETE FROM disk_samples WHERE t < ?", (clock.now() - older_than_s,)).rowcount)


def disk_samples(ledger: Ledger, start: float, end: float) -> list[dict[str, Any]]:
    """Samples ``t, disk_bytes, reserved_bytes, budget_bytes`` between ``start`` and ``end``, oldest first."""
    return ledger.rows(
        "SELECT t, disk_bytes, reserved_bytes, budget_bytes FROM disk_samples WHERE t BETWEEN ? AND ? ORDER BY t",
        (start, end),
    )


def night_products(ledger: Ledger, night: str, kind: str) -> list[dict[str, Any]]:
    """Products of ``kind`` (``masters`` or ``apcat``) made for ``night``, with their file state and provenance."""
    return ledger.rows(
        "SELECT f.relpath, f.state, p.ccdid, p.filtercode, p.kind AS product_kind, p.provenance, p.created "
        "FROM products p JOIN files f ON f.id = p.file_id WHERE p.night = ? AND f.kind = ? ORDER BY f.relpath",
        (night, kind),
    )


def night_jobs(ledger: Ledger, night: str) -> list[dict[str, Any]]:
    """Every job of ``night``: ``id, kind, state, ccdid, filtercode, attempts, error, started, finished``."""
    return ledger.rows(
        "SELECT id, kind, state, ccdid, filtercode, attempts, error, started, finished, created "
        "FROM jobs WHERE night = ? ORDER BY id",
        (night,),
    )


def night_downloads(ledger: Ledger, night: str) -> list[dict[str, Any]]:
    """Archive files of ``night`` that arrived: ``fetched_at`` and ``actual_size``, oldest first."""
    return ledger.rows(
        "SELECT fetched_at, actual_size FROM files WHERE night = ? AND url != '' AND fetched_at IS NOT NULL "
        "ORDER BY fetched_at",
        (night,),
    )


def night_missing_files(ledger: Ledger, night: str) -> list[dict[str, Any]]:
    """Archive files of ``night`` found missing or corrupt: ``relpath, kind, state, error``."""
    return ledger.rows(
        "SELECT relpath, kind, state, last_error AS error FROM files WHERE night = ? AND state IN ('missing', 'corrupt') "
        "ORDER BY relpath",
        (night,),
    )


def night_calibration_events(ledger: Ledger, night: str) -> list[dict[str, Any]]:
    """Calibration fallbacks of ``night``'s jobs (``t, job_id, message``), oldest first."""
    return ledger.rows(
        "SELECT e.t, e.job_id, e.message FROM events e JOIN jobs j ON j.id = e.job_id "
        "WHERE e.kind = 'calibration' AND j.night = ? ORDER BY e.id",
        (night,),
    )


REPORT_META_PREFIX: Final = "report:"
"""``meta`` keys ``report:<night>`` record when the daemon wrote that night's report (Unix seconds)."""


def finished_nights_without_report(ledger: Ledger) -> list[str]:
    """Nights whose jobs have all ended (done, parked or blocked) and whose report was not written yet."""
    rows = ledger.rows(
        "SELECT night FROM jobs WHERE night IS NOT NULL GROUP BY night "
        "HAVING SUM(state IN ('waiting', 'ready', 'running', 'failed')) = 0 "
        "AND NOT EXISTS (SELECT 1 FROM meta WHERE key = ? || night) ORDER BY night",
        (REPORT_META_PREFIX,),
    )
    return [str(r["night"]) for r in rows]


def mark_report_written(ledger: Ledger, night: str, t: float | None = None) -> None:
    ledger.set_meta(REPORT_META_PREFIX + night, repr(clock.now() if t is None else t))


def catalogues_between(ledger: Ledger, start: str, end: str) -> list[dict[str, Any]]:
    """Catalogues on disk of the nights ``start`` to ``end`` (YYYY-MM-DD, inclusive): ``relpath, night, filtercode``."""
    return ledger.rows(
        "SELECT f.relpath, p.night, p.filtercode FROM products p JOIN files f ON f.id = p.file_id "
        "WHERE f.kind = 'apcat' AND f.state = 'on_disk' AND p.night BETWEEN ? AND ? ORDER BY f.relpath",
        (start, end),
    )
