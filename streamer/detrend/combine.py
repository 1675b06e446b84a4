"""Sigma-clipped median of a stack of frames, with a per-pixel variance of the result.

The definition (which :func:`clipped_median` computes fast and the tests compute slowly, pixel by
pixel): for the finite values of one pixel across the frames,

1. centre = median of the kept values;
2. sigma = the larger of the interquartile range of the kept values / 1.349 (quartiles by linear
   interpolation, numpy's default) and a floor shared by the whole stack (one row block): the
   square root of the median of the sample variances (ddof 1) of its pixels with all n values
   finite (every k-th of them, k = max(1, count // 65536)), divided by the median of
   chi2(n - 1) / (n - 1) (Wilson-Hilferty), so that it estimates the typical noise variance.
   Why both: a plain standard deviation cannot reject a single outlier among 7 frames at 3 sigma
   (one outlier reaches at most 2.3 sigma from the mean, 2.9 from the median); an interquartile
   range of a handful of values alone is so noisy that 3 "sigma" would reject good values in a
   fifth of the pixels; the floor stops that, and a noisy pixel keeps its own, larger sigma;
3. keep the values with ``|value - centre| <= clip_sigma * sigma`` (all of them when sigma is 0,
   and the previous set if none would remain);
4. repeat until nothing changes or ``max_iterations``.

The result is the median of the kept values; its variance is ``c(k) * s**2 / k`` where ``s**2`` is
the sample variance (ddof 1) of the k kept values and ``c(k)`` the variance of the median of k
Gaussian draws in units of sigma**2 / k (1 for k <= 2, 1.35 for k = 3, tending to pi / 2).

Speed: the frames are sorted per pixel by a sorting network of element-wise minimum / maximum over
whole planes (Batcher's odd-even merge sort, pruned to n), so the kept values of a pixel are always
a contiguous run [lo, hi) of its sorted values and every step is a vectorised gather. Work on row
blocks (see :func:`combine_in_row_blocks`): a block of ~128 rows of 3072 float32 pixels per frame
stays in the CPU cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

IQR_TO_SIGMA = 1.3489795003921634  # interquartile range of a unit Gaussian
FLOOR_SAMPLE = 65536  # the floor's median is taken over every k-th complete pixel, about this many

# Variance of the median of k unit Gaussian draws, times k (Monte Carlo, 4e5 draws each, seed 12345;
# exact for k = 1, 2). Beyond the table: pi / 2.
_MEDIAN_VARIANCE_FACTOR = (
    1.0, 1.0, 1.351, 1.197, 1.43, 1.294, 1.476, 1.346, 1.482, 1.382,
    1.512, 1.414, 1.518, 1.427, 1.534, 1.445, 1.526, 1.457, 1.535, 1.473,
    1.541, 1.478, 1.539, 1.48, 1.542, 1.488, 1.549, 1.498, 1.554, 1.503,
    1.553, 1.504, 1.556, 1.509, 1.553, 1.513, 1.552, 1.508, 1.552, 1.516,
)  # fmt: skip


def median_variance_factor(k: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``c(k)``: variance of the median of k Gaussian draws in units of sigma**2 / k."""
    table = np.append(np.asarray(_MEDIAN_VARIANCE_FACTOR), math.pi / 2)
    index = np.clip(np.asarray(k, dtype=np.int64) - 1, 0, len(table) - 1)
    return table[index]


@cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (i < j) that sort n values: Batcher's odd-even merge sort, pruned to n.

    Built for the next power of two; pairs touching an index >= n are dropped, which is exact
    because padding values of +inf at the end would never move.
    """
    if n < 1:
        raise ValueError(f"n = {n}: expected at least 1 value to sort")
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def sort_frames(stack: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """A new float32 copy of ``stack`` (n, ...) sorted along axis 0; non-finite values become +inf, last."""
    values = np.array(stack, dtype=np.float32, copy=True)
    values[~np.isfinite(values)] = np.inf
    low = np.empty(values.shape[1:], dtype=np.float32)
    for i, j in sorting_network(values.shape[0]):
        np.minimum(values[i], values[j], out=low)
        np.maximum(values[i], values[j], out=values[j])
        values[i] = low
    return values


@dataclass(frozen=True)
class ClippedMedian:
    """The combination of one block: every array has the shape of one frame (rows, columns)."""

    median: npt.NDArray[np.float32]  # input units; NaN where no frame had a finite value
    variance: npt.NDArray[np.float32]  # of the median, input units squared; NaN where k < 2
    sample_variance: npt.NDArray[np.float32]  # of the kept values (ddof 1); NaN where k < 2
    n_used: npt.NDArray[np.int16]  # frames kept after clipping


def _gather(sorted_values: npt.NDArray[np.float32], index: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
    """``sorted_values[index[p], p]`` for every pixel p of a (n, m) array, as float64."""
    m = sorted_values.shape[1]
    gathered: npt.NDArray[np.float32] = np.take(sorted_values.ravel(), index * m + np.arange(m))
    return gathered.astype(np.float64)


def _run_centre_sigma(
    sorted_values: npt.NDArray[np.float32], lo: npt.NDArray[np.intp], hi: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Median and IQR-sigma of the run [lo, hi) of each pixel's sorted values (a (n, m) array)."""
    count = hi - lo
    centre = 0.5 * (_gather(sorted_values, lo + (count - 1) // 2) + _gather(sorted_values, lo + count // 2))
    quartiles = []
    for q in (0.25, 0.75):
        position = q * (count - 1)
        below = np.floor(position).astype(np.intp)
        above = np.minimum(below + 1, count - 1)
        v_below = _gather(sorted_values, lo + below)
        quartiles.append(v_below + (position - below) * (_gather(sorted_values, lo + above) - v_below))
    return centre, (quartiles[1] - quartiles[0]) / IQR_TO_SIGMA


def _clip_step(
    sorted_values: npt.NDArray[np.float32],
    lo: npt.NDArray[np.intp],
    hi: npt.NDArray[np.intp],
    centre: npt.NDArray[np.float64],
    sigma: npt.NDArray[np.float64],
    clip_sigma: float,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The run kept by one clipping pass (unchanged where sigma is 0 or nothing would remain)."""
    sigma = np.where(np.isfinite(sigma), sigma, 0.0)
    low_edge = centre - clip_sigma * sigma
    high_edge = centre + clip_sigma * sigma
    new_lo, new_hi = lo.copy(), hi.copy()
    for i in range(sorted_values.shape[0]):
        plane = sorted_values[i]
        inside = (lo <= i) & (i < hi)
        new_lo += inside & (plane < low_edge)
        new_hi -= inside & (plane > high_edge)
    keep_old = (sigma <= 0) | (new_hi <= new_lo)
    return np.where(keep_old, lo, new_lo), np.where(keep_old, hi, new_hi)


def _clip_runs(
    sorted_values: npt.NDArray[np.float32],
    lo: npt.NDArray[np.intp],
    hi: npt.NDArray[np.intp],
    clip_sigma: float,
    sigma_floor: float,
    iterations: int,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Iterate the clipping of (n, m) sorted values; only pixels still changing are revisited."""
    lo, hi = lo.copy(), hi.copy()
    active = np.arange(lo.size)
    for _ in range(iterations):
        if active.size == 0:
            break
        values = sorted_values[:, active]
        centre, sigma = _run_centre_sigma(values, lo[active], hi[active])
        sigma = np.maximum(sigma, sigma_floor)
        new_lo, new_hi = _clip_step(values, lo[active], hi[active], centre, sigma, clip_sigma)
        changed = (new_lo != lo[active]) | (new_hi != hi[active])
        lo[active], hi[active] = new_lo, new_hi
        active = active[changed]
    return lo, hi


def _run_statistics(
    sorted_values: npt.NDArray[np.float32], lo: npt.NDArray[np.intp], hi: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Median and sample variance (ddof 1; NaN for fewer than 2 values) of the runs [lo, hi)."""
    count = hi - lo
    centre = 0.5 * (_gather(sorted_values, lo + (count - 1) // 2) + _gather(sorted_values, lo + count // 2))
    total = np.zeros(lo.shape, dtype=np.float64)
    total_sq = np.zeros(lo.shape, dtype=np.float64)
    for i in range(sorted_values.shape[0]):
        inside = (lo <= i) & (i < hi)
        deviation = np.where(inside, sorted_values[i] - centre, 0.0)
        total += deviation
        total_sq += deviation * deviation
    with np.errstate(invalid="ignore", divide="ignore"):
        sample_variance = (total_sq - total * total / count) / (count - 1)
    return centre, np.where(count >= 2, np.maximum(sample_variance, 0.0), np.nan)


def chi2_median_ratio(dof: int) -> float:
    """Median of chi2(dof) / dof (Wilson-Hilferty approximation; 1 - 2/(9 dof) cubed)."""
    return (1.0 - 2.0 / (9.0 * dof)) ** 3


def clipped_median(stack: npt.NDArray[np.floating], *, clip_sigma: float, max_iterations: int = 10) -> ClippedMedian:
    """Sigma-clipped median of ``stack`` (n_frames, rows, columns) along the frames, as defined above.

    ``stack`` is not modified. Non-finite values count as missing. The first pass runs on whole
    planes (every pixel with n finite values has the same order-statistic positions); only the
    pixels it changes, and those with missing values, go through the general per-pixel path.
    """
    if stack.ndim != 3 or stack.shape[0] < 1:
        raise ValueError(f"stack of shape {stack.shape}: expected (n_frames >= 1, rows, columns)")
    if not clip_sigma > 0:
        raise ValueError(f"clip_sigma = {clip_sigma}: expected > 0")
    if max_iterations < 1:
        raise ValueError(f"max_iterations = {max_iterations}: expected >= 1")
    with np.errstate(invalid="ignore"):  # +inf stands for missing values: inf - inf is expected
        return _clipped_median(stack, clip_sigma, max_iterations)


def _clipped_median(stack: npt.NDArray[np.floating], clip_sigma: float, max_iterations: int) -> ClippedMedian:
    n, rows, columns = stack.shape
    pixels = rows * columns
    values = sort_frames(stack).reshape(n, pixels)
    if np.isfinite(values[n - 1]).all():  # non-finite values sort last: all pixels complete
        n_finite = None
        complete = None
    else:
        n_finite = np.zeros(pixels, dtype=np.intp)
        for i in range(n):
            n_finite += np.isfinite(values[i])
        complete = n_finite == n

    # Plane statistics of all n values (two passes, float32 deviations): the sample variance of
    # every complete pixel, hence the sigma floor.
    mean = values.sum(axis=0, dtype=np.float32)
    mean /= np.float32(n)
    sample_variance = np.zeros(pixels, dtype=np.float32)
    deviation = np.empty(pixels, dtype=np.float32)
    for i in range(n):
        np.subtract(values[i], mean, out=deviation)
        deviation *= deviation
        sample_variance += deviation
    if n >= 2:
        sample_variance /= np.float32(n - 1)
        usable = sample_variance if complete is None else sample_variance[complete]
        usable = usable[:: max(1, usable.size // FLOOR_SAMPLE)]
        typical = float(np.median(usable)) if usable.size else 0.0
        sigma_floor = math.sqrt(typical / chi2_median_ratio(n - 1)) if math.isfinite(typical) else 0.0
    else:
        sample_variance[:] = np.nan
        sigma_floor = 0.0

    # First clipping pass, all pixels at once, as if every pixel had n values (float32 planes:
    # fast, and exact enough for a clipping decision).
    centre = values[(n - 1) // 2] + values[n // 2]
    centre *= np.float32(0.5)
    quartiles = []
    for q in (0.25, 0.75):
        position = q * (n - 1)
        below = int(math.floor(position))
        above = min(below + 1, n - 1)
        quartile = values[above] - values[below]
        quartile *= np.float32(position - below)
        quartile += values[below]
        quartiles.append(quartile)
    half_width = quartiles[1]
    half_width -= quartiles[0]
    half_width *= np.float32(1.0 / IQR_TO_SIGMA)
    np.maximum(half_width, np.float32(sigma_floor), out=half_width)
    half_width *= np.float32(clip_sigma)
    clipping = half_width > 0  # sigma 0: keep all
    low_edge = centre - half_width
    high_edge = np.add(centre, half_width, out=half_width)
    n_low = np.zeros(pixels, dtype=np.int8)
    n_high = np.zeros(pixels, dtype=np.int8)
    flag = np.empty(pixels, dtype=bool)
    for i in range(n):
        n_low += np.less(values[i], low_edge, out=flag)
        n_high += np.greater(values[i], high_edge, out=flag)
    changed = (n_low != 0) | (n_high != 0)
    changed &= clipping
    changed &= (n_low.astype(np.intp) + n_high) < n  # a pass that would keep nothing keeps all
    del low_edge, high_edge, quartiles, deviation, mean

    median = centre
    n_used = np.full(pixels, n, dtype=np.int16)
    moved = np.flatnonzero(changed if complete is None else changed & complete)
    subsets = [(moved, n_low[moved].astype(np.intp), n - n_high[moved].astype(np.intp), max_iterations - 1)]
    if complete is not None and n_finite is not None:
        partial = np.flatnonzero(~complete)
        subsets.append((partial, np.zeros(partial.size, dtype=np.intp), n_finite[partial], max_iterations))
    factor = median_variance_factor(n).item() / n
    variance = sample_variance * np.float32(factor)
    for subset, start_lo, start_hi, iterations in subsets:
        if subset.size == 0:
            continue
        sub_values = values[:, subset]
        has_value = start_hi > start_lo
        sub_lo, sub_hi = _clip_runs(sub_values, start_lo, np.maximum(start_hi, 1), clip_sigma, sigma_floor, iterations)
        sub_centre, sub_variance = _run_statistics(sub_values, sub_lo, sub_hi)
        count = np.where(has_value, sub_hi - sub_lo, 0)
        median[subset] = np.where(has_value, sub_centre, np.nan)
        sample_variance[subset] = np.where(has_value, sub_variance, np.nan)
        variance[subset] = np.where(has_value, median_variance_factor(count) * sub_variance / np.maximum(count, 1), np.nan)
        n_used[subset] = count
    shape = (rows, columns)
    return ClippedMedian(
        median=median.reshape(shape),
        variance=variance.reshape(shape),
        sample_variance=sample_variance.reshape(shape),
        n_used=n_used.reshape(shape),
    )


def combine_in_row_blocks(
    read_rows: Callable[[int, int], npt.NDArray[np.floating]],
    shape: tuple[int, int],
    *,
    clip_sigma: float,
    block_rows: int = 128,
) -> ClippedMedian:
    """Clipped median of frames too large to stack whole: ``read_rows(start, stop)`` returns the
    (n_frames, stop - start, columns) block of rows [start, stop); memory is one block plus the outputs."""
    rows, columns = shape
    median = np.empty(shape, dtype=np.float32)
    variance = np.empty(shape, dtype=np.float32)
    sample_variance = np.empty(shape, dtype=np.float32)
    n_used = np.empty(shape, dtype=np.int16)
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        block = read_rows(start, stop)
        if block.ndim != 3 or block.shape[1:] != (stop - start, columns):
            raise ValueError(f"rows [{start}, {stop}): block of shape {block.shape}, expected (n, {stop - start}, {columns})")
        result = clipped_median(block, clip_sigma=clip_sigma)
        median[start:stop] = result.median
        variance[start:stop] = result.variance
        sample_variance[start:stop] = result.sample_variance
        n_used[start:stop] = result.n_used
    return ClippedMedian(median, variance, sample_variance, n_used)
