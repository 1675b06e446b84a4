"""The one walk of a directory tree: regular files only, symlinks never followed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from streamer.storage.atomic import is_unfinished_name
from streamer.storage.paths import PRODUCT_DIRECTORIES


def walk_regular_files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relpath, lstat) of every regular file below ``root``, in name order per directory.

    Symlinks are neither followed nor listed; a file or directory that vanishes during the
    walk is skipped.
    """
    stack = [str(root)]
    prefix = len(str(root).rstrip(os.sep)) + 1
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
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
                yield entry.path[prefix:].replace(os.sep, "/"), info


def disk_usage(root: Path) -> int:
    """Allocated bytes (st_blocks x 512) of every regular file below ``root``."""
    return sum(info.st_blocks * 512 for _relpath, info in walk_regular_files(root))


def orphan_product_temporaries(root: Path) -> list[str]:
    """Relpaths of unfinished files (temporaries) in the product directories, which a killed worker leaves."""
    found = []
    for top in PRODUCT_DIRECTORIES:
        for relpath, _info in walk_regular_files(root / top):
            if is_unfinished_name(relpath.rsplit("/", 1)[-1]):
                found.append(f"{top}/{relpath}")
    return found
