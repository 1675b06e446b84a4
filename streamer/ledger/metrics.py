"""The read-only queries behind the Prometheus metrics: one cheap query per metric family.

Per-(kind, state) file totals come from :meth:`Ledger.bytes_by_kind_and_state` (the
``file_totals`` table the triggers keep); the rest is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streamer.ledger.core import Ledger


def fetched_from_archive(ledger: Ledger) -> dict[str, int]:
    """``files`` from the archive that reached disk (each once, evicted ones included) and their ``bytes``."""
    row = ledger.rows(
        "SELECT COUNT(*) AS files, COALESCE(SUM(actual_size), 0) AS bytes FROM files "
        "WHERE url != '' AND actual_size IS NOT NULL"
    )[0]
    return {"files": int(row["files"]), "bytes": int(row["bytes"])}


def archive_requests(ledger: Ledger) -> int:
    """Requests counted against archive files: the failed ones and the one that brought each file."""
    return int(ledger.scalar("SELECT COALESCE(SUM(attempts), 0) FROM files WHERE url != ''"))


def done_duration_buckets(ledger: Ledger, bounds: Sequence[float]) -> list[dict[str, Any]]:
    """Per job kind of the done jobs: ``n``, ``total`` seconds and ``le_<i>`` = how many took <= ``bounds[i]``."""
    buckets = ", ".join(f"SUM(CASE WHEN finished - started <= {float(b)!r} THEN 1 ELSE 0 END) AS le_{i}" for i, b in enumerate(bounds))
    return ledger.rows(
        f"SELECT kind, COUNT(*) AS n, COALESCE(SUM(finished - started), 0.0) AS total, {buckets} FROM jobs "
        "WHERE state = 'done' AND started IS NOT NULL AND finished IS NOT NULL GROUP BY kind ORDER BY kind"
    )


def last_plan_time(ledger: Ledger) -> float | None:
    """When the latest night was planned (its ``plan`` event), or None."""
    value = ledger.scalar("SELECT MAX(t) FROM events WHERE kind = 'plan' AND level = 'info'")
    return None if value is None else float(value)


def last_download_time(ledger: Ledger) -> float | None:
    """When the latest archive file reached disk, or None."""
    value = ledger.scalar("SELECT MAX(fetched_at) FROM files WHERE fetched_at IS NOT NULL AND url != ''")
    return None if value is None else float(value)


def last_task_time(ledger: Ledger) -> float | None:
    """When the latest job finished done, or None."""
    value = ledger.scalar("SELECT MAX(finished) FROM jobs WHERE state = 'done'")
    return None if value is None else float(value)
