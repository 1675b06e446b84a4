"""The deleter: two-phase removal of ledger files, and the disk walks that never follow a symlink.

What goes is decided in :mod:`streamer.rules.eviction`. Deletion is two-phase in
the ledger (``deleting``, unlink, ``deleted``) so a crash in between is finished on
restart, and it only ever unlinks regular files below the storage root, walking the
path one directory at a time with ``O_NOFOLLOW`` so that no symlink is ever followed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from streamer.ledger.core import Ledger


class UnsafePathError(Exception):
    """A path that leaves the storage root, or goes through a symlink."""


def allocated_bytes(path: Path) -> int:
    """Allocated size (st_blocks x 512) of a regular file, without following symlinks; 0 if absent."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    return info.st_blocks * 512 if stat.S_ISREG(info.st_mode) else 0


def disk_usage(root: Path) -> int:
    """Allocated bytes of every regular file below ``root``; symlinks are neither followed nor counted."""
    total = 0
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(info.st_mode):
                total += info.st_blocks * 512
    return total


def _checked_parts(relpath: str) -> Sequence[str]:
    parts = PurePosixPath(relpath).parts
    if not parts or relpath.startswith("/") or any(p in ("..", ".", "") for p in parts):
        raise UnsafePathError(f"{relpath!r}: not a plain path below the storage root")
    return parts


def unlink_below(root: Path, relpath: str) -> int:
    """Unlink the regular file ``root/relpath``; return its allocated bytes (0 if it was already gone).

    Every directory is opened relative to the previous one with O_NOFOLLOW, so a symlink anywhere
    on the way (or as the file itself) raises UnsafePathError and nothing is deleted.
    """
    parts = _checked_parts(relpath)
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except FileNotFoundError:
                return 0
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(f"{relpath!r}: {part!r} is a symlink or not a directory") from None
                raise
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            info = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"{relpath!r}: not a regular file")
        os.unlink(parts[-1], dir_fd=dir_fd)
        return info.st_blocks * 512
    finally:
        os.close(dir_fd)


def delete_files(ledger: Ledger, root: Path, rows: Sequence[dict[str, Any]]) -> int:
    """Two-phase deletion of ledger files; returns bytes freed. A row that is not safe is skipped and logged."""
    freed = 0
    for row in rows:
        with ledger.transaction() as conn:
            still = conn.execute(
                "SELECT state, kept, EXISTS (SELECT 1 FROM pins WHERE file_id = ?) FROM files WHERE id = ?",
                (row["id"], row["id"]),
            ).fetchone()
            if still is None or still[0] != "on_disk" or still[1] or still[2]:
                continue  # pinned, kept or moved since it was chosen
            ledger.set_file_state(conn, row["id"], "deleting", expect=("on_disk",))
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
    rows = ledger.rows("SELECT id, relpath FROM files WHERE state = 'deleting'")
    for row in rows:
        finish_deletion(ledger, root, row["id"], row["relpath"])
    return len(rows)
