"""Eviction arithmetic: how many bytes to free, and which candidates go (pure).

The candidates come from the ledger already in eviction order (downloaded inputs, then
calibration inputs, then masters; least recently used first); these functions only count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Watermarks:
    budget: int
    high: float
    low: float

    @property
    def high_bytes(self) -> int:
        return int(self.budget * self.high)

    @property
    def low_bytes(self) -> int:
        return int(self.budget * self.low)


def bytes_to_free(used: int, marks: Watermarks, *, need: int = 0, force: bool = False) -> int:
    """How many bytes the evictor should free now.

    Above the high watermark, or when ``need`` more bytes would not fit the budget, free down to
    the low watermark (and at least enough for ``need``). ``force`` (the end of a backfill) frees
    everything erasable.
    """
    if force:
        return max(used, 0)
    if used > marks.high_bytes or used + need > marks.budget:
        return max(used + need - marks.low_bytes, used + need - marks.budget, 0)
    return 0


def choose_victims(candidates: Iterable[dict[str, Any]], amount: int) -> list[dict[str, Any]]:
    """The first candidates (already in eviction order) whose bytes add up to ``amount``."""
    chosen: list[dict[str, Any]] = []
    freed = 0
    for row in candidates:
        if freed >= amount:
            break
        chosen.append(row)
        freed += int(row["disk_bytes"])
    return chosen
