"""The quadrant layout against real facts, and why a missing header is not replaced by a sibling's.

The real facts, none of them the code under test:

- ``data/ztf_20200924431759_000655_zr_c13_o_q3_sciimg.header.txt``: the full IPAC sciimg header of
  quadrant 3 of CCD 13 of exposure 20200924431759 (field 655, zr);
- ztfimg's coordinates notebook (github MickaelRigault/ztfimg, docs/notebooks/coordinates.ipynb) prints,
  for quadrant 2 of the same exposure and CCD, the sky positions of two pixels and the focal-plane (u, v)
  of its corners, all computed from q2's own real header; ztfimg's quickstart notebook prints the pixel of
  UGC 2885 on q3. ztfimg's pixels there are "reordered": ``x' = 3071 - x``, ``y' = 3079 - y`` of the
  stored (IPAC) pixel (ztfimg/utils/astrometry.py), which the UGC 2885 check below confirms on the real
  q3 header.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from streamer import geometry, photometry
from streamer.sim import geometry as sim_geometry

DATA = Path(__file__).resolve().parent / "data"
NX, NY = 3072, 3080
ARCSEC = 1.0 / 3600.0

# ztfimg's coordinates notebook, q2 of ztf_20200924431759_000655_zr_c13 (reordered pixels):
Q2_PIXELS_REORDERED = [(40.0, 300.0), (1700.0, 801.0)]
Q2_SKY = [(57.4935367, 36.2742405), (58.07736917, 36.40336741)]
# get_corners("uv"): reordered pixels (0, 0), (3072, 0), (3072, 3080), (0, 3080); arcsec east and north of
# the pointing RA = 03:40:14.59, DEC = +33:21:00 (gnomonic, ztfimg/utils/tools.py ``project``)
Q2_CORNERS_REORDERED = [(0.0, 0.0), (3072.0, 0.0), (3072.0, 3080.0), (0.0, 3080.0)]
Q2_CORNERS_UV = [(7031.58753668, 10320.50186255), (10151.5276707, 10329.57701145), (10150.9176875, 13462.39473092),
                 (7029.41028383, 13450.96916209)]  # fmt: skip
# ztfimg's quickstart notebook: UGC 2885 (58.2599, 35.5903) on q3 at reordered pixel (2309.44231913, 1007.07609495)
UGC2885 = (58.2599, 35.5903)
UGC2885_Q3_REORDERED = (2309.44231913, 1007.07609495)


def q3_header() -> fits.Header:
    text = (DATA / "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.header.txt").read_text()
    return fits.Header.fromstring(text, sep="\n")


def stored(x_reordered: float, y_reordered: float) -> tuple[float, float]:
    """ztfimg's reordered pixel back on the stored (IPAC) grid."""
    return NX - 1 - x_reordered, NY - 1 - y_reordered


def pointing() -> tuple[float, float]:
    sky = SkyCoord(q3_header()["RA"], q3_header()["DEC"], unit=("hourangle", "deg"))
    return float(sky.ra.deg), float(sky.dec.deg)


def uv_to_sky(u: float, v: float) -> tuple[float, float]:
    """Inverse gnomonic projection about the pointing; u east, v north, arcsec."""
    ra0, dec0 = np.radians(pointing())
    xi, eta = np.radians(u * ARCSEC), np.radians(v * ARCSEC)
    denominator = np.cos(dec0) - eta * np.sin(dec0)
    ra = ra0 + np.arctan2(xi, denominator)
    dec = np.arctan2(np.sin(dec0) + eta * np.cos(dec0), np.hypot(xi, denominator))
    return float(np.degrees(ra)), float(np.degrees(dec))


def real_q2_points() -> tuple[np.ndarray, np.ndarray, SkyCoord]:
    """Stored q2 pixels and their real sky positions (two pixels and four corners)."""
    pixels = [stored(*p) for p in Q2_PIXELS_REORDERED + Q2_CORNERS_REORDERED]
    sky = Q2_SKY + [uv_to_sky(*uv) for uv in Q2_CORNERS_UV]
    x, y = (np.array(c) for c in zip(*pixels, strict=True))
    return x, y, SkyCoord([s[0] for s in sky], [s[1] for s in sky], unit="deg")


def q3_wcs_moved_onto_q2(shift: tuple[int, int]) -> WCS:
    """q3's real WCS applied to q2's grid, q2's pixel (x, y) being q3's (x + dx, y + dy)."""
    header = q3_header()
    header["CRPIX1"] = float(header["CRPIX1"]) - shift[0]
    header["CRPIX2"] = float(header["CRPIX2"]) - shift[1]
    return photometry.wcs_from_header(header)


def error_arcsec(shift: tuple[int, int]) -> np.ndarray:
    x, y, real = real_q2_points()
    ra, dec = q3_wcs_moved_onto_q2(shift).pixel_to_world_values(x, y)
    return np.asarray(SkyCoord(ra, dec, unit="deg").separation(real).arcsec)


def test_ztfimg_reordering_is_3071_minus_x_on_the_real_header() -> None:
    x, y = photometry.sky_to_pixel(photometry.wcs_from_header(q3_header()), np.array([UGC2885[0]]), np.array([UGC2885[1]]))
    assert (NX - 1 - x[0], NY - 1 - y[0]) == pytest.approx(UGC2885_Q3_REORDERED, abs=1e-4)


def test_the_real_header_has_south_up_and_west_right() -> None:
    header = q3_header()
    assert header["CD1_1"] < 0 and header["CD2_2"] < 0
    assert abs(header["CD1_2"]) < 0.05 * abs(header["CD1_1"]) and abs(header["CD2_1"]) < 0.05 * abs(header["CD2_2"])


def test_q2_lies_where_the_layout_puts_it_and_nowhere_else() -> None:
    """q3's WCS moved by the layout's shift meets q2's real positions near their shared edge (0.2"),
    and every other placement of q2 (the old layout among them) is more than a quadrant off."""
    shift = geometry.shift_between(3, 2)
    assert shift == (0, -NY)
    near_the_edge = error_arcsec(shift)[[0, 1, 2, 3]]  # the two pixels and the corners of q2's row 3079
    assert np.all(near_the_edge < 0.2), near_the_edge
    for other in [(0, NY), (NX, 0), (-NX, 0), (NX, -NY), (-NX, -NY), (NX, NY), (-NX, NY)]:
        assert np.all(error_arcsec(other) > 1000.0), other


def test_a_borrowed_wcs_is_not_good_to_0_3_arcsec_over_the_quadrant() -> None:
    """Why a quadrant without its own header is lost: the best borrowed WCS (the correct layout) is
    4.4" off at q2's far corners, beyond the 0.3" asked for, so ``photometry.quadrant_wcs`` borrows none."""
    errors = error_arcsec(geometry.shift_between(3, 2))
    assert errors.max() > 0.3 and errors.max() == pytest.approx(4.4, abs=0.3)
    own, problems = photometry.quadrant_wcs({1: None, 2: None, 3: q3_header(), 4: None})
    assert set(own) == {3} and set(problems) == {1, 2, 4}


def test_quadrants_agree_with_the_sky_directions_of_the_real_data() -> None:
    """q1 and q2 north of q3 and q4, q1 east of q2 (the issue's IRSA-derived centres), on the IPAC grid
    with the real CD matrix: +y is south, +x is west."""
    header = q3_header()
    centres = {q: geometry.quadrant_offset(q) for q in (1, 2, 3, 4)}
    north = {q: -np.sign(header["CD2_2"]) * -c[1] for q, c in centres.items()}  # larger y = further south
    east = {q: np.sign(header["CD1_1"]) * c[0] for q, c in centres.items()}  # CD1_1 < 0: larger x = west
    assert min(north[1], north[2]) > max(north[3], north[4])
    assert east[1] > east[2]
    _, _, real = real_q2_points()
    q3_centre = SkyCoord(header["CRVAL1"], header["CRVAL2"], unit="deg")
    assert np.all(real.dec > q3_centre.dec)  # the real q2 is north of the real q3


def test_the_simulator_lays_out_quadrants_and_ccds_like_the_real_camera() -> None:
    """The simulator's WCS (built from the fact table, not from streamer.geometry) puts q2 north of q3 and
    CCD 13's q3 north-east of the pointing, as the real header does (within 15 % of its distance)."""
    shape = sim_geometry.shape_named("full")
    ra0, dec0 = pointing()
    centre_pixel = ((NX - 1) / 2, (NY - 1) / 2)
    sky = {}
    for qid in (2, 3):
        wcs = sim_geometry.wcs_from_keywords(sim_geometry.quadrant_wcs_keywords(shape, 13, qid, ra0, dec0))
        sky[qid] = SkyCoord(*wcs.wcs_pix2world([centre_pixel], 0)[0], unit="deg")
    assert sky[2].dec > sky[3].dec
    real_q3 = SkyCoord(q3_header()["CRVAL1"], q3_header()["CRVAL2"], unit="deg")
    centre = SkyCoord(ra0, dec0, unit="deg")
    assert sky[3].ra > centre.ra and sky[3].dec > centre.dec and real_q3.ra > centre.ra and real_q3.dec > centre.dec
    assert sky[3].separation(centre).deg == pytest.approx(real_q3.separation(centre).deg, rel=0.15)
    assert sky[3].separation(real_q3).deg < 0.15 * real_q3.separation(centre).deg
