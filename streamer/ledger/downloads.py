"""The download order: files unfinished jobs need (in job order), then files consumers keep."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from streamer.ledger.core import Ledger

_DUE = (
    "(f.state IN ('wanted', 'deleted', 'corrupt', 'reserved') "
    " OR (f.state = 'missing' AND :burst = 0 AND f.retry_at <= :now AND f.attempts < :max_missing))"
)


def download_candidates(
    ledger: Ledger, *, limit: int, burst: bool, now: float, max_missing: int, exclude: Collection[int]
) -> list[dict[str, Any]]:
    """Up to ``limit`` files to download next, skipping ``exclude`` (those already downloading)."""
    params = {"burst": int(burst), "now": now, "max_missing": max_missing, "n": limit + len(exclude)}
    pinned = ledger.rows(
        "SELECT f.*, MIN(p.job_id) AS first_job FROM jobs j JOIN pins p ON p.job_id = j.id "
        "JOIN files f ON f.id = p.file_id "
        f"WHERE j.state IN ('waiting', 'ready', 'failed') AND f.url != '' AND {_DUE} "
        "GROUP BY f.id ORDER BY first_job, f.id LIMIT :n",
        params,
    )
    rows = [r for r in pinned if r["id"] not in exclude][:limit]
    if len(rows) < limit:
        kept = ledger.rows(f"SELECT f.* FROM files f WHERE f.kept = 1 AND f.url != '' AND {_DUE} ORDER BY f.id LIMIT :n", params)
        chosen = {r["id"] for r in rows}
        rows += [r for r in kept if r["id"] not in exclude and r["id"] not in chosen][: limit - len(rows)]
    return rows
