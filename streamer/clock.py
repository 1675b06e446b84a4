"""The service's one calendar clock: every "now" that the ledger records or a rule compares comes from here.

By default it is the system clock. ``STREAMER_CLOCK_FILE`` names a file holding a number of seconds
added to it (a float; a test replaces the file by a rename, and it is read again when it changes), so
that a test can move a running daemon through days of simulated nights in minutes: it writes a
larger offset and the daemon, at its next look, finds itself a day later. Plans, retries, backoffs,
event pruning, status and the report all read this clock.

What paces real I/O stays on ``time.monotonic()``: a transfer's rate window, an outage pause, the
re-pick guard, a Retry-After date from the server. A jump of the calendar is no reason to call a
running download stalled. Unset, a reading costs one dictionary look-up.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Final

from streamer.errors import StreamerError

ENVIRONMENT_VARIABLE: Final = "STREAMER_CLOCK_FILE"

_read: dict[str, tuple[int, int, int, float]] = {}  # path -> (inode, mtime_ns, size, offset)


def offset_s() -> float:
    """Seconds the clock file adds to the system clock (0 when ``STREAMER_CLOCK_FILE`` is unset)."""
    path = os.environ.get(ENVIRONMENT_VARIABLE)
    if not path:
        return 0.0
    try:
        info = os.stat(path)
        cached = _read.get(path)
        if cached is not None and cached[:3] == (info.st_ino, info.st_mtime_ns, info.st_size):
            return cached[3]
        with open(path, encoding="ascii") as handle:
            seconds = float(handle.read().strip())
    except (OSError, ValueError) as err:
        raise StreamerError(f"{ENVIRONMENT_VARIABLE}={path}: expected a readable file holding seconds ({err})") from None
    _read[path] = (info.st_ino, info.st_mtime_ns, info.st_size, seconds)
    return seconds


def now() -> float:
    """Seconds since the epoch: ``time.time()`` shifted by the clock file's offset."""
    return time.time() + offset_s()


def utcnow() -> dt.datetime:
    """:func:`now` as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(now(), dt.UTC)
