"""The deleter: two-phase removal of ledger files, never through a symlink.

What goes is decided in :mod:`streamer.rules.eviction`. Deletion is two-phase in
the ledger (``deleting``, unlink, ``deleted``) so a crash in between is finished on
restart, and it only ever unlinks regular files below the storage root, walking the
path one directory at a time with ``O_NOFOLLOW`` so that no symlink is ever followed.
(``disk_usage`` is the walk of :mod:`streamer.storage.tree`, named here for its callers.)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamer.crashpoints import crash_point
from streamer.ledger.core import Ledger
from streamer.ledger.files import files_in_states, still_deletable
from streamer.storage.nofollow import UnsafePathError, checked_parts, open_dir_below
from streamer.storage.tree import disk_usage

__all__ = ["UnsafePathError", "allocated_bytes", "delete_files", "disk_usage", "finish_deletion", "recover_deletions", "unlink_below"]


def allocated_bytes(path: Path) -> int:
    """Allocated size (st_blocks x 512) of a regular file, without following symlinks; 0 if absent."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    return info.st_blocks * 512 if stat.S_ISREG(info.st_mode) else 0


def unlink_below(root: Path, relpath: str) -> int:
    """Unlink the regular file ``root/relpath``; return its allocated bytes (0 if it was already gone).

    The directories are walked with :func:`streamer.storage.nofollow.open_dir_below`, so a symlink
    anywhere on the way (or as the file itself) raises UnsafePathError and nothing is deleted.
    """
    parts = checked_parts(relpath)
    with open_dir_below(root, relpath, parts[:-1]) as dir_fd:
        if dir_fd is None:
            return 0
        try:
            info = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"{relpath!r}: not a regular file")
        os.unlink(parts[-1], dir_fd=dir_fd)
        return info.st_blocks * 512


def delete_files(ledger: Ledger, root: Path, rows: Sequence[dict[str, Any]]) -> int:
    """Two-phase deletion of ledger files; returns bytes freed. A row that is not safe is skipped and logged."""
    freed = 0
    for row in rows:
        with ledger.transaction() as conn:
            if not still_deletable(conn, row["id"]):
                continue  # pinned, kept or moved since it was chosen
            ledger.set_file_state(conn, row["id"], "deleting", expect=("on_disk",))
        crash_point("unlink", row["relpath"])
        freed += finish_deletion(ledger, root, row["id"], row["relpath"])
    return freed


def finish_deletion(ledger: Ledger, root: Path, file_id: int, relpath: str) -> int:
    """Second phase: unlink, then mark ``deleted`` (also used to finish deletions after a crash)."""
    try:
        freed = unlink_below(root, relpath)
    except UnsafePathError as err:
        with ledger.transaction() as conn:
            ledger.set_file_state(conn, file_id, "deleted", disk_bytes=0, last_error=str(err))
            ledger.event("evict", f"not deleted (unsafe path): {err}", level="error", file_id=file_id, conn=conn)
        return 0
    with ledger.transaction() as conn:
        ledger.set_file_state(conn, file_id, "deleted", expect=("deleting",), disk_bytes=0)
    return freed


def recover_deletions(ledger: Ledger, root: Path) -> int:
    """Finish deletions that a crash interrupted."""
    rows = files_in_states(ledger, ("deleting",))
    for row in rows:
        finish_deletion(ledger, root, row["id"], row["relpath"])
    return len(rows)
