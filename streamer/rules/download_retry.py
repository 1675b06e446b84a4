"""When a file whose download failed as a whole is tried again, and when it is parked.

Pure. A download *fails as a whole* when the transfer's own retries are used up (the body
failed verification every time), or an unexpected local error stopped it (a directory
where the file goes). Each such failure is one ``failure`` of the file; the requests inside
one download are the client's business (``archive.max_attempts``, with its own backoff).

- A daemon tries the file again after :data:`FILE_RETRY_S` (growing), at most
  :data:`MAX_FILE_FAILURES` failures in all; then the file is parked (no retry date) with its error.
- A backfill (burst) waits for no later retry: the file keeps its retry date for the daemon,
  and the backfill ends with the file's products reported missing.
- :class:`RepickGuard` catches what the rules above miss: a loop that picks the same item
  again at once without finishing it; after :data:`MAX_IMMEDIATE_REPICKS` such picks the item is parked.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

#: Seconds before the 1st, 2nd, ... retry of a file whose download failed as a whole.
FILE_RETRY_S: Final = (3600.0, 6 * 3600.0, 24 * 3600.0)
#: Failures as a whole after which a file is parked (no retry date).
MAX_FILE_FAILURES: Final = 3
#: Immediate re-picks of the same item in a row after which it is parked (see :class:`RepickGuard`).
MAX_IMMEDIATE_REPICKS: Final = 3
#: Seconds after a pick that did not finish an item within which picking it again is "immediate".
REPICK_WINDOW_S: Final = 60.0


@dataclass(frozen=True)
class RetryFile:
    """Try the file again ``delay_s`` seconds from now."""

    delay_s: float


@dataclass(frozen=True)
class ParkFile:
    """Give the file up: no retry date; it keeps its error for the operator."""


FileAction = RetryFile | ParkFile


def after_download_failure(failures: int, *, max_failures: int = MAX_FILE_FAILURES) -> FileAction:
    """The action after a file's ``failures``-th failure as a whole (this one included, so >= 1)."""
    if failures >= max_failures:
        return ParkFile()
    return RetryFile(FILE_RETRY_S[min(max(failures, 1), len(FILE_RETRY_S)) - 1])


class RepickGuard:
    """Counts immediate re-picks: an item picked again less than ``window_s`` after a pick that did not finish it.

    Call ``picked(key, now)`` before each pick: it answers True once the item was re-picked
    immediately ``limit`` times in a row; the caller parks it then. ``left(key, now, done=...)``
    after each pick: ``done`` (the item reached its goal) clears its count. No legitimate retry
    comes that soon: retried files wait for a retry date of an hour or more (:data:`FILE_RETRY_S`).
    """

    def __init__(self, limit: int = MAX_IMMEDIATE_REPICKS, window_s: float = REPICK_WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self._left_at: dict[Hashable, float] = {}
        self._repicks: dict[Hashable, int] = {}

    def picked(self, key: Hashable, now: float) -> bool:
        left_at = self._left_at.get(key)
        if left_at is not None and now - left_at < self.window_s:
            self._repicks[key] = self._repicks.get(key, 0) + 1
        else:
            self._repicks.pop(key, None)
        return self._repicks.get(key, 0) >= self.limit

    def left(self, key: Hashable, now: float, *, done: bool) -> None:
        if done:
            self.forget(key)
        else:
            self._left_at[key] = now

    def forget(self, key: Hashable) -> None:
        """The item was finished or parked: stop counting it."""
        self._left_at.pop(key, None)
        self._repicks.pop(key, None)

    def repicks(self, key: Hashable) -> int:
        return self._repicks.get(key, 0)
