"""Frame shapes, focal-plane layout and the TAN WCS of each quadrant.

Pixel coordinates are 0-based ``(x, y)`` = (column, row) on the IPAC grid (the raw HDU grid).
Focal-plane pixel coordinates ``(X, Y)`` have their origin at the tangent point of the exposure.

The layout comes from the recorded fact table ``streamer/data/ztf_camera_layout.toml`` (with its
sources), the same table the pipeline reads, never from the pipeline's code:

- CCDs sit on a 4 x 4 grid, CCD ``ccdid`` at the table's ``(col, row)`` (CCD 13 at (0, 0): north-east,
  since the IPAC grid has +x west and +y south); CCD ``(col, row)`` has its pixel (0, 0) at
  ``X0 = (col - 2) * (2 * cols + gap) + gap / 2``, ``Y0 = (row - 2) * (2 * rows + gap) + gap / 2``, with
  ``gap = CCD_GAP_FRACTION * 2 * cols`` rounded (the gap is the simulator's own round figure).
- Within a CCD, quadrants abut without a gap, q4|q3 over q1|q2 on the IPAC grid (over = larger y):
  quadrant offsets ``(ox, oy)`` = the table's cells times ``(cols, rows)``: q1 ``(0, 0)``, q2 ``(cols, 0)``,
  q3 ``(cols, rows)``, q4 ``(0, rows)``.
- Every quadrant has the same CD matrix ``[[-s, 0], [0, -s]]`` with ``s = 1.012 / 3600`` deg/px and
  ``CRVAL`` = the exposure's tangent point, so ``CRPIX = (1 - X0 - ox, 1 - Y0 - oy)`` (1-based, FITS):
  a sibling quadrant's WCS differs only by ``CRPIX1 -/+ cols`` and ``CRPIX2 -/+ rows``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Final

import numpy as np
import numpy.typing as npt
from astropy.wcs import WCS

PIXEL_SCALE_ARCSEC: Final = 1.012
OVERSCAN_COLUMNS: Final = 30
CCD_GAP_FRACTION: Final = 0.035


@dataclass(frozen=True)
class Shape:
    """Size of one quadrant: ``rows`` x ``cols`` of image plus ``rows`` x ``overscan`` columns."""

    name: str
    rows: int
    cols: int
    overscan: int = OVERSCAN_COLUMNS

    @property
    def ccd_gap(self) -> int:
        return int(round(CCD_GAP_FRACTION * 2 * self.cols))


SHAPES: Final = {
    "full": Shape("full", 3080, 3072),
    "small": Shape("small", 260, 256),
}


def _layout_table() -> dict[str, dict[str, list[int]]]:
    """The recorded camera layout (``streamer/data/ztf_camera_layout.toml``)."""
    return tomllib.loads(resources.files("streamer").joinpath("data/ztf_camera_layout.toml").read_text())


_LAYOUT: Final = _layout_table()
QUADRANT_OFFSETS: Final = {q: (int(_LAYOUT["quadrants"][f"q{q}"][0]), int(_LAYOUT["quadrants"][f"q{q}"][1])) for q in (1, 2, 3, 4)}
CCD_CELLS: Final = {c: (int(_LAYOUT["ccds"][f"ccd{c:02d}"][0]), int(_LAYOUT["ccds"][f"ccd{c:02d}"][1])) for c in range(1, 17)}


def shape_named(name: str) -> Shape:
    """The frame shape called ``full`` or ``small``."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"shape {name!r}: expected one of {', '.join(SHAPES)}") from None


def quadrant_origin(shape: Shape, ccdid: int, qid: int) -> tuple[float, float]:
    """Focal-plane coordinates ``(X, Y)`` of pixel (0, 0) of a quadrant."""
    x0, y0 = ccd_origin(shape, ccdid)
    qx, qy = QUADRANT_OFFSETS[qid]
    return x0 + qx * shape.cols, y0 + qy * shape.rows


def ccd_origin(shape: Shape, ccdid: int) -> tuple[float, float]:
    """Focal-plane coordinates of pixel (0, 0) of a whole CCD (the origin of its quadrant at cell (0, 0))."""
    col, row = CCD_CELLS[ccdid]
    gap = shape.ccd_gap
    return (col - 2) * (2 * shape.cols + gap) + gap / 2, (row - 2) * (2 * shape.rows + gap) + gap / 2


def pixel_scale_deg() -> float:
    return PIXEL_SCALE_ARCSEC / 3600.0


def quadrant_wcs_keywords(shape: Shape, ccdid: int, qid: int, ra0: float, dec0: float) -> dict[str, float | str]:
    """FITS WCS keywords of a quadrant for an exposure whose tangent point is ``(ra0, dec0)``."""
    ox, oy = quadrant_origin(shape, ccdid, qid)
    s = pixel_scale_deg()
    return {
        "WCSAXES": 2,
        "RADESYS": "ICRS",
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRPIX1": 1.0 - ox,
        "CRPIX2": 1.0 - oy,
        "CRVAL1": ra0,
        "CRVAL2": dec0,
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "CD1_1": -s,
        "CD1_2": 0.0,
        "CD2_1": 0.0,
        "CD2_2": -s,
    }


def wcs_from_keywords(keywords: dict[str, float | str]) -> WCS:
    """An astropy WCS built from :func:`quadrant_wcs_keywords`."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = [str(keywords["CTYPE1"]), str(keywords["CTYPE2"])]
    wcs.wcs.crpix = [float(keywords["CRPIX1"]), float(keywords["CRPIX2"])]
    wcs.wcs.crval = [float(keywords["CRVAL1"]), float(keywords["CRVAL2"])]
    wcs.wcs.cd = [[float(keywords["CD1_1"]), float(keywords["CD1_2"])], [float(keywords["CD2_1"]), float(keywords["CD2_2"])]]
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.set()
    return wcs


def focal_plane_wcs(ra0: float, dec0: float) -> WCS:
    """WCS of focal-plane coordinates (0-based origin at the tangent point)."""
    s = pixel_scale_deg()
    return wcs_from_keywords(
        {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 1.0, "CRPIX2": 1.0, "CRVAL1": ra0, "CRVAL2": dec0,
         "CD1_1": -s, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": -s}
    )


def ccd_unit_coordinates(shape: Shape, qid: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(u, v)`` in [-1, 1] across the whole CCD for the pixel columns and rows of quadrant ``qid``.

    Returned as a row vector ``u`` (1, cols) and a column vector ``v`` (rows, 1) for broadcasting.
    """
    qx, qy = QUADRANT_OFFSETS[qid]
    x = np.arange(shape.cols, dtype=np.float32) + qx * shape.cols
    y = np.arange(shape.rows, dtype=np.float32) + qy * shape.rows
    u = (x + 0.5) / shape.cols - 1.0
    v = (y + 0.5) / shape.rows - 1.0
    return u[np.newaxis, :].astype(np.float32), v[:, np.newaxis].astype(np.float32)
