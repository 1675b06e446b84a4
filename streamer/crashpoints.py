"""Named points where the kill tests stop the service with SIGKILL, at an exact moment.

A random ``kill -9`` rarely lands inside a rename or between two ledger transactions; these points
make such moments reproducible. ``STREAMER_CRASH_AT="<point>[:<text>][#<n>|#*][@process]"`` kills
the process group (the service and its pool workers, as systemd's ``KillMode=control-group`` would)
the ``n``-th time (default 1; ``*``: every time) one process passes ``<point>`` with a subject
containing ``<text>``; with ``@process``, only the process that passes it (a worker that dies under
its task, as a segfault or the kernel's out-of-memory killer would). Unset, a point costs one
dictionary look-up. Only tests set it, on a service started in a session of its own
(``start_new_session``), so the group holds nothing else.
"""

from __future__ import annotations

import os
import signal
from typing import Final

ENVIRONMENT_VARIABLE: Final = "STREAMER_CRASH_AT"

#: The points, where they are: a test names one of these.
POINTS: Final = {
    "rename": "a download complete and fsynced, before its rename to the final name",
    "renamed": "a download renamed to its final name, before the ledger records it on disk",
    "write": "an atomic write's temporary file written, before it is fsynced and renamed (subject: the file name)",
    "unlink": "a file marked 'deleting' in the ledger, before it is unlinked",
    "record": "inside the transaction that records a finished job, its outputs written, before the commit",
    "exposure": "a worker starting an exposure job (subject: the raw file name)",
}

_passes: dict[str, int] = {}


def crash_point(point: str, subject: str = "") -> None:
    """SIGKILL the process group here if ``STREAMER_CRASH_AT`` selects this pass of ``point``."""
    spec = os.environ.get(ENVIRONMENT_VARIABLE)
    if not spec:
        return
    selector, _, scope = spec.partition("@")
    wanted, _, count = selector.partition("#")
    name, _, text = wanted.partition(":")
    if name != point or text not in subject:
        return
    _passes[spec] = _passes.get(spec, 0) + 1
    if count != "*" and _passes[spec] != (int(count) if count else 1):
        return
    if scope == "process":
        os.write(2, f"crash point {spec} reached at {subject or point}: SIGKILL to process {os.getpid()}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
    os.write(2, f"crash point {spec} reached at {subject or point}: SIGKILL to process group\n".encode())
    os.killpg(os.getpgid(0), signal.SIGKILL)
