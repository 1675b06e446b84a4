"""Moving a file that fails verification aside, below ``<root>/quarantine/``, never through a symlink.

``reconcile --fix`` neither adopts nor deletes a file it finds damaged (it may be the only copy of
something a person put there): it renames it to ``quarantine/<relpath>`` (``.1``, ``.2``, ...
appended when that name is taken). Both directories are opened with ``O_NOFOLLOW`` from the root
(:mod:`streamer.storage.nofollow`), and the rename stays within the root's filesystem.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from streamer.storage.nofollow import UnsafePathError, checked_parts, open_dir_below

#: The directory below the storage root that holds quarantined files (not ledger rows, not counted).
QUARANTINE_DIRECTORY: Final = "quarantine"
_MAX_COPIES: Final = 1000


def is_quarantined(relpath: str) -> bool:
    """Whether a relpath below the root lies in the quarantine directory."""
    return relpath.split("/", 1)[0] == QUARANTINE_DIRECTORY


def quarantine_below(root: Path, relpath: str) -> str:
    """Rename the regular file ``root/relpath`` to a free name below ``quarantine/``; return that relpath.

    UnsafePathError when a component on either side is a symlink or the file is not a regular
    file; FileNotFoundError when it is gone.
    """
    parts = checked_parts(relpath)
    target_parts = (QUARANTINE_DIRECTORY, *parts)
    target_relpath = "/".join(target_parts)
    with open_dir_below(root, relpath, parts[:-1]) as source_fd:
        if source_fd is None:
            raise FileNotFoundError(relpath)
        info = os.stat(parts[-1], dir_fd=source_fd, follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"{relpath!r}: not a regular file")
        with open_dir_below(root, target_relpath, target_parts[:-1], create=True) as target_fd:
            assert target_fd is not None
            name = _free_name(target_fd, parts[-1])
            os.rename(parts[-1], name, src_dir_fd=source_fd, dst_dir_fd=target_fd)
            os.fsync(target_fd)
        os.fsync(source_fd)
    return "/".join((*target_parts[:-1], name))


def _free_name(dir_fd: int, name: str) -> str:
    for copy in range(_MAX_COPIES):
        candidate = name if copy == 0 else f"{name}.{copy}"
        try:
            os.stat(candidate, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return candidate
    raise UnsafePathError(f"{QUARANTINE_DIRECTORY}/{name}: {_MAX_COPIES} quarantined copies already")
