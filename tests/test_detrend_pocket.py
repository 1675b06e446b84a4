"""The pocket effect (streamer.detrend.pocket): forward model, correction, parameter table.

References are independent of the compiled code: the numpy reference of the model, analytic facts
(conservation, the equilibrium fill), and the published parameters as printed in ztfsensors'
pocket_corrections.yaml.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from streamer.detrend import pocket
from streamer.detrend.calibrate import apply_row_corrections
from streamer.detrend.readout import OVERSCAN_COLUMNS

NIGHT = dt.date(2020, 9, 24)
# CCD 6 has the largest pockets; qid 1 the largest capacity of all (cmax 1756.6 ADU)
CCD6_Q1 = pocket.Parameters(alpha=1.7404234164730332, cmax=1756.6362355072963, beta=0.39522681607414284, nmax=251018.5557551465)
DATA_COLUMNS = 3072


def star_rows(rng: np.random.Generator, rows: int, sky: float, columns: int = DATA_COLUMNS) -> np.ndarray:
    """True rows in readout order: Poisson sky, 5 Gaussian stars of 10^3 to 10^5.5 ADU each, empty overscan."""
    x = np.arange(columns)
    true = np.zeros((rows, columns + OVERSCAN_COLUMNS))
    for i in range(rows):
        true[i, :columns] = rng.poisson(sky, columns)
        for centre, flux in zip(rng.uniform(0, columns, 5), 10 ** rng.uniform(3, 5.5, 5), strict=True):
            true[i, :columns] += flux / (np.sqrt(2 * np.pi) * 2.0) * np.exp(-0.5 * ((x - centre) / 2.0) ** 2)
    return true


def test_ccd6_parameters_come_from_the_shipped_table() -> None:
    assert pocket.pocket_parameters("v0.1", 6, 1, NIGHT) == CCD6_Q1
    strongest = max((pocket.pocket_parameters("v0.1", 6, q, NIGHT) for q in (1, 2, 3, 4)), key=lambda p: p.cmax)  # type: ignore[union-attr]
    assert strongest == CCD6_Q1
    # the published capacities span about 390 to 1760 ADU
    capacities = [pocket.pocket_parameters("v0.1", c, q, NIGHT).cmax for c in range(1, 17) for q in (1, 2, 3, 4)]  # type: ignore[union-attr]
    assert 380 < min(capacities) < 400 and 1750 < max(capacities) < 1760


def test_periods_of_the_readout_electronics() -> None:
    assert pocket.period_of(dt.date(2018, 2, 28)) is None
    assert pocket.period_of(dt.date(2018, 6, 25)) == 0
    assert pocket.period_of(dt.date(2018, 6, 26)) == 1
    assert pocket.period_of(dt.date(2019, 10, 21)) == 1
    assert pocket.period_of(dt.date(2019, 10, 22)) == 2
    assert pocket.period_of(dt.date(2020, 4, 29)) == 3
    assert pocket.period_of(dt.date(2022, 10, 3)) == 3
    assert pocket.period_of(dt.date(2022, 10, 4)) == 4
    assert pocket.pocket_parameters("v0.1", 6, 1, dt.date(2018, 2, 1)) is None
    for night in (dt.date(2018, 3, 1), dt.date(2019, 1, 1), dt.date(2020, 1, 1), dt.date(2021, 1, 1), dt.date(2025, 1, 1)):
        assert all(pocket.pocket_parameters("v0.1", c, q, night) is not None for c in range(1, 17) for q in (1, 2, 3, 4))
    with pytest.raises(ValueError, match="pocket model"):
        pocket.pocket_parameters("v9", 6, 1, NIGHT)


def test_forward_then_correction_returns_the_true_rows() -> None:
    rng = np.random.default_rng(20200924)
    true = star_rows(rng, 40, sky=150.0)  # a dark zr sky in 30 s
    observed, _ = pocket.forward_reference(true, CCD6_Q1)
    assert np.sqrt(np.mean((observed - true) ** 2)) > 3.0  # the effect is there to be corrected
    corrected = pocket.correct(observed, CCD6_Q1)
    residual = (corrected - true)[:, :DATA_COLUMNS]
    assert np.sqrt(np.mean(residual**2)) < 0.01
    # the overscan (true charge 0) carries the trail observed and comes back at its true level
    assert np.median(observed[:, DATA_COLUMNS : DATA_COLUMNS + 5]) > 10.0
    assert np.abs(corrected[:, DATA_COLUMNS:]).max() < 0.01


def test_charge_is_conserved_by_the_forward_model() -> None:
    rng = np.random.default_rng(11)
    true = star_rows(rng, 8, sky=150.0)
    true[0, 100:110] = -3.0  # negative noise values: the register captures nothing from them
    observed, held = pocket.forward_reference(true, CCD6_Q1)
    assert np.all(held > 0)
    np.testing.assert_allclose(observed.sum(axis=1) + held, true.sum(axis=1), rtol=1e-12)


@pytest.mark.parametrize("level", [100.0, 500.0, 5000.0])
def test_a_constant_row_settles_at_the_analytic_equilibrium(level: float) -> None:
    p = CCD6_Q1
    # release = capture: cmax x^alpha = cmax (1 - x)^alpha (n / nmax)^beta  =>  x / (1 - x) = (n / nmax)^(beta / alpha)
    s = (level / p.nmax) ** (p.beta / p.alpha)
    fill = p.cmax * s / (1.0 + s)
    assert p.cmax * (fill / p.cmax) ** p.alpha < level  # the capture is not clipped at these levels
    _, held = pocket.forward_reference(np.full((1, 3000), level), p)
    assert held[0] == pytest.approx(fill, rel=1e-9)
    observed = pocket.forward(np.full((1, 3000), level), p)
    np.testing.assert_allclose(observed[0, -100:], level, rtol=1e-6)  # in equilibrium the row reads true


def test_a_faint_constant_row_fills_the_pocket_until_the_release_is_the_pixel() -> None:
    p = CCD6_Q1
    level = 20.0  # below the capture's saturation: each pixel is taken whole, so r = n at equilibrium
    _, held = pocket.forward_reference(np.full((1, 3000), level), p)
    assert held[0] == pytest.approx(p.cmax * (level / p.cmax) ** (1.0 / p.alpha), rel=1e-9)


def test_compiled_kernels_equal_the_reference() -> None:
    rng = np.random.default_rng(5)
    true = star_rows(rng, 12, sky=80.0)
    true += rng.normal(0.0, 1.6, true.shape)  # read noise, negative values included
    true = true.astype(np.float32).astype(np.float64)
    reference, _ = pocket.forward_reference(true, CCD6_Q1)
    compiled = pocket.forward(true, CCD6_Q1)
    np.testing.assert_allclose(compiled, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())
    observed = reference.astype(np.float32).astype(np.float64)
    corrected_reference = pocket.correct_reference(observed, CCD6_Q1)
    corrected = pocket.correct(observed, CCD6_Q1)
    np.testing.assert_allclose(corrected, corrected_reference, rtol=1e-6, atol=1e-6 * np.abs(corrected_reference).max())
    assert corrected.dtype == np.float32 and compiled.dtype == np.float32


def test_table_indices_stay_in_the_tables_far_from_the_fitted_parameters() -> None:
    """No fitted amplifier has a pocket of 1700 ADU with nmax 900 ADU: there the correction
    runs off its tables. Before the indices were clamped, such a quadrant read outside them
    (a segmentation fault, or NaN); now every value stays finite."""
    rng = np.random.default_rng(11)
    true = rng.normal(150.0, 12.0, (3080, DATA_COLUMNS + OVERSCAN_COLUMNS)).astype(np.float32)
    for row in range(0, true.shape[0], 3):
        true[row, rng.integers(0, 3000, 5)] += rng.uniform(1e3, 6e4, 5).astype(np.float32)
    p = pocket.Parameters(alpha=0.6, cmax=1700.0, beta=0.4, nmax=900.0)
    assert np.isfinite(pocket.correct(pocket.forward(true, p), p)).all()


def test_values_far_outside_the_tables_stay_in_their_own_row() -> None:
    """A row of NaN, infinities and 1e30 ADU (a corrupt frame) drives the table indices as far as
    they go, in both directions: the kernel stays inside its tables, and the other rows of its
    block come back as they would alone."""
    rng = np.random.default_rng(17)
    rows = star_rows(rng, 5, sky=120.0).astype(np.float32)
    extreme = rows.copy()
    extreme[2, ::4] = np.nan
    extreme[2, 1::4] = np.inf
    extreme[2, 2::4] = -1e30
    extreme[2, 3::4] = 1e30
    corrected = pocket.correct(extreme, CCD6_Q1)
    alone = pocket.correct(rows[[0, 1, 3, 4]], CCD6_Q1)
    np.testing.assert_array_equal(corrected[[0, 1, 3, 4]], alone)


def test_the_pocket_does_not_carry_across_rows() -> None:
    rng = np.random.default_rng(3)
    second = star_rows(rng, 1, sky=100.0)[0]
    bright = np.full(DATA_COLUMNS + OVERSCAN_COLUMNS, 0.0)
    bright[: DATA_COLUMNS - 5] = 40000.0  # the pocket is full at the end of the first row's data
    rows = np.stack([bright, second])
    observed = pocket.forward(rows, CCD6_Q1)
    np.testing.assert_array_equal(observed[1], pocket.forward(second[np.newaxis], CCD6_Q1)[0])
    assert observed[0, DATA_COLUMNS] > 10.0  # the first row's overscan does carry its trail
    corrected = pocket.correct(observed, CCD6_Q1)
    np.testing.assert_array_equal(corrected[1], pocket.correct(observed[1:], CCD6_Q1)[0])


def test_noise_around_zero_is_left_as_it_is() -> None:
    rng = np.random.default_rng(8)
    noise = rng.normal(0.0, 1.6, (50, DATA_COLUMNS + OVERSCAN_COLUMNS))
    noise[:, DATA_COLUMNS:] = 0.0
    corrected = pocket.correct(noise, CCD6_Q1)[:, :DATA_COLUMNS]
    assert np.all(np.isfinite(corrected))
    changed = np.abs(corrected - noise[:, :DATA_COLUMNS]) > 1e-4
    assert changed.mean() < 1e-3  # only pixels beyond the threshold (5 sigma) and the trail of their release
    negative = -np.abs(noise[:1])  # nothing is captured from negative values, nothing released
    np.testing.assert_allclose(pocket.forward(negative, CCD6_Q1), negative, rtol=1e-6)


def test_plugs_into_the_row_corrections_of_the_chain() -> None:
    rng = np.random.default_rng(13)
    true = star_rows(rng, 6, sky=120.0).astype(np.float32)
    observed = pocket.forward(true, CCD6_Q1)
    qid = 3  # rows and columns flipped between the stored grid and readout order
    stored_image = np.ascontiguousarray(observed[::-1, :DATA_COLUMNS][:, ::-1])
    stored_overscan = np.ascontiguousarray(observed[::-1, DATA_COLUMNS:][:, ::-1])
    corrected = apply_row_corrections(stored_image, stored_overscan, qid, [pocket.row_correction(CCD6_Q1)])
    expected = true[::-1, :DATA_COLUMNS][:, ::-1]
    assert np.sqrt(np.mean((corrected - expected) ** 2)) < 0.01
