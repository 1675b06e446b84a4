"""Which biases a master bias is built from.

The first biases of a night's sequence on a CCD carry the settling of the readout
electronics, so the first ``detrend.bias_skip_first`` of each CCD (in time order) are
left out. The work graph pins only the biases this rule keeps; the worker combines
what it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

Bias = TypeVar("Bias")


def bias_time_order(obsjd: float | None, filefracday: str) -> tuple[float, str]:
    """The sort key of a bias exposure: its OBSJD (unknown first), then its file name's date."""
    return (obsjd if obsjd is not None else 0.0, filefracday)


def biases_to_use(biases: Sequence[Bias], skip_first: int, *, order: Callable[[Bias], tuple[float, str] | str]) -> list[Bias]:
    """The biases of one CCD and night that go into its master: in time order (``order``), minus the first ``skip_first``."""
    if skip_first < 0:
        raise ValueError(f"skip_first {skip_first}: expected >= 0")
    return sorted(biases, key=order)[skip_first:]
