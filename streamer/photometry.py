"""Aperture photometry at catalogue positions: arrays in, arrays out, no files.

Units: image and background in ADU (detrended), variance in ADU^2, positions in pixels
(0-based, ``x`` = column, ``y`` = row, pixel centres at integers), radii in pixels, sky
positions in degrees.

Flags per source and radius (``Apertures.flags``): the low byte is sep's own flags (only
``sep.APER_TRUNC``: the aperture's box was clipped at the image edge); above it:

- ``FLAG_MASKED``: a rejected pixel (``mask & reject_bits``) overlaps the aperture;
- ``FLAG_EDGE``: the aperture comes closer than ``edge_margin_px`` to the image edge
  (or crosses it);
- ``FLAG_NONFINITE``: the sum or its error is not finite.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import sep
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from streamer import photometry_kernels
from streamer.errors import StreamerError

FLAG_MASKED: Final = 1 << 8
FLAG_EDGE: Final = 1 << 9
FLAG_NONFINITE: Final = 1 << 10

FloatArray = npt.NDArray[np.floating]


class NoCcdWcsError(StreamerError):
    """No quadrant of the CCD has a usable IPAC header: the file cannot be measured (blocked)."""


@dataclass(frozen=True)
class QuadrantWcs:
    """The WCS of one quadrant, the quadrant whose IPAC header it came from (always its own), and that header."""

    wcs: WCS
    from_qid: int
    header: fits.Header


@dataclass(frozen=True)
class Apertures:
    """Sums at every radius of every source: arrays of shape (n_sources, n_radii), plus per-source mask bits."""

    flux: npt.NDArray[np.float64]
    flux_err: npt.NDArray[np.float64]
    flags: npt.NDArray[np.int32]
    mask_bits: npt.NDArray[np.int32]
    """OR of the rejected mask bits on the pixels that the largest aperture overlaps."""


# --- WCS ----------------------------------------------------------------------------------------


WCS_KEYWORD: Final = re.compile(
    r"(NAXIS\d*|WCSAXES|WCSNAME|RADESYS|RADECSYS|EQUINOX|EPOCH|MJD-OBS|DATE-OBS|LONPOLE|LATPOLE"
    r"|(CTYPE|CRVAL|CRPIX|CDELT|CUNIT|CROTA)\d+|(CD|PC|PV|PS)\d+_\d+|(A|B|AP|BP)_(ORDER|DMAX|\d+_\d+))[A-Z]?"
)
"""The keywords of a header that astropy's WCS reads for a celestial image WCS (FITS WCS papers I-II,
TPV's PV cards, SIP): an IPAC sciimg header has about 50 among its 270 cards, and astropy parses and
re-serialises the whole header twice (6.5 ms a quadrant, against 1.5 ms for these alone)."""


def wcs_from_header(header: fits.Header) -> WCS:
    """The celestial WCS of an IPAC sciimg header (TPV distortion included), from its WCS cards
    (``WCS_KEYWORD``) alone.

    Raises ValueError when the header holds no usable celestial WCS.
    """
    cards = fits.Header([card for card in header.cards if WCS_KEYWORD.fullmatch(card.keyword)])
    try:
        with warnings.catch_warnings():
            # astropy reports its own harmless fixes of legacy keywords (RADECSYS, MJD-OBS ...).
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(cards, naxis=2)
    except (ValueError, KeyError, MemoryError) as err:
        raise ValueError(f"no usable WCS in header: {err}") from err
    if not wcs.has_celestial:
        raise ValueError("no celestial WCS in header (CTYPE1/CTYPE2 missing)")
    return wcs


def quadrant_wcs(headers: Mapping[int, fits.Header | None]) -> tuple[dict[int, QuadrantWcs], dict[int, str]]:
    """The WCS of each quadrant of one CCD that has a usable IPAC sciimg header of its own, and why the others have none.

    ``headers`` maps qid to its IPAC sciimg header, or None when missing. A quadrant without its own
    header gets no WCS: a sibling's WCS moved by the quadrant layout is off by up to 4.4 arcsec on
    real data (tests/test_camera_layout.py), so such a quadrant is lost, as the IN2P3 code loses it.
    Raises :class:`NoCcdWcsError` when no quadrant has one.
    """
    own: dict[int, QuadrantWcs] = {}
    problems: dict[int, str] = {}
    for qid in (1, 2, 3, 4):
        header = headers.get(qid)
        if header is None:
            problems[qid] = "no IPAC sciimg header"
            continue
        try:
            own[qid] = QuadrantWcs(wcs_from_header(header), qid, header)
        except (ValueError, KeyError) as err:
            problems[qid] = str(err)
    if not own:
        raise NoCcdWcsError(
            "no quadrant of the CCD has a usable IPAC header (" + "; ".join(f"q{q}: {p}" for q, p in problems.items()) + ")"
        )
    return own, problems


def sky_to_pixel(wcs: WCS, ra: FloatArray, dec: FloatArray) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """0-based pixel (x, y) of sky positions in degrees; NaN where the WCS cannot invert."""
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    if ra.size == 0:
        return np.empty(0), np.empty(0)
    with np.errstate(invalid="ignore"):
        x, y = wcs.world_to_pixel_values(ra, dec)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def boundary_pixels(shape: tuple[int, int], n_per_side: int = 16) -> tuple[FloatArray, FloatArray]:
    """(x, y) of points along the outer edge of an image of ``shape`` (rows, columns)."""
    ny, nx = shape
    t = np.linspace(0.0, 1.0, n_per_side, endpoint=False)
    left, right, bottom, top = -0.5, nx - 0.5, -0.5, ny - 0.5
    x = np.concatenate([left + t * (right - left), np.full_like(t, right), right - t * (right - left), np.full_like(t, left)])
    y = np.concatenate([np.full_like(t, bottom), bottom + t * (top - bottom), np.full_like(t, top), top - t * (top - bottom)])
    return x, y


def on_image(x: FloatArray, y: FloatArray, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """True where a position's centre falls on a pixel of the image (NaN: False)."""
    ny, nx = shape
    with np.errstate(invalid="ignore"):
        return (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)


# --- isolation ----------------------------------------------------------------------------------


def unit_vectors(ra: FloatArray, dec: FloatArray) -> npt.NDArray[np.float64]:
    """(n, 3) unit vectors of sky positions in degrees."""
    ra_r = np.radians(np.asarray(ra, dtype=np.float64))
    dec_r = np.radians(np.asarray(dec, dtype=np.float64))
    cos_dec = np.cos(dec_r)
    return np.column_stack([cos_dec * np.cos(ra_r), cos_dec * np.sin(ra_r), np.sin(dec_r)])


def isolated(ra: FloatArray, dec: FloatArray, radius_arcsec: float) -> npt.NDArray[np.bool_]:
    """True for each source with no other source of the list within ``radius_arcsec`` (inclusive)."""
    from scipy.spatial import cKDTree

    n = np.asarray(ra).size
    if n == 0:
        return np.zeros(0, dtype=bool)
    vectors = unit_vectors(ra, dec)
    chord = 2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0)
    # every pair at most the chord apart (twice as fast as each source's nearest neighbour)
    pairs = cKDTree(vectors, balanced_tree=False, compact_nodes=False).query_pairs(chord * (1 + 1e-12), output_type="ndarray")
    alone = np.ones(n, dtype=bool)
    alone[pairs.ravel()] = False
    return alone


# --- apertures ----------------------------------------------------------------------------------


SEP_BOX_MASKED_LIMIT: Final = 0.5
"""sep.Background drops a box with more than half its pixels masked, and a map whose every box is
dropped is 0 everywhere: without a check, a crowded quadrant would have no background subtracted."""


def background_disc_radius(
    rejected: npt.NDArray[np.bool_], x: FloatArray, y: FloatArray, radii: FloatArray, box: tuple[int, int]
) -> float:
    """The radius of the source discs masked for the background: the largest aperture where that leaves
    every background box enough sky, else the smallest aperture, else none (sep's clipping alone).

    The masked fraction of a box is bounded above by its rejected pixels plus its sources' disc areas
    (overlaps counted twice), so the choice never lets a box exceed ``SEP_BOX_MASKED_LIMIT``.
    """
    ny, nx = rejected.shape
    bw, bh = box
    gy, gx = -(-ny // bh), -(-nx // bw)
    edges_y, edges_x = np.minimum(np.arange(gy + 1) * bh, ny), np.minimum(np.arange(gx + 1) * bw, nx)
    area = np.diff(edges_y)[:, None] * np.diff(edges_x)[None, :]
    flat_index = np.flatnonzero(rejected)  # rejected pixels are few: cheaper than reducing every box
    rejected_count = np.bincount(
        (flat_index // nx) // bh * gx + (flat_index % nx) // bw, minlength=gy * gx
    ).reshape(gy, gx)
    column = np.clip(np.floor((x + 0.5) / bw).astype(np.int64), 0, gx - 1)
    row = np.clip(np.floor((y + 0.5) / bh).astype(np.int64), 0, gy - 1)
    sources = np.bincount(row * gx + column, minlength=gy * gx).reshape(gy, gx)
    for radius in (float(radii.max()), float(radii.min())):
        if np.all(rejected_count + sources * math.pi * radius**2 <= SEP_BOX_MASKED_LIMIT * area):
            return radius
    return 0.0


def measure_apertures(
    image: FloatArray,
    variance: FloatArray,
    mask: npt.NDArray[np.integer],
    reject_bits: int,
    x: FloatArray,
    y: FloatArray,
    radii: Sequence[float],
    *,
    background_box: tuple[int, int] = (192, 220),
    edge_margin_px: float = 0.0,
    overwrite_image: bool = False,
    finite: bool = False,
) -> Apertures:
    """Background-subtracted circular-aperture sums with errors and flags.

    The background is one sep.Background map (boxes ``background_box`` = (width, height)) with
    rejected pixels and a disc of the largest radius around every position masked (a smaller disc, or
    none, where that would mask too much of a box: ``background_disc_radius``). All radii of
    a position are summed in one pass over its pixels (:mod:`streamer.photometry_kernels`: the
    sums (to about 1e-13), exact overlap and truncation of ``sep.sum_circle(..., subpix=0)``), with errors from
    ``variance``. Non-finite pixels count as rejected and contribute zero. The inputs are not
    modified, except ``image`` when ``overwrite_image`` is true (a float32 buffer the caller no
    longer needs: the background is then subtracted in place, saving a copy). ``finite`` true says
    that the caller has found every value of ``image`` and ``variance`` finite (the detrend pass
    counts them): the search for non-finite values is then skipped.
    """
    image = np.asarray(image)
    variance = np.asarray(variance)
    mask = np.asarray(mask)
    if image.ndim != 2 or variance.shape != image.shape or mask.shape != image.shape:
        raise ValueError(
            f"image {image.shape}, variance {variance.shape}, mask {mask.shape}: expected three arrays of one 2-d shape"
        )
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask dtype {mask.dtype}: expected an integer bit mask")
    radii_arr = np.asarray(radii, dtype=np.float64)
    if radii_arr.ndim != 1 or radii_arr.size == 0 or not np.all(radii_arr > 0):
        raise ValueError(f"radii {radii!r}: expected a non-empty list of positive radii")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x {x.shape}, y {y.shape}: expected two 1-d arrays of one length")
    if not np.all(np.isfinite(x) & np.isfinite(y)):
        raise ValueError("x, y: positions must be finite (drop sources off the image first)")
    n, k = x.size, radii_arr.size
    r_max = float(radii_arr.max())

    rejected = photometry_kernels.rejected_pixels(mask, reject_bits)

    reusable = overwrite_image and image.dtype == np.float32 and image.flags.c_contiguous and image.flags.writeable
    work = image if reusable else np.array(image, dtype=np.float32, copy=True)
    var = np.asarray(variance, dtype=np.float32)
    # A NaN or infinity anywhere makes the float32 sum non-finite: a 2 ms test before the full one.
    if not finite and not (np.isfinite(work.sum()) and np.isfinite(var.sum())):
        nonfinite = ~(np.isfinite(work) & np.isfinite(var))
        work[nonfinite] = 0.0
        var = np.where(nonfinite, np.float32(0.0), var)
        rejected |= nonfinite

    background_mask = rejected.copy()  # the source discs go into it; the sums still need ``rejected``
    disc = background_disc_radius(rejected, x, y, radii_arr, background_box)
    if n and disc > 0:
        sep.mask_ellipse(background_mask, x, y, disc, disc, 0.0)
    bw, bh = background_box
    background = sep.Background(work, mask=background_mask, bw=int(bw), bh=int(bh))
    del background_mask
    background.subfrom(work)
    mask_bits = np.zeros(n, dtype=np.int32)
    if n == 0:
        empty = np.zeros((0, k), dtype=np.float64)
        return Apertures(empty, empty.copy(), np.zeros((0, k), dtype=np.int32), mask_bits)

    # One pass per position over its pixels for all radii: sep's sums (exact overlap), the
    # rejected pixels' overlap area per radius (> 0: masked) and sep's box truncation.
    flux, variance_sum, rejected_area, truncated = photometry_kernels.sum_circles(work, var, rejected, x, y, radii_arr)
    flux_err = np.sqrt(variance_sum)
    touched = rejected_area > 0
    flags = np.where(truncated, np.int32(sep.APER_TRUNC), np.int32(0))
    flags |= np.where(touched, FLAG_MASKED, 0).astype(np.int32)
    hit = np.flatnonzero(touched.any(axis=1))
    if hit.size:
        # the OR of (bits & reject) is (OR of bits) & reject, both in the mask's type as numpy casts them
        under = photometry_kernels.mask_bits_in_circles(mask, x[hit], y[hit], r_max).astype(mask.dtype)
        mask_bits[hit] = (under & np.asarray(reject_bits).astype(mask.dtype)).astype(np.int32)

    ny, nx = image.shape
    reach = radii_arr[None, :] + edge_margin_px
    near_edge = (
        (x[:, None] - reach < -0.5) | (x[:, None] + reach > nx - 0.5) | (y[:, None] - reach < -0.5) | (y[:, None] + reach > ny - 0.5)
    )
    flags |= np.where(near_edge, FLAG_EDGE, 0).astype(np.int32)
    flags |= np.where(np.isfinite(flux) & np.isfinite(flux_err), 0, FLAG_NONFINITE).astype(np.int32)
    return Apertures(flux, flux_err, flags, mask_bits)
