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

Speed: compiled (numba), single-threaded, in chunks of :data:`CHUNK` pixels whose values for all
frames stay in the L1 cache. A first pass computes each pixel's sample variance (hence the floor);
the second sorts each chunk along the frames with a sorting network of element-wise minimum /
maximum (Batcher's odd-even merge sort, pruned to n), vectorised across the chunk's pixels, so the
kept values of a pixel are always a contiguous run [lo, hi) of its sorted values. The first
clipping pass runs vectorised on every pixel as if it had n values; only the pixels it changes and
those with missing values go through the scalar per-pixel iteration. Work on row blocks (see
:func:`combine_in_row_blocks`) to bound memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numba
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


@dataclass(frozen=True)
class ClippedMedian:
    """The combination of one block: every array has the shape of one frame (rows, columns)."""

    median: npt.NDArray[np.float32]  # input units; NaN where no frame had a finite value
    variance: npt.NDArray[np.float32]  # of the median, input units squared; NaN where k < 2
    sample_variance: npt.NDArray[np.float32]  # of the kept values (ddof 1); NaN where k < 2
    n_used: npt.NDArray[np.int16]  # frames kept after clipping


CHUNK = 256  # pixels sorted together: n frames x 256 float32 stay in the L1 cache

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
_inline = numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
# numba wraps negative indices unless it can tell an index is unsigned, and that check stops
# vectorisation: the loops across a chunk's pixels index with np.uint64.


@_jit
def _plane_variances(values: Any, variance: Any) -> None:
    """Sample variance (ddof 1, float64) of the n values of each pixel of (n, m) ``values``; NaN
    where a value is not finite or n < 2."""
    n, m = values.shape
    total = np.zeros(CHUNK)
    squares = np.zeros(CHUNK)
    for start in range(0, m, CHUNK):
        width = np.uint64(min(CHUNK, m - start))
        offset = np.uint64(start)
        total[:] = 0.0
        squares[:] = 0.0
        for i in range(n):
            row = values[i]
            for q in range(width):
                total[q] += row[offset + q]
        for q in range(width):
            total[q] /= n
        for i in range(n):
            row = values[i]
            for q in range(width):
                deviation = row[offset + q] - total[q]
                squares[q] += deviation * deviation
        for q in range(width):
            variance[offset + q] = squares[q] / (n - 1) if n >= 2 else np.nan


@_inline
def _lerp(a: float, b: float, t: float) -> float:
    """numpy's linear interpolation from a to b (the form it takes for t >= 0.5 rounds differently)."""
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


@_jit
def _quantile(sorted_values: Any, column: int, lo: int, count: int, q: float) -> float:
    """numpy's linear quantile q of the run [lo, lo + count) of one column of sorted values."""
    position = q * (count - 1)
    below = int(math.floor(position))
    above = min(below + 1, count - 1)
    return _lerp(np.float64(sorted_values[lo + below, column]), np.float64(sorted_values[lo + above, column]), position - below)


@_jit
def _run_median(sorted_values: Any, column: int, lo: int, count: int) -> float:
    a = np.float64(sorted_values[lo + (count - 1) // 2, column])
    b = np.float64(sorted_values[lo + count // 2, column])
    return float(0.5 * (a + b))


@_jit
def _clip_run(
    sorted_values: Any, column: int, lo: int, hi: int, iterations: int, sigma_floor: float, clip_sigma: float
) -> tuple[int, int]:
    """The definition's iteration on the run [lo, hi) of one column of sorted values."""
    for _ in range(iterations):
        count = hi - lo
        centre = _run_median(sorted_values, column, lo, count)
        spread = _quantile(sorted_values, column, lo, count, 0.75) - _quantile(sorted_values, column, lo, count, 0.25)
        sigma = max(spread / IQR_TO_SIGMA, sigma_floor)
        if not sigma > 0.0:
            break
        half_width = clip_sigma * sigma
        new_lo, new_hi = lo, hi
        while new_lo < new_hi and centre - sorted_values[new_lo, column] > half_width:
            new_lo += 1
        while new_hi > new_lo and sorted_values[new_hi - 1, column] - centre > half_width:
            new_hi -= 1
        if new_hi == new_lo or new_hi - new_lo == count:
            break
        lo, hi = new_lo, new_hi
    return lo, hi


@_jit
def _combine(
    values: Any,
    plane_variance: Any,
    pairs: Any,
    factors: Any,
    sigma_floor: float,
    clip_sigma: float,
    max_iterations: int,
    median: Any,
    variance: Any,
    sample_variance: Any,
    n_used: Any,
) -> None:
    """Clipped median of each pixel of (n, m) ``values`` into the (m,) outputs."""
    n, m = values.shape
    inf = np.float32(np.inf)
    block = np.empty((n, CHUNK), dtype=np.float32)
    centre = np.empty(CHUNK)
    half_width = np.empty(CHUNK)
    n_low = np.zeros(CHUNK, dtype=np.int64)
    n_high = np.zeros(CHUNK, dtype=np.int64)
    lower_position = 0.25 * (n - 1)
    upper_position = 0.75 * (n - 1)
    lower_below = int(math.floor(lower_position))
    upper_below = int(math.floor(upper_position))
    lower_t = lower_position - lower_below
    upper_t = upper_position - upper_below
    factor_n = factors[min(n, factors.size) - 1] / n
    for start in range(0, m, CHUNK):
        width = np.uint64(min(CHUNK, m - start))
        offset = np.uint64(start)
        for i in range(n):
            row = values[i]
            sorted_row = block[i]
            for q in range(width):
                value = row[offset + q]
                sorted_row[q] = value if np.isfinite(value) else inf
        for k in range(pairs.shape[0]):
            first = block[pairs[k, 0]]
            second = block[pairs[k, 1]]
            for q in range(width):
                x, y = first[q], second[q]
                first[q] = x if x < y else y
                second[q] = y if x < y else x
        # the first clipping pass, as if every pixel had n finite values (vectorised)
        middle_low, middle_high = block[(n - 1) // 2], block[n // 2]
        lower_a, lower_b = block[lower_below], block[min(lower_below + 1, n - 1)]
        upper_a, upper_b = block[upper_below], block[min(upper_below + 1, n - 1)]
        for q in range(width):
            centre[q] = 0.5 * (np.float64(middle_low[q]) + middle_high[q])
            low_quartile = _lerp(np.float64(lower_a[q]), np.float64(lower_b[q]), lower_t)
            high_quartile = _lerp(np.float64(upper_a[q]), np.float64(upper_b[q]), upper_t)
            half_width[q] = clip_sigma * max((high_quartile - low_quartile) / IQR_TO_SIGMA, sigma_floor)
            n_low[q] = 0
            n_high[q] = 0
        for i in range(n):
            sorted_row = block[i]
            for q in range(width):
                n_low[q] += centre[q] - sorted_row[q] > half_width[q]
                n_high[q] += sorted_row[q] - centre[q] > half_width[q]
        for q in range(width):
            p = offset + q
            complete = np.isfinite(plane_variance[p])
            rejected = n_low[q] + n_high[q]
            if complete and (rejected == 0 or rejected == n or not half_width[q] > 0.0):
                median[p] = centre[q]
                sample_variance[p] = plane_variance[p]
                variance[p] = plane_variance[p] * factor_n
                n_used[p] = n
                continue
            column = int(q)
            if complete:
                lo, hi = _clip_run(block, column, n_low[q], n - n_high[q], max_iterations - 1, sigma_floor, clip_sigma)
            else:
                finite = 0
                while finite < n and block[finite, column] < inf:
                    finite += 1
                if finite == 0:
                    median[p] = np.nan
                    sample_variance[p] = np.nan
                    variance[p] = np.nan
                    n_used[p] = 0
                    continue
                lo, hi = _clip_run(block, column, 0, finite, max_iterations, sigma_floor, clip_sigma)
            count = hi - lo
            middle = _run_median(block, column, lo, count)
            squares = 0.0
            total = 0.0
            for i in range(lo, hi):
                deviation = block[i, column] - middle
                total += deviation
                squares += deviation * deviation
            run_variance = max((squares - total * total / count) / (count - 1), 0.0) if count >= 2 else np.nan
            median[p] = middle
            sample_variance[p] = run_variance
            variance[p] = factors[min(count, factors.size) - 1] * run_variance / count
            n_used[p] = count


def chi2_median_ratio(dof: int) -> float:
    """Median of chi2(dof) / dof (Wilson-Hilferty approximation; 1 - 2/(9 dof) cubed)."""
    return (1.0 - 2.0 / (9.0 * dof)) ** 3


def clipped_median(
    stack: npt.NDArray[np.floating], *, clip_sigma: float, max_iterations: int = 10, out: ClippedMedian | None = None
) -> ClippedMedian:
    """Sigma-clipped median of ``stack`` (n_frames, rows, columns) along the frames, as defined
    above. ``stack`` is not modified; it is combined as float32. Non-finite values count as missing.
    ``out``: C-contiguous (rows, columns) arrays to write the result into (returned)."""
    if stack.ndim != 3 or stack.shape[0] < 1:
        raise ValueError(f"stack of shape {stack.shape}: expected (n_frames >= 1, rows, columns)")
    if not clip_sigma > 0:
        raise ValueError(f"clip_sigma = {clip_sigma}: expected > 0")
    if max_iterations < 1:
        raise ValueError(f"max_iterations = {max_iterations}: expected >= 1")
    n, rows, columns = stack.shape
    values = np.ascontiguousarray(stack, dtype=np.float32).reshape(n, rows * columns)
    plane_variance = np.empty(rows * columns)
    with np.errstate(invalid="ignore"):  # inf - inf where a value is missing: such pixels are NaN
        _plane_variances(values, plane_variance)
    usable = plane_variance[np.isfinite(plane_variance)]
    usable = usable[:: max(1, usable.size // FLOOR_SAMPLE)]
    typical = float(np.median(usable)) if usable.size and n >= 2 else 0.0
    sigma_floor = math.sqrt(typical / chi2_median_ratio(n - 1)) if n >= 2 else 0.0
    shape = (rows, columns)
    if out is None:
        out = _empty_result(shape)
    outputs: tuple[npt.NDArray[Any], ...] = (out.median, out.variance, out.sample_variance, out.n_used)
    dtypes = (np.float32, np.float32, np.float32, np.int16)
    if any(a.shape != shape or a.dtype != d or not a.flags.c_contiguous for a, d in zip(outputs, dtypes, strict=True)):
        raise ValueError(f"out: expected C-contiguous arrays of shape {shape}, float32 (n_used int16)")
    factors = median_variance_factor(np.arange(1, len(_MEDIAN_VARIANCE_FACTOR) + 2))
    _combine(values, plane_variance, _network_array(n), factors, sigma_floor, float(clip_sigma), int(max_iterations),
             *(a.reshape(-1) for a in outputs))
    return out


def _empty_result(shape: tuple[int, int]) -> ClippedMedian:
    return ClippedMedian(
        np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.int16)
    )


@cache
def _network_array(n: int) -> npt.NDArray[np.int64]:
    return np.array(sorting_network(n), dtype=np.int64).reshape(-1, 2)


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
    result = _empty_result(shape)
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        block = read_rows(start, stop)
        if block.ndim != 3 or block.shape[1:] != (stop - start, columns):
            raise ValueError(f"rows [{start}, {stop}): block of shape {block.shape}, expected (n, {stop - start}, {columns})")
        rows_out = ClippedMedian(
            result.median[start:stop], result.variance[start:stop], result.sample_variance[start:stop], result.n_used[start:stop]
        )
        clipped_median(block, clip_sigma=clip_sigma, out=rows_out)
    return result
