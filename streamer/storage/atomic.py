"""Durable atomic writes, and the names of their temporaries.

A file is written under a hidden temporary name in its own directory, fsynced, renamed
over its final name, and the directory is fsynced: a reader (or a restart) sees either
nothing or the whole file. The temporary's name (``.<name>.<random>.tmp``) never ends
with the product's own suffix, so nothing mistakes it for a product.

A write that the filesystem refuses for want of room (ENOSPC, or EDQUOT for a quota) removes
its temporary and raises :class:`DiskFullError`, which the service treats as the disk's fault,
not the job's (see :func:`is_disk_full`).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

from streamer.crashpoints import crash_point

TEMPORARY_SUFFIX: Final = ".tmp"
#: The errors of a filesystem without room: no space left, or the quota used up.
DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Their messages, and astropy's: its writer checks the free space after a failed write and raises
#: ``OSError("Not enough space on disk: requested N, available M")`` without an errno.
_DISK_FULL_MESSAGES: Final = (*(os.strerror(number) for number in sorted(DISK_FULL_ERRNOS)), "Not enough space on disk")
_CHAIN_LIMIT: Final = 16
#: Endings of files that are not finished: our own temporaries, and the downloader's partial files.
UNFINISHED_SUFFIXES: Final = (TEMPORARY_SUFFIX, ".part", ".zpart")


def is_unfinished_name(name: str) -> bool:
    """Whether a file name is that of a temporary or partial file (never a finished product)."""
    return name.endswith(UNFINISHED_SUFFIXES)


class DiskFullError(OSError):
    """A write refused for want of room on the filesystem (ENOSPC) or in a quota (EDQUOT).

    An OSError built from (errno, message) only, so it crosses a process pool or a dask worker intact.
    """


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it came from, is a full filesystem or a used-up quota.

    Libraries that wrap a failed write (pyarrow, astropy) can drop the errno but keep the system's
    message, so the message counts too; ``__cause__`` and ``__context__`` are followed.
    """
    for _ in range(_CHAIN_LIMIT):
        if error is None:
            return False
        if isinstance(error, DiskFullError) or (isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS):
            return True
        if any(message in str(error) for message in _DISK_FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_bytes(path: Path) -> int:
    """Bytes still writable by an ordinary user on the filesystem that holds ``path`` (statvfs)."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def filesystem_bytes(path: Path) -> int:
    """The size of the filesystem that holds ``path`` (statvfs)."""
    info = os.statvfs(path)
    return info.f_blocks * info.f_frsize


def _disk_full(error: Exception, target: Path) -> DiskFullError:
    number = error.errno if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS else errno.ENOSPC
    return DiskFullError(number, f"{target.name}: {os.strerror(number)}")


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(target: Path) -> Path:
    """Create ``.<name>.<random>.tmp`` beside ``target`` (exclusively, never through a symlink)."""
    while True:
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
        except FileExistsError:
            continue
        return temporary


def write_atomically(path: Path | str, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then make it ``path`` durably; return ``path``.

    Raises :class:`DiskFullError` (the temporary removed, nothing at ``path`` changed) when the filesystem has no room.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = _create_temporary(target)
    except OSError as err:
        if is_disk_full(err):
            raise _disk_full(err, target) from None
        raise
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            crash_point("write", target.name)
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise _disk_full(err, target) from None
        raise
    fsync_directory(target.parent)
    return target
