"""The ledger side of downloads: which files to fetch next, and each step of a download as one transaction.

Fields: ``attempts`` counts the failed requests for a file's URL (HEAD, GET, header reads,
the flat LED read at planning) plus the one that brought it to disk, so for a file on disk
``attempts - 1`` is its number of failed requests; ``last_error`` and ``http_status`` hold the
last failure. A file the archive refuses ends ``missing`` with a ``retry_at`` while refusals
remain (refusals are counted in ``files.refusals`` and logged as :data:`MISSING_EVENT` events;
``retry_at`` is NULL once ``max_refusals`` are used up). A download that fails as a whole (its
body failed verification every time: ``corrupt``; an unexpected local error: ``missing``) is
counted in ``files.download_failures``, logged as a :data:`DOWNLOAD_FAILED_EVENT`, and gets the
retry date its caller gives (NULL: parked). The counters survive the pruning of events.
Every state change goes through :meth:`Ledger.set_file_state`, which checks the state machine.

Which files are due is decided here only (:data:`FETCH_NOW_STATES`, :data:`RETRY_STATES` and
:func:`download_candidates`); the fetcher takes every state listed there.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection
from typing import Any, Final, Protocol

from streamer import clock
from streamer.ledger.core import Ledger

MISSING_EVENT: Final = "file_missing"
#: Event of a download that failed as a whole (see the module docstring); counted per file.
DOWNLOAD_FAILED_EVENT: Final = "download_failed"
#: Event of a file parked because a loop picked it again and again without any change.
PARKED_EVENT: Final = "file_parked"
#: States fetched at once: not on disk and not given up. A ``deleted`` file listed here is needed again
#: (pinned by an unfinished job, or kept) and goes back to ``wanted`` first.
FETCH_NOW_STATES: Final = ("wanted", "deleted", "reserved", "downloading")
#: States given up on for a while: fetched again once ``retry_at`` has come, outside a burst (NULL: parked).
RETRY_STATES: Final = ("missing", "corrupt")
#: meta key holding the archive's outage state as JSON (``{"outage": bool, "since": t, "until": t, "delay_s": s, ...}``).
OUTAGE_META_KEY: Final = "archive.outage"

# A file is due when it is not on disk and was not given up on, or when a given-up file's retry date has come.
_DUE: Final = (
    "(f.state IN ('wanted', 'deleted', 'reserved') "
    " OR (f.state = 'missing' AND :burst = 0 AND f.retry_at <= :now AND f.attempts < :max_missing)"
    " OR (f.state = 'corrupt' AND :burst = 0 AND f.retry_at <= :now))"
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
    A file is due when it is wanted, deleted or reserved; or, except during a ``burst``, missing
    with its retry date passed and fewer than ``max_missing`` attempts, or corrupt with its retry
    date passed (a corrupt or missing file without a retry date is parked).
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
            (err.reason, err.status, clock.now(), file_id),
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
            reserved_bytes=0, last_error=None, http_status=http_status, retry_at=None, fetched_at=clock.now(),
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
    refusals (this one included, ``files.refusals``) and ``retryable`` is set. ``count_request``: the
    refused request is not yet counted in ``attempts``. Each refusal is also logged as a :data:`MISSING_EVENT`.
    """
    with ledger.transaction() as conn:
        if _state(conn, file_id) in ("corrupt", "deleted"):
            ledger.set_file_state(conn, file_id, "wanted")
        conn.execute("UPDATE files SET refusals = refusals + 1 WHERE id = ?", (file_id,))
        refusals = int(conn.execute("SELECT refusals FROM files WHERE id = ?", (file_id,)).fetchone()[0])
        retry_at = clock.now() + retry_s if retryable and refusals < max_refusals else None
        _give_up(ledger, conn, file_id, "missing", reason, status, retry_at=retry_at, count_request=count_request)
        when = "given up" if retry_at is None else "retry after " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(retry_at))
        ledger.event(MISSING_EVENT, f"{relpath}: {reason} ({when})", level="warning", file_id=file_id, conn=conn)
    return retry_at


def download_failures(ledger: Ledger, file_id: int) -> int:
    """How many times a file's download failed as a whole (``files.download_failures``, kept when events are pruned)."""
    return int(ledger.scalar("SELECT download_failures FROM files WHERE id = ?", (file_id,)) or 0)


def record_download_failure(
    ledger: Ledger, file_id: int, relpath: str, reason: str, status: int | None, *, state: str,
    retry_s: float | None, count_request: bool = False,
) -> float | None:  # fmt: skip
    """A download failed as a whole: ``state`` (``corrupt`` or ``missing``), its bytes released, retried ``retry_s``
    from now (None: parked). Counted as a :data:`DOWNLOAD_FAILED_EVENT`; returns the retry date.
    """
    retry_at = None if retry_s is None else clock.now() + retry_s
    with ledger.transaction() as conn:
        current = _state(conn, file_id)
        if state == "corrupt" and current not in ("downloading", "corrupt", "on_disk"):
            state = "missing"  # nothing was verified: the download never got a body
        if state == "missing" and current in ("corrupt", "deleted"):
            ledger.set_file_state(conn, file_id, "wanted")
        _give_up(ledger, conn, file_id, state, reason, status, retry_at=retry_at, count_request=count_request)
        conn.execute("UPDATE files SET download_failures = download_failures + 1 WHERE id = ?", (file_id,))
        when = "parked" if retry_at is None else "retry after " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(retry_at))
        ledger.event(DOWNLOAD_FAILED_EVENT, f"{relpath}: {state}: {reason} ({when})", level="warning", file_id=file_id, conn=conn)
    return retry_at


def park_file(ledger: Ledger, file_id: int, relpath: str, reason: str) -> None:
    """Give a file up for good (``missing``, no retry date, bytes released) because a loop made no progress with it."""
    with ledger.transaction() as conn:
        if _state(conn, file_id) in ("corrupt", "deleted", "downloading"):
            ledger.set_file_state(conn, file_id, "wanted")
        previous = conn.execute("SELECT last_error FROM files WHERE id = ?", (file_id,)).fetchone()[0]
        message = reason if not previous else f"{reason}; last error: {previous}"
        _give_up(ledger, conn, file_id, "missing", message, None, retry_at=None, count_request=False)
        ledger.event(PARKED_EVENT, f"{relpath}: {message}", level="error", file_id=file_id, conn=conn)


def want_again(ledger: Ledger, file_id: int) -> None:
    """A ``deleted`` file that is needed again (pinned or kept) is ``wanted``: it is fetched like a new one."""
    with ledger.transaction() as conn:
        ledger.set_file_state(conn, file_id, "wanted", expect=("deleted",), retry_at=None)


def forget_implausible_sizes(ledger: Ledger, max_bytes: int) -> int:
    """Drop expected sizes that no file can have (<= 0 or > ``max_bytes``): they are asked again. Returns how many."""
    with ledger.transaction() as conn:
        return conn.execute(
            "UPDATE files SET expected_size = NULL WHERE expected_size IS NOT NULL AND (expected_size <= 0 OR expected_size > ?)",
            (max_bytes,),
        ).rowcount


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
