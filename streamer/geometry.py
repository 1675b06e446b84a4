"""Where the quadrants of a CCD sit relative to one another: the one place in the pipeline that knows it.

All four quadrant grids of a CCD (the raw HDU grid = the IPAC sciimg/mskimg grid) share one
orientation and differ by a translation. The layout is a recorded fact table,
``streamer/data/ztf_camera_layout.toml``, which says where each fact comes from (ztfimg's
quadrant reordering and CCD assembly, checked against real sciimg WCS of quadrants 2 and 3 of
``ztf_20200924431759_000655_zr_c13``). On the IPAC grid, row 0 at the bottom (+y is south,
+x is west on the sky), the quadrants sit as::

    q4 | q3
    ---+---
    q1 | q2

that is ztfimg's north-up ``q2 | q1`` over ``q3 | q4`` turned by 180 degrees. There is no gap
between quadrants (they are the four amplifier regions of one CCD). A pixel ``(x, y)`` of
quadrant ``q`` (0-based, x = column) is at ``(x + dx, y + dy)`` on the CCD grid, with
``(dx, dy) = quadrant_offset(q, shape)``; ``shape`` = (rows, columns) of a quadrant, 3080 x 3072
for ZTF. The simulator reads the same table, never this module.

A quadrant without its own IPAC header is not given a sibling's WCS moved by this layout: on
real data that is up to 4.4 arcsec off at the far side of the quadrant (tests/test_camera_layout.py).
"""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Final

QUADRANT_NX: Final = 3072
QUADRANT_NY: Final = 3080
QUADRANT_SHAPE: Final = (QUADRANT_NY, QUADRANT_NX)
LAYOUT_TABLE: Final = "data/ztf_camera_layout.toml"


def _read_quadrant_table() -> dict[int, tuple[int, int]]:
    table = tomllib.loads(resources.files("streamer").joinpath(LAYOUT_TABLE).read_text())
    return {qid: (int(table["quadrants"][f"q{qid}"][0]), int(table["quadrants"][f"q{qid}"][1])) for qid in (1, 2, 3, 4)}


#: (column, row) of each quadrant within its CCD, in quadrant units, from the fact table.
QUADRANT_CELLS: Final = _read_quadrant_table()


def quadrant_offset(qid: int, shape: tuple[int, int] = QUADRANT_SHAPE) -> tuple[int, int]:
    """(dx, dy) in pixels from quadrant ``qid``'s grid to the CCD grid."""
    if qid not in QUADRANT_CELLS:
        raise ValueError(f"qid {qid}: expected 1..4")
    rows, columns = shape
    column, row = QUADRANT_CELLS[qid]
    return (column * columns, row * rows)


def shift_between(from_qid: int, to_qid: int, shape: tuple[int, int] = QUADRANT_SHAPE) -> tuple[int, int]:
    """(dx, dy) to add to a pixel of ``to_qid`` to get the same CCD point on ``from_qid``'s grid."""
    fx, fy = quadrant_offset(from_qid, shape)
    tx, ty = quadrant_offset(to_qid, shape)
    return (tx - fx, ty - fy)
