"""Compiled circular-aperture sums: every radius of a position in one pass over its pixels.

The arithmetic is that of ``sep.sum_circle(..., subpix=0)`` (sep 1.4, ``src/aperture.i`` and
``src/overlap.h``), so that the sums come out as sep's, radius by radius (but see below):

- the box of radius ``r`` around ``(x, y)`` spans columns ``[trunc(x - r + 0.5), trunc(x + r +
  1.4999999))`` (C truncation towards zero), clipped to the image; it is *truncated* (sep's
  ``APER_TRUNC``) when the clipping moves an end;
- a pixel of the box whose centre lies at squared distance ``d2 < (r + 0.7072)**2`` is visited:
  it counts whole when ``d2 <= max(r - 0.7072, 0)**2``, otherwise with the exact area of its
  unit square inside the circle;
- the sum of ``pixel * overlap`` and of ``variance * overlap`` is accumulated in float64 over the
  visited pixels, row by row, in sep's order (float32 pixels, as sep converts them).

The radii are visited together: those boxes are nested and those conditions monotone in ``r``, so
a pixel contributes to a suffix of the ascending radii (exact overlap for the first few, whole
for the rest). A NaN pixel a radius visits makes that radius's sum NaN, as in sep.

One difference, for speed: the area of a circular segment, ``r^2 (theta - sin theta) / 2`` in
sep, is summed as a series in the half-chord ``s`` when ``s / r <= 1/4`` (always for r >= 2.83),
which saves an arcsine and a sine per partly covered pixel (about 30 % of the kernel's time). It
is the same area to about 1e-16 of the segment (sep's own form loses digits on short chords), so
sums agree with sep's to about 1e-13 relative; the rejected pixels' overlaps, which decide the
masked flag (> 0), are computed with sep's arithmetic to the last bit.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import numpy.typing as npt

APER_TRUNC = 0x0010  # sep's flag value: the aperture's box was clipped at the image edge
_ANNULUS = 0.7072  # sep's half-width of the band of partly covered pixels around the circle


@numba.njit(cache=True, inline="always")
def _area_arc(x1: float, y1: float, x2: float, y2: float, r: float) -> float:
    """Area of the circular segment between two points on a circle of radius ``r``."""
    a = math.sqrt((x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1))
    theta = 2.0 * math.asin(0.5 * a / r)
    return 0.5 * r * r * (theta - math.sin(theta))


# asin(s) - s sqrt(1 - s^2) = sum_n _ARC_SERIES[n] s^(2n + 3), from its derivative 2 s^2 / sqrt(1 - s^2);
# for s <= 1/4 the terms after these 12 add less than 1e-16 of the sum.
_ARC_SERIES = tuple(2.0 * math.comb(2 * n, n) / 4.0**n / (2 * n + 3) for n in range(12))


@numba.njit(cache=True, inline="always")
def _area_arc_series(x1: float, y1: float, x2: float, y2: float, r: float) -> float:
    """:func:`_area_arc` without its arcsine and sine where the chord is short (``s = chord / 2r <= 1/4``,
    every pixel-sized chord of a circle of radius >= 2.83): ``r^2 (asin s - s sqrt(1 - s^2))`` by its series."""
    s2 = ((x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1)) / (4.0 * r * r)
    if s2 > 0.0625:
        return _area_arc(x1, y1, x2, y2, r)
    c = _ARC_SERIES  # the 12 terms in s2 by Estrin's scheme: pairs, then pairs of pairs (shorter chains than Horner's)
    s4 = s2 * s2
    s8 = s4 * s4
    low = (c[0] + c[1] * s2) + (c[2] + c[3] * s2) * s4
    middle = (c[4] + c[5] * s2) + (c[6] + c[7] * s2) * s4
    high = (c[8] + c[9] * s2) + (c[10] + c[11] * s2) * s4
    series = low + (middle + high * s8) * s8
    return r * r * math.sqrt(s2) * s2 * series


@numba.njit(cache=True, inline="always")
def _segment(x1: float, y1: float, x2: float, y2: float, r: float, series: bool) -> float:
    return _area_arc_series(x1, y1, x2, y2, r) if series else _area_arc(x1, y1, x2, y2, r)


@numba.njit(cache=True, inline="always")
def _area_triangle(x1: float, y1: float, x2: float, y2: float, x3: float, y3: float) -> float:
    return 0.5 * abs(x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))


@numba.njit(cache=True)
def _overlap_first_quadrant(xmin: float, ymin: float, xmax: float, ymax: float, r: float, series: bool) -> float:
    """Area of a rectangle with ``0 <= xmin <= xmax``, ``0 <= ymin <= ymax`` inside a circle of
    radius ``r`` centred on the origin; ``series``: segments by :func:`_area_arc_series`."""
    xmin2 = xmin * xmin
    ymin2 = ymin * ymin
    r2 = r * r
    if xmin2 + ymin2 > r2:
        return 0.0
    xmax2 = xmax * xmax
    ymax2 = ymax * ymax
    if xmax2 + ymax2 < r2:
        return (xmax - xmin) * (ymax - ymin)
    lower_right = xmax2 + ymin2  # squared distances of the two other corners
    upper_left = xmin2 + ymax2
    if lower_right < r2 and upper_left < r2:
        x1 = math.sqrt(r2 - ymax2)
        y1 = ymax
        x2 = xmax
        y2 = math.sqrt(r2 - xmax2)
        return (xmax - xmin) * (ymax - ymin) - _area_triangle(x1, y1, x2, y2, xmax, ymax) + _segment(x1, y1, x2, y2, r, series)
    if lower_right < r2:
        x1 = xmin
        y1 = math.sqrt(r2 - xmin2)
        x2 = xmax
        y2 = math.sqrt(r2 - xmax2)
        return (
            _segment(x1, y1, x2, y2, r, series) + _area_triangle(x1, y1, x1, ymin, xmax, ymin) + _area_triangle(x1, y1, x2, ymin, x2, y2)
        )
    if upper_left < r2:
        x1 = math.sqrt(r2 - ymin2)
        y1 = ymin
        x2 = math.sqrt(r2 - ymax2)
        y2 = ymax
        return (
            _segment(x1, y1, x2, y2, r, series) + _area_triangle(x1, y1, xmin, y1, xmin, ymax) + _area_triangle(x1, y1, xmin, y2, x2, y2)
        )
    x1 = math.sqrt(r2 - ymin2)
    y1 = ymin
    x2 = xmin
    y2 = math.sqrt(r2 - xmin2)
    return _segment(x1, y1, x2, y2, r, series) + _area_triangle(x1, y1, x2, y2, xmin, ymin)


@numba.njit(cache=True)
def _overlap_one_quadrant(xmin: float, ymin: float, xmax: float, ymax: float, r: float, series: bool) -> float:
    """Overlap of a rectangle that lies in one closed quadrant around the centre, mirrored onto the
    first (the same mirrorings as sep, so that the same arithmetic runs)."""
    if xmin >= 0.0:
        if ymin >= 0.0:
            return _overlap_first_quadrant(xmin, ymin, xmax, ymax, r, series)
        return _overlap_first_quadrant(-ymax, xmin, -ymin, xmax, r, series)
    if ymin >= 0.0:
        return _overlap_first_quadrant(-xmax, ymin, -xmin, ymax, r, series)
    return _overlap_first_quadrant(-xmax, -ymax, -xmin, -ymin, r, series)


@numba.njit(cache=True)
def circle_overlap(xmin: float, ymin: float, xmax: float, ymax: float, r: float) -> float:
    """Exact area of the rectangle [xmin, xmax] x [ymin, ymax] inside a circle of radius ``r``
    centred on the origin, with sep's arithmetic to the last bit."""
    return _circle_overlap(xmin, ymin, xmax, ymax, r, False)


@numba.njit(cache=True)
def _circle_overlap(xmin: float, ymin: float, xmax: float, ymax: float, r: float, series: bool) -> float:
    """:func:`circle_overlap`, cut along the axes into pieces of one quadrant each; with ``series``
    the segments are summed as series (within about 1e-16 of sep's, and faster)."""
    if r <= 0.0:
        return 0.0
    if xmin >= 0.0 or xmax <= 0.0:
        if ymin >= 0.0 or ymax <= 0.0:
            return _overlap_one_quadrant(xmin, ymin, xmax, ymax, r, series)
        return _overlap_one_quadrant(xmin, ymin, xmax, 0.0, r, series) + _overlap_one_quadrant(xmin, 0.0, xmax, ymax, r, series)
    if ymin >= 0.0 or ymax <= 0.0:
        return _overlap_one_quadrant(xmin, ymin, 0.0, ymax, r, series) + _overlap_one_quadrant(0.0, ymin, xmax, ymax, r, series)
    return (
        _overlap_one_quadrant(xmin, ymin, 0.0, 0.0, r, series)
        + _overlap_one_quadrant(0.0, ymin, xmax, 0.0, r, series)
        + _overlap_one_quadrant(xmin, 0.0, 0.0, ymax, r, series)
        + _overlap_one_quadrant(0.0, 0.0, xmax, ymax, r, series)
    )


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _sum_circles(
    image: npt.NDArray[np.float32],
    variance: npt.NDArray[np.float32],
    rejected: npt.NDArray[np.bool_],
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    radii: npt.NDArray[np.float64],
    total: npt.NDArray[np.float64],
    total_variance: npt.NDArray[np.float64],
    rejected_area: npt.NDArray[np.float64],
    truncated: npt.NDArray[np.bool_],
) -> None:
    ny, nx = image.shape
    n_radii = radii.size
    inner2 = np.empty(n_radii)
    outer2 = np.empty(n_radii)
    for k in range(n_radii):
        inner = radii[k] - _ANNULUS
        inner2[k] = inner * inner if inner > 0.0 else 0.0
        outer2[k] = (radii[k] + _ANNULUS) * (radii[k] + _ANNULUS)
    x0 = np.empty(n_radii, np.int64)
    x1 = np.empty(n_radii, np.int64)
    y0 = np.empty(n_radii, np.int64)
    y1 = np.empty(n_radii, np.int64)
    tv = np.empty(n_radii)
    sv = np.empty(n_radii)
    ra = np.empty(n_radii)
    for i in range(x.size):
        xc = x[i]
        yc = y[i]
        for k in range(n_radii):
            r = radii[k]
            x0[k] = int(xc - r + 0.5)  # int() of a float truncates towards zero, as C's cast
            x1[k] = int(xc + r + 1.4999999)
            y0[k] = int(yc - r + 0.5)
            y1[k] = int(yc + r + 1.4999999)
            clipped = x0[k] < 0 or x1[k] > nx or y0[k] < 0 or y1[k] > ny
            truncated[i, k] = clipped
            x0[k] = max(x0[k], 0)
            x1[k] = min(x1[k], nx)
            y0[k] = max(y0[k], 0)
            y1[k] = min(y1[k], ny)
            tv[k] = 0.0
            sv[k] = 0.0
            ra[k] = 0.0
        last = n_radii - 1
        for iy in range(y0[last], y1[last]):
            dy = iy - yc
            for ix in range(x0[last], x1[last]):
                dx = ix - xc
                d2 = dx * dx + dy * dy
                first = 0  # the smallest radius that visits this pixel (boxes nest, outer2 ascends)
                while first < n_radii and not (
                    d2 < outer2[first] and x0[first] <= ix < x1[first] and y0[first] <= iy < y1[first]
                ):
                    first += 1
                if first == n_radii:
                    continue
                pix = image[iy, ix]
                var = variance[iy, ix]
                bad = rejected[iy, ix]
                k = first
                while k < n_radii and d2 > inner2[k]:  # partly covered for these radii
                    overlap = _circle_overlap(dx - 0.5, dy - 0.5, dx + 0.5, dy + 0.5, radii[k], True)
                    tv[k] += pix * overlap
                    sv[k] += var * overlap
                    if bad:  # sep's own arithmetic, so that "overlaps" (> 0) is decided exactly as sep decides it
                        ra[k] += circle_overlap(dx - 0.5, dy - 0.5, dx + 0.5, dy + 0.5, radii[k])
                    k += 1
                for whole in range(k, n_radii):
                    tv[whole] += pix * 1.0
                    sv[whole] += var * 1.0
                    if bad:
                        ra[whole] += 1.0
        for k in range(n_radii):
            total[i, k] = tv[k]
            total_variance[i, k] = sv[k]
            rejected_area[i, k] = ra[k]


def sum_circles(
    image: npt.NDArray[np.float32],
    variance: npt.NDArray[np.float32],
    rejected: npt.NDArray[np.bool_],
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    radii: npt.ArrayLike,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Sums at every radius of every position, with sep's exact overlap (see the module docstring).

    ``image`` and ``variance`` are float32 and ``rejected`` bool, of one 2-d shape; ``x``, ``y``
    pixel positions (0-based, ``x`` the column); ``radii`` positive, in any order. Returns arrays
    of shape (positions, radii): the sum of the image, the sum of the variance (``sqrt`` of it is
    sep's error), the overlap area of rejected pixels (sep's sum over ``rejected`` as 0/1), and
    whether the aperture's box was clipped at the image edge (sep's ``APER_TRUNC``).
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    rejected = np.ascontiguousarray(rejected, dtype=np.bool_)
    if image.ndim != 2 or variance.shape != image.shape or rejected.shape != image.shape:
        raise ValueError(
            f"image {image.shape}, variance {variance.shape}, rejected {rejected.shape}: expected three arrays of one 2-d shape"
        )
    x_arr = np.ascontiguousarray(x, dtype=np.float64)
    y_arr = np.ascontiguousarray(y, dtype=np.float64)
    radii_arr = np.asarray(radii, dtype=np.float64)
    if x_arr.ndim != 1 or x_arr.shape != y_arr.shape:
        raise ValueError(f"x {x_arr.shape}, y {y_arr.shape}: expected two 1-d arrays of one length")
    if not (np.all(np.isfinite(x_arr)) and np.all(np.isfinite(y_arr))):
        raise ValueError("x, y: expected finite positions")
    if radii_arr.ndim != 1 or radii_arr.size == 0 or not np.all(np.isfinite(radii_arr) & (radii_arr > 0)):
        raise ValueError(f"radii {radii_arr.tolist()!r}: expected a non-empty list of positive radii")
    order = np.argsort(radii_arr, kind="stable")
    shape = (x_arr.size, radii_arr.size)
    total, total_variance, rejected_area = np.empty(shape), np.empty(shape), np.empty(shape)
    truncated = np.empty(shape, dtype=np.bool_)
    _sum_circles(image, variance, rejected, x_arr, y_arr, np.ascontiguousarray(radii_arr[order]), total, total_variance, rejected_area, truncated)
    back = np.empty_like(order)
    back[order] = np.arange(order.size)  # column j of the sorted result is radius order[j]
    return total[:, back], total_variance[:, back], rejected_area[:, back], truncated[:, back]


@numba.njit(cache=True, nogil=True)
def _mask_bits_in_circles(bits: npt.NDArray[np.integer], x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], radius: float, out: npt.NDArray[np.int32]) -> None:
    ny, nx = bits.shape
    limit = radius * radius
    for s in range(x.size):
        xc, yc = x[s], y[s]
        i0, i1 = max(int(math.floor(yc - radius - 0.5)), 0), min(int(math.ceil(yc + radius + 0.5)) + 1, ny)
        j0, j1 = max(int(math.floor(xc - radius - 0.5)), 0), min(int(math.ceil(xc + radius + 0.5)) + 1, nx)
        found = np.int32(0)
        for i in range(i0, i1):
            dy = min(max(yc, i - 0.5), i + 0.5) - yc  # the nearest point of the pixel's square
            row = bits[i]
            for j in range(j0, j1):
                dx = min(max(xc, j - 0.5), j + 0.5) - xc
                found |= np.int32(row[j]) if dx * dx + dy * dy < limit else np.int32(0)
        out[s] = found


def mask_bits_in_circles(bits: npt.NDArray[np.integer], x: npt.ArrayLike, y: npt.ArrayLike, radius: float) -> npt.NDArray[np.int32]:
    """OR of ``bits`` (2-d, integer) over the pixels that a circle of ``radius`` around each position
    overlaps: those whose unit square has a point closer than ``radius`` to the centre."""
    x_arr = np.ascontiguousarray(x, dtype=np.float64)
    y_arr = np.ascontiguousarray(y, dtype=np.float64)
    if bits.ndim != 2 or not np.issubdtype(bits.dtype, np.integer) or x_arr.ndim != 1 or x_arr.shape != y_arr.shape:
        raise ValueError(f"bits {bits.shape} {bits.dtype}, x {x_arr.shape}, y {y_arr.shape}: expected 2-d integer bits and two 1-d arrays of one length")
    out = np.zeros(x_arr.size, dtype=np.int32)
    _mask_bits_in_circles(np.ascontiguousarray(bits), x_arr, y_arr, float(radius), out)
    return out


@numba.njit(cache=True, nogil=True)
def _rejected(mask: npt.NDArray[np.integer], bits: np.integer, out: npt.NDArray[np.bool_]) -> None:
    for k in range(mask.size):
        out[k] = (mask[k] & bits) != 0


def rejected_pixels(mask: npt.NDArray[np.integer], reject_bits: int) -> npt.NDArray[np.bool_]:
    """``(mask & reject_bits) != 0`` in one pass, ``reject_bits`` cast to the mask's type as numpy would."""
    bits = mask.dtype.type(np.asarray(reject_bits).astype(mask.dtype))
    flat = np.ascontiguousarray(mask).reshape(-1)
    out = np.empty(mask.shape, dtype=np.bool_)
    _rejected(flat, bits, out.reshape(-1))
    return out
