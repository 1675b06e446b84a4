"""Walking below the storage root one directory at a time, never through a symlink.

The one walk that every writer and the deleter share: each directory is opened relative to
the previous one with ``O_NOFOLLOW``, so a symlink planted anywhere under the root (a night
directory, a ``.part``) raises :class:`UnsafePathError` instead of sending a write or an
unlink outside the root.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath

__all__ = ["UnsafePathError", "checked_parts", "make_dirs_below", "open_dir_below"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(Exception):
    """A path that leaves the storage root, or goes through a symlink."""


def checked_parts(relpath: str) -> Sequence[str]:
    """The components of a plain relative path (no absolute path, ``.``, ``..`` or empty part)."""
    parts = PurePosixPath(relpath).parts
    if not parts or relpath.startswith("/") or any(p in ("..", ".", "") for p in parts):
        raise UnsafePathError(f"{relpath!r}: not a plain path below the storage root")
    return parts


@contextmanager
def open_dir_below(root: Path, relpath: str, directories: Sequence[str], *, create: bool = False) -> Iterator[int | None]:
    """A descriptor of ``root/<directories...>`` opened without following any symlink (None if absent).

    ``create`` makes each missing directory (mode 0o755 less the umask). A component that is a
    symlink raises UnsafePathError naming ``relpath``; one that is not a directory does too, except
    with ``create``, where it stays the NotADirectoryError it is (an obstacle, not an escape).
    The descriptor is closed on exit.
    """
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in directories:
            try:
                next_fd = _open_child(dir_fd, part, create)
            except FileNotFoundError:
                yield None
                return
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if not create or _is_symlink(dir_fd, part):
                    raise UnsafePathError(f"{relpath!r}: {part!r} is a symlink or not a directory") from None
                raise
            os.close(dir_fd)
            dir_fd = next_fd
        yield dir_fd
    finally:
        os.close(dir_fd)


def _is_symlink(dir_fd: int, name: str) -> bool:
    return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)


def _open_child(dir_fd: int, name: str, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    with suppress(FileExistsError):  # made meanwhile by another download: opened (and checked) below
        os.mkdir(name, 0o755, dir_fd=dir_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def make_dirs_below(root: Path, relpath: str) -> Path:
    """Create the parent directories of ``root/relpath`` without following symlinks; return the file's path."""
    parts = checked_parts(relpath)
    with open_dir_below(root, relpath, parts[:-1], create=True):
        pass
    return root.joinpath(*parts)
