"""Our mask bits: hot and noisy pixels from a bias stack, dead and odd-responsivity pixels from a flat."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.detrend import masks
from streamer.detrend.combine import clipped_median


def test_bits_share_ipac_meanings_and_fit_int16() -> None:
    assert (masks.LOW_RESPONSIVITY, masks.HIGH_RESPONSIVITY, masks.NOISY) == (4, 8, 16)
    assert (masks.SATURATED, masks.DEAD, masks.NAN) == (256, 512, 1024)
    assert masks.REJECT_OWN < 2**15
    assert masks.describe(masks.HOT | masks.DEAD) == ["DEAD", "HOT"]


def test_hot_and_noisy_pixels_from_a_bias_stack() -> None:
    rng = np.random.default_rng(42)
    n, rows, columns = 8, 300, 300
    structure = rng.normal(0.0, 0.5, (rows, columns))
    stack = structure + rng.normal(0.0, 1.5, (n, rows, columns))
    hot = (rng.integers(0, rows, 40), rng.integers(0, columns, 40))
    stack[:, hot[0], hot[1]] += 30.0
    noisy = (rng.integers(0, rows, 40), rng.integers(0, columns, 40))
    stack[:, noisy[0], noisy[1]] += rng.normal(0.0, 12.0, (n, 40))
    combined = clipped_median(stack.astype(np.float32), clip_sigma=3.0)
    mask = masks.flag_bias_pixels(combined.median, combined.sample_variance, combined.n_used)
    assert np.mean(mask[hot] & masks.HOT > 0) >= 0.95
    assert np.mean(mask[noisy] & masks.NOISY > 0) >= 0.95
    good = np.ones((rows, columns), bool)
    good[hot] = good[noisy] = False
    assert np.mean(mask[good] != 0) < 1e-3


def test_dead_low_and_high_pixels_from_a_flat_with_a_gradient() -> None:
    rng = np.random.default_rng(43)
    rows, columns = 256, 320
    y, x = np.mgrid[0:rows, 0:columns]
    flat = (1.0 - 0.15 * (x / columns) + 0.1 * (y / rows)) * rng.normal(1.0, 0.01, (rows, columns))
    flat[:, 77] *= 0.05
    flat[10, 10] *= 0.7
    flat[20, 20] *= 1.3
    flat[30, 30] = np.nan
    mask = masks.flag_flat_pixels(flat.astype(np.float32))
    assert np.all(mask[:, 77] & masks.DEAD) and not np.any(mask[:, 77] & masks.LOW_RESPONSIVITY)
    assert mask[10, 10] == masks.LOW_RESPONSIVITY
    assert mask[20, 20] == masks.HIGH_RESPONSIVITY
    assert mask[30, 30] == masks.NO_CALIBRATION
    good = np.ones((rows, columns), bool)
    good[:, 77] = False
    good[10, 10] = good[20, 20] = good[30, 30] = False
    assert np.mean(mask[good] != 0) < 1e-3


def test_science_saturation_and_nan() -> None:
    raw = np.array([[100, 65535], [200, 300]], dtype=np.uint16)
    image = np.array([[1.0, 2.0], [np.nan, 5e4]], dtype=np.float32)
    mask = masks.flag_science_pixels(raw, image, saturate=4e4)
    assert mask.tolist() == [[0, masks.SATURATED], [masks.NAN, masks.SATURATED]]


def test_local_median_is_the_tile_median() -> None:
    image = np.random.default_rng(5).normal(size=(16, 12)).astype(np.float32)
    background = masks.local_median(image, box=4)
    assert background[0, 0] == pytest.approx(np.median(image[:4, :4]))
    assert background[15, 11] == pytest.approx(np.median(image[12:, 8:]))
    # partial tiles are completed by reflection
    partial = masks.local_median(image, box=8)
    reflected = np.pad(image, ((0, 0), (0, 4)), mode="reflect")
    assert partial[15, 11] == pytest.approx(np.median(reflected[8:, 8:]))
    with_nan = image.copy()
    with_nan[0, 0] = np.nan
    assert masks.local_median(with_nan, box=8)[15, 11] == pytest.approx(np.median(image[8:, 8:]))
