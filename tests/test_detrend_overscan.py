"""Overscan: readout-order window, per-row medians, outlier rows, smooth model; nonlinearity inverse."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from streamer.detrend import nonlinearity
from streamer.detrend.calibrate import linearise
from streamer.detrend.overscan import fit_row_levels, model_overscan, nmad, row_medians
from streamer.detrend.readout import from_readout

ROWS = 400


def drift(rows: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, rows)
    return 1000.0 + 4.0 * t - 3.0 * t**2 + 2.5 * t**3


@pytest.mark.parametrize("qid", [1, 2, 3, 4])
def test_model_follows_drift_in_readout_order_and_ignores_trailing_charge(qid: int) -> None:
    rng = np.random.default_rng(qid)
    level_readout = drift(ROWS)
    overscan_readout = level_readout[:, np.newaxis] + rng.normal(0.0, 1.5, (ROWS, 30))
    overscan_readout[:, :5] += 500.0  # trailing charge in the first columns read
    overscan_readout[50, :] += 80.0  # an outlier row
    overscan_stored = np.rint(from_readout(overscan_readout, qid)).astype(np.uint16)
    before = overscan_stored.copy()

    model = model_overscan(overscan_stored, qid, columns=(5, 25), degree=3, outlier_nmad=3.0)

    np.testing.assert_array_equal(overscan_stored, before)
    expected_stored = from_readout(level_readout[:, np.newaxis], qid)[:, 0]
    residual = model.level_stored - expected_stored
    assert np.sqrt(np.mean(residual**2)) < 0.15  # per-row medians of 20 columns scatter 0.4 ADU
    assert model.outlier_rows_readout[50]
    assert model.outlier_rows_readout.sum() < 10


def test_window_is_taken_in_readout_columns() -> None:
    overscan_readout = np.zeros((10, 30))
    overscan_readout[:, 5:25] = 7.0
    assert np.all(row_medians(overscan_readout, (5, 25)) == 7.0)
    assert np.all(row_medians(overscan_readout, (0, 5)) == 0.0)
    with pytest.raises(ValueError, match="window"):
        row_medians(overscan_readout, (25, 5))
    with pytest.raises(ValueError, match="30"):
        row_medians(np.zeros((10, 29)), (5, 25))


def test_fit_is_a_polynomial_of_the_configured_degree() -> None:
    x = np.linspace(-1, 1, 300)
    levels = 3.0 + 2.0 * x - 1.5 * x**2
    model, outliers, coefficients, scatter = fit_row_levels(levels, degree=2, outlier_nmad=3.0)
    np.testing.assert_allclose(model, levels, atol=1e-9)
    assert len(coefficients) == 3 and not outliers.any()
    with pytest.raises(ValueError, match="too few"):
        fit_row_levels(levels[:3], degree=2, outlier_nmad=3.0)


def test_nmad_of_gaussian_is_sigma() -> None:
    values = np.random.default_rng(1).normal(0.0, 2.0, 100_000)
    assert nmad(values) == pytest.approx(2.0, rel=0.02)


def test_nonlinearity_inverse_is_exact_and_float32_path_agrees() -> None:
    a, b = nonlinearity.coefficients(dt.date(2020, 9, 24), 13, 3)
    linear = np.linspace(0.0, 60_000.0, 100_001)
    measured = nonlinearity.uncorrect(linear, a, b)
    recovered = nonlinearity.correct(measured, a, b)
    np.testing.assert_allclose(recovered, linear, rtol=1e-6, atol=1e-6 * 60_000 * 1e-3)
    fast = linearise(measured.astype(np.float32), a, b)
    reference = measured / ((a * measured + b) * measured + 1.0)
    np.testing.assert_allclose(fast, reference, rtol=1e-6, atol=1e-4)
    assert fast.dtype == np.float32


def test_nonlinearity_table_by_epoch() -> None:
    assert nonlinearity.epoch_for(dt.date(2019, 10, 22)) == "201803"
    assert nonlinearity.epoch_for(dt.date(2019, 10, 23)) == "201910"
    assert nonlinearity.epoch_for(dt.date(2020, 4, 27)) == "201910"
    assert nonlinearity.epoch_for(dt.date(2020, 4, 28)) == "202004"
