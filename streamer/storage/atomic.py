"""Durable atomic writes, and the names of their temporaries.

A file is written under a hidden temporary name in its own directory, fsynced, renamed
over its final name, and the directory is fsynced: a reader (or a restart) sees either
nothing or the whole file. The temporary's name (``.<name>.<random>.tmp``) never ends
with the product's own suffix, so nothing mistakes it for a product.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

TEMPORARY_SUFFIX: Final = ".tmp"
#: Endings of files that are not finished: our own temporaries, and the downloader's partial files.
UNFINISHED_SUFFIXES: Final = (TEMPORARY_SUFFIX, ".part", ".zpart")


def is_unfinished_name(name: str) -> bool:
    """Whether a file name is that of a temporary or partial file (never a finished product)."""
    return name.endswith(UNFINISHED_SUFFIXES)


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
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then make it ``path`` durably; return ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(target)
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
    return target
