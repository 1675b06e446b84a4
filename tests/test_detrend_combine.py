"""The clipped median: sorting network, agreement with a slow per-pixel reference, honest variance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamer.detrend.combine import (
    ClippedMedian,
    chi2_median_ratio,
    clipped_median,
    combine_in_row_blocks,
    median_variance_factor,
    sorting_network,
)


def reference_clipped_median(stack: np.ndarray, clip_sigma: float, max_iterations: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition of combine.py, pixel by pixel in plain Python/numpy (slow and obvious)."""
    n, rows, columns = stack.shape
    complete = np.all(np.isfinite(stack), axis=0)
    if n >= 2 and complete.any():
        variances = np.var(stack[:, complete].astype(np.float64), axis=0, ddof=1)
        variances = variances[:: max(1, variances.size // 65536)]
        sigma_floor = math.sqrt(float(np.median(variances)) / chi2_median_ratio(n - 1))
    else:
        sigma_floor = 0.0
    median = np.full((rows, columns), np.nan)
    sample_variance = np.full((rows, columns), np.nan)
    n_used = np.zeros((rows, columns), dtype=int)
    for r in range(rows):
        for c in range(columns):
            values = np.sort(stack[:, r, c][np.isfinite(stack[:, r, c])].astype(np.float64))
            if values.size == 0:
                continue
            kept = values
            for _ in range(max_iterations):
                centre = np.median(kept)
                q1, q3 = np.percentile(kept, [25, 75])
                sigma = max((q3 - q1) / 1.3489795003921634, sigma_floor)
                if sigma <= 0:
                    break
                new = kept[np.abs(kept - centre) <= clip_sigma * sigma]
                if new.size == 0 or new.size == kept.size:
                    break
                kept = new
            median[r, c] = np.median(kept)
            n_used[r, c] = kept.size
            if kept.size >= 2:
                sample_variance[r, c] = np.var(kept, ddof=1)
    return median, sample_variance, n_used


def apply_network(values: np.ndarray) -> np.ndarray:
    """The compare-exchange pairs of ``sorting_network`` applied in plain numpy, frame axis first."""
    result = values.copy()
    for i, j in sorting_network(values.shape[0]):
        low = np.minimum(result[i], result[j])
        result[j] = np.maximum(result[i], result[j])
        result[i] = low
    return result


@pytest.mark.parametrize("n", range(1, 33))
def test_sorting_network_sorts_like_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.normal(size=(n, 9, 11)).astype(np.float32)
    values[:, 0, 0] = 5.0  # ties
    assert np.array_equal(apply_network(values), np.sort(values, axis=0))
    assert all(i < j < n for i, j in sorting_network(n))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 33])
def test_missing_values_are_left_out_and_the_input_left_alone(n: int) -> None:
    rng = np.random.default_rng(200 + n)
    stack = rng.normal(1000.0, 5.0, size=(n, 3, 300)).astype(np.float32)  # more than one chunk per row
    stack[0, 0, :] = np.nan
    stack[n - 1, 1, ::3] = np.inf
    stack[:, 2, 7] = -np.inf
    before = stack.copy()
    result = clipped_median(stack, clip_sigma=3.0)
    np.testing.assert_array_equal(stack, before)
    median, sample_variance, n_used = reference_clipped_median(stack, 3.0)
    np.testing.assert_array_equal(result.n_used, n_used)
    np.testing.assert_allclose(result.median, median, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(result.sample_variance, sample_variance, rtol=1e-5, equal_nan=True)
    assert result.n_used[2, 7] == 0 and np.isnan(result.median[2, 7]) and np.isnan(result.variance[2, 7])


@pytest.mark.parametrize("n", [2, 3, 5, 7, 10, 16])
def test_agrees_with_slow_reference(n: int) -> None:
    rng = np.random.default_rng(100 + n)
    stack = rng.normal(1000.0, 5.0, size=(n, 12, 15)).astype(np.float32)
    # cosmic rays, a cold value, missing frames, a pixel with no value, a noisy pixel
    stack[0, 1, 1] += 400.0
    stack[n - 1, 2, 3] -= 300.0
    stack[0, 4, 4] = np.nan
    stack[:, 5, 5] = np.nan
    stack[:, 6, 6] *= np.float32(1.0)
    stack[:, 7, 7] = rng.normal(1000.0, 60.0, n).astype(np.float32)
    if n >= 5:
        stack[:2, 3, 3] += 500.0
    before = stack.copy()
    result = clipped_median(stack, clip_sigma=3.0)
    median, sample_variance, n_used = reference_clipped_median(stack, 3.0)
    np.testing.assert_array_equal(stack, before)
    np.testing.assert_array_equal(result.n_used, n_used)
    np.testing.assert_allclose(result.median, median, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(result.sample_variance, sample_variance, rtol=1e-5, equal_nan=True)
    assert np.isnan(result.median[5, 5]) and result.n_used[5, 5] == 0


def test_identical_values_are_all_kept() -> None:
    stack = np.full((6, 4, 5), 1000.0, dtype=np.float32)
    stack[0, 0, 0] = 1001.0  # IQR 0 and a floor of 0: sigma 0 keeps every value
    result = clipped_median(stack, clip_sigma=3.0)
    assert np.all(result.n_used == 6)
    assert np.all(result.median == 1000.0) and np.all(result.variance[1:] == 0.0)
    median, _, n_used = reference_clipped_median(stack, 3.0)
    np.testing.assert_array_equal(result.n_used, n_used)


def test_outliers_are_rejected_with_seven_frames() -> None:
    # a plain standard deviation could not reject one outlier among 7 values at 3 sigma
    rng = np.random.default_rng(7)
    stack = rng.normal(0.0, 1.0, size=(7, 40, 40)).astype(np.float32)
    stack[3, 10:20, 10:20] += 50.0
    result = clipped_median(stack, clip_sigma=3.0)
    assert np.all(result.n_used[10:20, 10:20] <= 6)
    assert abs(float(np.mean(result.median[10:20, 10:20]))) < 0.2


@pytest.mark.parametrize("n", [5, 7, 10])
def test_variance_of_the_median_is_honest(n: int) -> None:
    rng = np.random.default_rng(1000 + n)
    sigma = 3.0
    stack = rng.normal(50.0, sigma, size=(n, 200, 200)).astype(np.float32)
    result = clipped_median(stack, clip_sigma=3.0)
    true_variance = float(np.var(result.median - 50.0))
    predicted = float(np.mean(result.variance))
    assert predicted == pytest.approx(true_variance, rel=0.08)
    # clipping pure noise rejects little (the IQR alone would reject in a fifth of the pixels)
    assert np.mean(result.n_used < n) < 0.05


def test_median_variance_factor_limits() -> None:
    assert median_variance_factor([1, 2])[0] == 1.0
    assert median_variance_factor(1000) == pytest.approx(math.pi / 2)


def test_row_blocks_are_the_blocks_combined() -> None:
    rng = np.random.default_rng(3)
    stack = rng.normal(0.0, 1.0, size=(5, 50, 20)).astype(np.float32)
    combined = combine_in_row_blocks(lambda a, b: stack[:, a:b], (50, 20), clip_sigma=3.0, block_rows=16)
    for start in range(0, 50, 16):
        block = clipped_median(stack[:, start : start + 16], clip_sigma=3.0)
        np.testing.assert_array_equal(combined.median[start : start + 16], block.median)
        np.testing.assert_array_equal(combined.n_used[start : start + 16], block.n_used)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_frames"):
        clipped_median(np.zeros((3, 4)), clip_sigma=3.0)
    with pytest.raises(ValueError, match="clip_sigma"):
        clipped_median(np.zeros((3, 4, 4)), clip_sigma=0.0)
    wrong = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="out"):
        clipped_median(np.zeros((3, 4, 4), np.float32), clip_sigma=3.0, out=ClippedMedian(wrong, wrong, wrong, wrong.astype(np.int16)))
    with pytest.raises(ValueError, match="block"):
        combine_in_row_blocks(lambda a, b: np.zeros((2, 1, 3)), (4, 3), clip_sigma=3.0, block_rows=2)
