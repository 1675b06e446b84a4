"""Where the quadrants of a CCD sit relative to one another: the one place that knows it.

All four quadrant grids of a CCD (the raw HDU grid = the IPAC sciimg/mskimg grid) share
one orientation and differ by a translation. On the CCD, displayed with row 0 at the
bottom (FITS convention), they sit as::

    q2 | q1
    ---+---
    q3 | q4

with ``QUADRANT_GAP_X`` columns between left and right and ``QUADRANT_GAP_Y`` rows between
bottom and top (none: the quadrants are the four amplifier regions of one CCD). A pixel
``(x, y)`` of quadrant ``q`` (x = column, y = row, 0-based) is at ``(x + dx, y + dy)`` on the
CCD, with ``(dx, dy) = quadrant_offset(q, shape)``; ``shape`` = (rows, columns) of a quadrant,
3080 x 3072 for ZTF (smaller for simulated test frames). The simulator (``streamer.sim``) lays
out its quadrants the same way.
"""

from __future__ import annotations

from typing import Final

QUADRANT_NX: Final = 3072
QUADRANT_NY: Final = 3080
QUADRANT_GAP_X: Final = 0
QUADRANT_GAP_Y: Final = 0

_COLUMN: Final = {1: 1, 2: 0, 3: 0, 4: 1}
_ROW: Final = {1: 1, 2: 1, 3: 0, 4: 0}


QUADRANT_SHAPE: Final = (QUADRANT_NY, QUADRANT_NX)


def quadrant_offset(qid: int, shape: tuple[int, int] = QUADRANT_SHAPE) -> tuple[int, int]:
    """(dx, dy) in pixels from quadrant ``qid``'s grid to the CCD grid."""
    if qid not in _COLUMN:
        raise ValueError(f"qid {qid}: expected 1..4")
    rows, columns = shape
    return (_COLUMN[qid] * (columns + QUADRANT_GAP_X), _ROW[qid] * (rows + QUADRANT_GAP_Y))


def shift_between(from_qid: int, to_qid: int, shape: tuple[int, int] = QUADRANT_SHAPE) -> tuple[int, int]:
    """(dx, dy) to add to a pixel of ``to_qid`` to get the same CCD point on ``from_qid``'s grid."""
    fx, fy = quadrant_offset(from_qid, shape)
    tx, ty = quadrant_offset(to_qid, shape)
    return (tx - fx, ty - fy)


def siblings_by_distance(qid: int) -> tuple[int, ...]:
    """The other quadrants of the CCD, nearest first (edge neighbours before the diagonal one)."""
    others = [q for q in (1, 2, 3, 4) if q != qid]
    return tuple(sorted(others, key=lambda q: (abs(_COLUMN[q] - _COLUMN[qid]) + abs(_ROW[q] - _ROW[qid]), q)))
