"""The read-only queries behind ``streamer status``."""

from __future__ import annotations

from typing import Any

from streamer.ledger.core import Ledger


def downloads_since(ledger: Ledger, t: float) -> dict[str, int]:
    """``n`` archive files fetched since ``t`` and their ``bytes``."""
    row = ledger.rows(
        "SELECT COUNT(*) AS n, COALESCE(SUM(actual_size), 0) AS bytes FROM files WHERE fetched_at >= ? AND url != ''",
        (t,),
    )[0]
    return {"n": int(row["n"]), "bytes": int(row["bytes"])}


def jobs_done_since(ledger: Ledger, t: float) -> int:
    return int(ledger.scalar("SELECT COUNT(*) FROM jobs WHERE finished >= ? AND state = 'done'", (t,)))


def unfinished_jobs(ledger: Ledger) -> int:
    return int(ledger.scalar("SELECT COUNT(*) FROM jobs WHERE state IN ('waiting', 'ready', 'running', 'failed')"))


def erasable_totals(ledger: Ledger) -> dict[str, int]:
    """``files`` and ``bytes`` on disk that no consumer keeps, no job pins, and that are not catalogues."""
    row = ledger.rows(
        "SELECT COUNT(*) AS files, COALESCE(SUM(disk_bytes), 0) AS bytes FROM files f "
        "WHERE f.state = 'on_disk' AND f.kept = 0 AND f.kind != 'apcat' "
        "AND NOT EXISTS (SELECT 1 FROM pins p WHERE p.file_id = f.id)"
    )[0]
    return {"files": int(row["files"]), "bytes": int(row["bytes"])}


#: States of a kept file not on disk that the service still obtains (downloads, makes, or fetches again).
LACKING_STATES = ("wanted", "reserved", "downloading", "deleting", "deleted")
#: States of a kept file that the archive refused or that failed verification (retried later, or parked).
OWED_STATES = ("missing", "corrupt")

# A kept file not on disk that the consumer is owed: given up on, or a product whose task cannot run
# (blocked, e.g. by an input the archive refused, or parked after its attempts).
_OWED = (
    f"(f.state IN ({', '.join(repr(s) for s in OWED_STATES)}) OR (f.state != 'on_disk' AND EXISTS "
    "(SELECT 1 FROM jobs j WHERE j.id = f.producer_job AND j.state IN ('blocked', 'parked'))))"
)
_LACKING = f"(f.state IN ({', '.join(repr(s) for s in LACKING_STATES)}) AND NOT {_OWED})"


def consumer_figures(ledger: Ledger, consumer: str) -> dict[str, int]:
    """What one consumer keeps, by its ``keeps`` rows.

    ``on_disk_files``/``on_disk_bytes`` (allocated bytes); ``lacking_files``/``lacking_bytes``
    (expected bytes, 0 where unknown): not on disk, still to be downloaded or made; ``owed_files``:
    not on disk and not coming (see ``_OWED``); ``missing_files``/``missing_bytes``: every kept file
    not on disk, with its expected bytes; ``refusals``: the archive's refusals of its files.
    """
    row = ledger.rows(
        "SELECT COUNT(*) FILTER (WHERE f.state = 'on_disk') AS on_disk_files, "
        "COALESCE(SUM(f.disk_bytes) FILTER (WHERE f.state = 'on_disk'), 0) AS on_disk_bytes, "
        f"COUNT(*) FILTER (WHERE {_LACKING}) AS lacking_files, "
        f"COALESCE(SUM(f.expected_size) FILTER (WHERE {_LACKING}), 0) AS lacking_bytes, "
        f"COUNT(*) FILTER (WHERE {_OWED}) AS owed_files, "
        "COUNT(*) FILTER (WHERE f.state != 'on_disk') AS missing_files, "
        "COALESCE(SUM(f.expected_size) FILTER (WHERE f.state != 'on_disk'), 0) AS missing_bytes, "
        "COALESCE(SUM(f.refusals), 0) AS refusals "
        "FROM keeps k JOIN files f ON f.id = k.file_id WHERE k.consumer = ?",
        (consumer,),
    )[0]
    return {k: int(v) for k, v in row.items()}


def refusals_total(ledger: Ledger) -> int:
    """Every refusal by the archive of any file (``files.refusals``: not reset when events are pruned)."""
    return int(ledger.scalar("SELECT COALESCE(SUM(refusals), 0) FROM files") or 0)


def calibration_events(ledger: Ledger, limit: int = 50) -> list[dict[str, Any]]:
    """The latest calibration fallbacks (``job_id``, ``t``, ``message``), newest first."""
    return ledger.rows(
        "SELECT job_id, t, message FROM events WHERE kind = 'calibration' ORDER BY id DESC LIMIT ?", (limit,)
    )


def recent_problems(ledger: Ledger, limit: int = 10) -> list[dict[str, Any]]:
    """The latest warnings and errors (``t``, ``level``, ``kind``, ``message``), newest first."""
    return ledger.rows(
        "SELECT t, level, kind, message FROM events WHERE level IN ('warning', 'error') ORDER BY id DESC LIMIT ?",
        (limit,),
    )


def stuck_reason(ledger: Ledger) -> str | None:
    """The message of the latest ``stuck`` event, unless an ``unstuck`` came after it."""
    rows = ledger.rows("SELECT kind, message FROM events WHERE kind IN ('stuck', 'unstuck') ORDER BY id DESC LIMIT 1")
    return str(rows[0]["message"]) if rows and rows[0]["kind"] == "stuck" else None
