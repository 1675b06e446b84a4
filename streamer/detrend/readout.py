"""Quadrant orientation: the one place that knows how stored pixels map to readout order.

Raw quadrants are stored on the IPAC grid (the grid of the sciimg WCS and mskimg).
Read out, each amplifier sees its quadrant flipped: columns for q2 and q3, rows for
q3 and q4 (the ztfimg convention). In readout order a row is read data columns first
(column 0 first), then its 30 overscan columns (overscan column 0 first), so the
first overscan columns read are ``overscan_readout[:, :k]``.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt

ScalarT = TypeVar("ScalarT", bound=np.generic)

QUADRANT_SHAPE = (3080, 3072)
OVERSCAN_COLUMNS = 30


def _flips(qid: int) -> tuple[bool, bool]:
    if qid not in (1, 2, 3, 4):
        raise ValueError(f"qid {qid}: expected 1..4")
    return (qid in (3, 4), qid in (2, 3))


def to_readout(array: npt.NDArray[ScalarT], qid: int) -> npt.NDArray[ScalarT]:
    """A view of a stored quadrant (or its overscan) in readout order. Do not write to it."""
    flip_rows, flip_cols = _flips(qid)
    return array[:: -1 if flip_rows else 1, :: -1 if flip_cols else 1]


def from_readout(array: npt.NDArray[ScalarT], qid: int) -> npt.NDArray[ScalarT]:
    """A view of a readout-order array back on the stored (IPAC) grid. The flips are their own inverse."""
    return to_readout(array, qid)
