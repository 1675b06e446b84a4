"""Benchmarks: each prints ratios against a baseline measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_cpu_seconds(action: Callable[[], object], repeat: int) -> float:
    """The median CPU seconds of this process (``time.process_time``) over ``repeat`` calls of ``action``."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        action()
        times.append(time.process_time() - start)
    return statistics.median(times)
