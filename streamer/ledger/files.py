"""File-level statements: what the deleter, reconcile and the job builder read and change.

State changes go through :meth:`Ledger.set_file_state`, so the transition table of
:mod:`streamer.ledger.core` holds for them too.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from streamer import clock
from streamer.ledger.core import Ledger


def files_in_states(ledger: Ledger, states: Sequence[str]) -> list[dict[str, Any]]:
    """``id`` and ``relpath`` of the files in any of ``states``, by id."""
    marks = ", ".join("?" * len(states))
    return ledger.rows(f"SELECT id, relpath FROM files WHERE state IN ({marks}) ORDER BY id", list(states))


def still_deletable(conn: sqlite3.Connection, file_id: int) -> bool:
    """Whether a file is still on disk, not kept and pinned by no job (inside the deleting transaction)."""
    row = conn.execute(
        "SELECT state, kept, EXISTS (SELECT 1 FROM pins WHERE file_id = ?) FROM files WHERE id = ?", (file_id, file_id)
    ).fetchone()
    return row is not None and row[0] == "on_disk" and not row[1] and not row[2]


def adopt_on_disk(ledger: Ledger, conn: sqlite3.Connection, file_id: int, *, disk_bytes: int, actual_size: int) -> None:
    """A file found complete on disk becomes ``on_disk`` (a ``corrupt`` one is wanted again first)."""
    state, fetched_at = conn.execute("SELECT state, fetched_at FROM files WHERE id = ?", (file_id,)).fetchone()
    if state == "corrupt":
        ledger.set_file_state(conn, file_id, "wanted")
    now = clock.now()
    ledger.set_file_state(
        conn, file_id, "on_disk", disk_bytes=disk_bytes, actual_size=actual_size, reserved_bytes=0,
        fetched_at=fetched_at if fetched_at is not None else now,
    )  # fmt: skip


def mark_gone(ledger: Ledger, conn: sqlite3.Connection, relpath: str, reason: str) -> bool:
    """An ``on_disk`` file that is no longer on disk: ``on_disk -> deleting -> deleted``, with ``reason``.

    False when the ledger has no on-disk file at ``relpath``.
    """
    row = conn.execute("SELECT id, state FROM files WHERE relpath = ?", (relpath,)).fetchone()
    if row is None or row[1] != "on_disk":
        return False
    ledger.set_file_state(conn, row[0], "deleting", expect=("on_disk",))
    ledger.set_file_state(conn, row[0], "deleted", expect=("deleting",), disk_bytes=0, actual_size=None, last_error=reason)
    return True


def job_inputs(ledger: Ledger, job_id: int) -> list[dict[str, Any]]:
    """The files a job pins, with their producer job's ``producer_kind``, ``producer_night``,
    ``producer_filter``, ``producer_ccd`` and ``producer_key`` (NULL for downloaded files)."""
    return ledger.rows(
        "SELECT f.*, j.kind AS producer_kind, j.night AS producer_night, j.filtercode AS producer_filter, "
        "j.ccdid AS producer_ccd, j.key AS producer_key "
        "FROM pins p JOIN files f ON f.id = p.file_id LEFT JOIN jobs j ON j.id = f.producer_job "
        "WHERE p.job_id = ? ORDER BY f.id",
        (job_id,),
    )


def job_outputs(ledger: Ledger, job_id: int) -> list[str]:
    """Relpaths of the files a job writes, by id."""
    return [r["relpath"] for r in ledger.rows("SELECT relpath FROM files WHERE producer_job = ? ORDER BY id", (job_id,))]
