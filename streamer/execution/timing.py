"""The task record: what a worker measures of one task it ran, returned with the task's result record."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from streamer.execution.jobs import result_record


def run_timed(function: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``function(**kwargs)`` in this worker: its result record, with ``"task"``: CPU and wall seconds, host, pid.

    CPU seconds are the worker process's (every thread of it) while the task ran.
    """
    cpu, wall = time.process_time(), time.perf_counter()
    result = function(**kwargs)
    task = {
        "cpu_s": round(time.process_time() - cpu, 4),
        "wall_s": round(time.perf_counter() - wall, 4),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    return result_record(result) | {"task": task}
