"""The ledger side of downloads: which files to fetch next, and each step of a download as one transaction.

Fields: ``attempts`` counts the failed requests for a file's URL (HEAD, GET, header reads,
the flat LED read at planning) plus the one that brought it to disk, so for a file on disk
``attempts - 1`` is its number of failed requests; ``last_error`` and ``http_status`` hold the
last failure. A file given up on ends ``missing`` with a ``retry_at`` while refusals remain
(refusals are counted as :data:`MISSING_EVENT` events; ``retry_at`` is NULL once
``max_refusals`` are used up), or ``corrupt`` when its body failed verification every time.
Every state change goes through :meth:`Ledger.set_file_state`, which checks the state machine.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection
from typing import Any, Final, Protocol

from streamer.ledger.core import Ledger

MISSING_EVENT: Final = "file_missing"
#: meta key holding the archive's outage state as JSON (``{"outage": bool, "since": t, "until": t, "delay_s": s, ...}``).
OUTAGE_META_KEY: Final = "archive.outage"

# A file is due when it is not on disk and was not given up on, or when a refused file's retry date has come.
_DUE: Final = (
    "(f.state IN ('wanted', 'deleted', 'corrupt', 'reserved') "
    " OR (f.state = 'missing' AND :burst = 0 AND f.retry_at <= :now AND f.attempts < :max_missing))"
)


class FailedRequest(Protocol):
    """A failed request as the archive reports it (``archive.client.ArchiveError`` has this shape)."""

    reason: str
    status: int | None


def download_candidates(
    ledger: Ledger, *, limit: int, burst: bool, now: float, max_missing: int, exclude: Collection[int]
) -> list[dict[str, Any]]:
    """Up to ``limit`` file rows to download next, none of them in ``exclude``.

    First the files that unfinished jobs (waiting, ready, failed) pin, in the order of the
    first job that pins each, then the files that consumers keep, by id; only files with a URL.
    A file is due when it is wanted, deleted, corrupt or reserved, or missing with its retry
    date passed and fewer than ``max_missing`` attempts, except during a ``burst``.
    """
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
        kept = ledger.rows(
            f"SELECT f.* FROM files f WHERE f.kept = 1 AND f.url != '' AND {_DUE} ORDER BY f.id LIMIT :n", params
        )
        chosen = {r["id"] for r in rows}
        rows += [r for r in kept if r["id"] not in exclude and r["id"] not in chosen][: limit - len(rows)]
    return rows


def record_failed_request(ledger: Ledger, file_id: int, err: FailedRequest) -> None:
    """Count one failed request for a file, with its reason and status (one transaction)."""
    with ledger.transaction() as conn:
        conn.execute(
            "UPDATE files SET attempts = attempts + 1, last_error = ?, http_status = ?, updated = ? WHERE id = ?",
            (err.reason, err.status, time.time(), file_id),
        )


def record_expected_size(ledger: Ledger, file_id: int, size: int) -> None:
    """Record the size the archive announces for a file."""
    with ledger.transaction() as conn:
        conn.execute("UPDATE files SET expected_size = ? WHERE id = ?", (size, file_id))


def reserve_download(ledger: Ledger, file_id: int, n_bytes: int, *, budget: int, overhead: int = 0) -> bool:
    """Reserve ``n_bytes`` for a download if it fits the budget; a file left ``downloading`` is first set back.

    Returns whether the file is now ``reserved`` with its bytes.
    """
    if file_state(ledger, file_id) == "downloading":
        with ledger.transaction() as conn:
            ledger.set_file_state(conn, file_id, "reserved", reserved_bytes=0)
    return ledger.reserve(file_id, n_bytes, budget=budget, overhead=overhead)


def mark_downloading(ledger: Ledger, file_id: int) -> None:
    """A reserved file's transfer starts."""
    with ledger.transaction() as conn:
        ledger.set_file_state(conn, file_id, "downloading", expect=("reserved", "downloading"))


def pause_download(ledger: Ledger, file_id: int, reason: str) -> None:
    """The filesystem is full: the file goes back to ``reserved`` (its bytes and its .part kept for a resume)."""
    with ledger.transaction() as conn:
        ledger.set_file_state(conn, file_id, "reserved", last_error=reason)


def mark_on_disk(ledger: Ledger, file_id: int, *, disk_bytes: int, actual_size: int, http_status: int) -> None:
    """A download is complete and durable: ``on_disk``, its reservation released, the request counted."""
    with ledger.transaction() as conn:
        conn.execute("UPDATE files SET attempts = attempts + 1 WHERE id = ?", (file_id,))
        ledger.set_file_state(
            conn, file_id, "on_disk", expect=("downloading",), disk_bytes=disk_bytes, actual_size=actual_size,
            reserved_bytes=0, last_error=None, http_status=http_status, retry_at=None, fetched_at=time.time(),
        )  # fmt: skip


def adopt_on_disk(ledger: Ledger, file_id: int, *, disk_bytes: int, actual_size: int) -> None:
    """A complete file found at its place (a crash after the rename, or reconcile) is recorded ``on_disk``."""
    with ledger.transaction() as conn:
        if _state(conn, file_id) == "corrupt":
            ledger.set_file_state(conn, file_id, "wanted")
        ledger.set_file_state(
            conn, file_id, "on_disk", disk_bytes=disk_bytes, actual_size=actual_size, reserved_bytes=0, retry_at=None
        )


def record_missing(
    ledger: Ledger, file_id: int, relpath: str, reason: str, status: int | None, *, retry_s: float,
    max_refusals: int, retryable: bool = True, count_request: bool = False,
) -> float | None:  # fmt: skip
    """Give a file up as ``missing``, its reservation released; return its retry date (None: no retry).

    The file is retried ``retry_s`` from now while it has had fewer than ``max_refusals``
    refusals (this one included) and ``retryable`` is set. ``count_request``: the refused
    request is not yet counted in ``attempts``. Each refusal is logged as a :data:`MISSING_EVENT`.
    """
    with ledger.transaction() as conn:
        if _state(conn, file_id) == "corrupt":
            ledger.set_file_state(conn, file_id, "wanted")
        refusals = conn.execute(
            "SELECT COUNT(*) FROM events WHERE kind = ? AND file_id = ?", (MISSING_EVENT, file_id)
        ).fetchone()[0] + 1
        retry_at = time.time() + retry_s if retryable and refusals < max_refusals else None
        _give_up(ledger, conn, file_id, "missing", reason, status, retry_at=retry_at, count_request=count_request)
        when = "given up" if retry_at is None else "retry after " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(retry_at))
        ledger.event(MISSING_EVENT, f"{relpath}: {reason} ({when})", level="warning", file_id=file_id, conn=conn)
    return retry_at


def record_corrupt(ledger: Ledger, file_id: int, reason: str, status: int | None, *, count_request: bool = False) -> None:
    """Give a file up as ``corrupt`` (its body failed verification every time), its reservation released."""
    with ledger.transaction() as conn:
        _give_up(ledger, conn, file_id, "corrupt", reason, status, retry_at=None, count_request=count_request)


def file_state(ledger: Ledger, file_id: int) -> str:
    """The state of one file."""
    return str(ledger.scalar("SELECT state FROM files WHERE id = ?", (file_id,)))


def record_archive_outage(ledger: Ledger, status: dict[str, Any], message: str) -> None:
    """Store the archive's outage state in meta and log it as ``archive_outage``/``archive_back`` (one transaction)."""
    in_outage = bool(status.get("outage"))
    with ledger.transaction() as conn:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (OUTAGE_META_KEY, json.dumps(status, sort_keys=True)),
        )
        ledger.event(
            "archive_outage" if in_outage else "archive_back", message, level="warning" if in_outage else "info",
            conn=conn,
        )  # fmt: skip


def outage_recorder(ledger: Ledger) -> Callable[[dict[str, Any], str], None]:
    """The callback for ``ArchiveClient(outage_recorder=...)`` / ``OutageGate(recorder=...)`` that writes this ledger."""

    def record(status: dict[str, Any], message: str) -> None:
        record_archive_outage(ledger, status, message)

    return record


def _state(conn: sqlite3.Connection, file_id: int) -> str:
    return str(conn.execute("SELECT state FROM files WHERE id = ?", (file_id,)).fetchone()[0])


def _give_up(
    ledger: Ledger, conn: sqlite3.Connection, file_id: int, state: str, reason: str, status: int | None, *,
    retry_at: float | None, count_request: bool,
) -> None:  # fmt: skip
    conn.execute("UPDATE files SET attempts = attempts + ? WHERE id = ?", (int(count_request), file_id))
    ledger.set_file_state(
        conn, file_id, state, reserved_bytes=0, last_error=reason, http_status=status, retry_at=retry_at
    )
