"""The read-only queries behind ``streamer status``."""

from __future__ import annotations

from collections.abc import Sequence
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


def kept_not_on_disk(ledger: Ledger, kinds: Sequence[str]) -> dict[str, int]:
    """``files`` of the given kinds that a consumer keeps and that are not on disk, and their expected ``bytes``."""
    if not kinds:
        return {"files": 0, "bytes": 0}
    marks = ",".join("?" * len(kinds))
    row = ledger.rows(
        f"SELECT COUNT(*) AS files, COALESCE(SUM(expected_size), 0) AS bytes FROM files "
        f"WHERE kept = 1 AND kind IN ({marks}) AND state NOT IN ('on_disk')",
        list(kinds),
    )[0]
    return {"files": int(row["files"]), "bytes": int(row["bytes"])}


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
