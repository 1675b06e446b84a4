"""The science chain on synthetic quadrants: inject overscan, nonlinearity, bias and flat; recover."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.config import DetrendConfig
from streamer.detrend import masks
from streamer.detrend import nonlinearity as nl
from streamer.detrend.calibrate import TRAIL_COLUMNS, MasterQuadrant, correct_raw, detrend_science
from streamer.detrend.readout import from_readout, to_readout

ROWS, COLUMNS = 200, 160
GAIN, READ_NOISE_E = 6.0, 9.0
A, B = -6.3e-12, 7.0e-8  # IPAC-like: about -0.4 % at 20000 ADU


def make_raw(qid: int, sky: float, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A stored raw quadrant (uint16) and overscan with a known flat, bias structure and row drift."""
    rng = np.random.default_rng(seed)
    flat = rng.normal(1.0, 0.01, (ROWS, COLUMNS)).astype(np.float32)
    flat[:, 40] = 0.2  # a dead column
    bias_structure = rng.normal(0.0, 0.5, (ROWS, COLUMNS)).astype(np.float32)
    signal = np.full((ROWS, COLUMNS), sky, dtype=np.float64) * flat
    signal[100, 100] = 70_000.0  # saturates
    electrons = rng.poisson(signal * GAIN)
    measured = nl.uncorrect(np.minimum(electrons / GAIN, 61_000.0), A, B)
    drift_readout = 1000.0 + 3.0 * np.linspace(-1, 1, ROWS) ** 2
    drift_stored = from_readout(drift_readout[:, np.newaxis], qid)
    read_noise = READ_NOISE_E / GAIN
    data = measured + drift_stored + bias_structure + rng.normal(0.0, read_noise, (ROWS, COLUMNS))
    overscan = drift_stored + rng.normal(0.0, read_noise, (ROWS, 30))
    data = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    overscan = np.clip(np.rint(overscan), 0, 65535).astype(np.uint16)
    return data, overscan, {"flat": flat, "bias": bias_structure, "signal": signal}


def masters(truth: dict[str, np.ndarray]) -> tuple[MasterQuadrant, MasterQuadrant]:
    shape = truth["flat"].shape
    bias = MasterQuadrant(truth["bias"], np.full(shape, 1e-4, np.float32), np.zeros(shape, np.uint16))
    flat_mask = masks.flag_flat_pixels(truth["flat"])
    flat = MasterQuadrant(truth["flat"], np.full(shape, 1e-8, np.float32), flat_mask)
    return bias, flat


@pytest.mark.parametrize("qid", [1, 2, 3, 4])
def test_science_chain_recovers_the_sky_with_honest_variance(qid: int) -> None:
    sky = 2000.0
    data, overscan, truth = make_raw(qid, sky, seed=10 + qid)
    data_before, overscan_before = data.copy(), overscan.copy()
    bias, flat = masters(truth)
    config = DetrendConfig(overscan_degree=2)
    result = detrend_science(
        data, overscan, qid, config=config, nonlinearity_coefficients=(A, B), master_bias=bias, master_flat=flat,
        gain=GAIN, read_noise=READ_NOISE_E, saturate=float(nl.correct(60_000.0 - 1000.0, A, B)),
    )
    np.testing.assert_array_equal(data, data_before)
    np.testing.assert_array_equal(overscan, overscan_before)
    good = result.mask == 0
    pull = (result.image[good] - sky) / np.sqrt(result.variance[good])
    assert abs(float(np.mean(pull))) < 0.05
    assert float(np.std(pull)) == pytest.approx(1.0, abs=0.03)
    assert result.mask[100, 100] & masks.SATURATED
    assert np.all(result.mask[:, 40] & masks.DEAD)
    assert result.image.dtype == np.float32 and result.variance.dtype == np.float32 and result.mask.dtype == np.uint16


def test_nonlinearity_order_setting() -> None:
    data, overscan, truth = make_raw(1, 20_000.0, seed=5)
    after = correct_raw(data, overscan, 1, config=DetrendConfig(overscan_degree=2), nonlinearity_coefficients=(A, B))
    before = correct_raw(
        data, overscan, 1, config=DetrendConfig(overscan_degree=2, nonlinearity="before_overscan"), nonlinearity_coefficients=(A, B)
    )
    off = correct_raw(data, overscan, 1, config=DetrendConfig(overscan_degree=2, nonlinearity="off"), nonlinearity_coefficients=None)
    relative_after = np.median((after.image - truth["bias"]) / truth["signal"])
    # "after_overscan" inverts the injected x = signal-above-bias model exactly; the other order
    # differs by less near a 1000 ADU pedestal, and "off" by the whole nonlinearity
    assert relative_after == pytest.approx(1.0, abs=3e-4)
    assert 1e-6 < abs(np.median(before.image / after.image) - 1.0) < 5e-4
    assert abs(np.median(off.image / after.image) - 1.0) > 5e-4
    with pytest.raises(ValueError, match="coefficients"):
        correct_raw(data, overscan, 1, config=DetrendConfig(), nonlinearity_coefficients=None)


def test_row_corrections_see_whole_rows_in_readout_order() -> None:
    qid = 3
    data, overscan, _ = make_raw(qid, 500.0, seed=6)
    seen: list[np.ndarray] = []

    def add_ramp(rows: np.ndarray) -> np.ndarray:
        seen.append(rows.copy())
        ramp = np.arange(rows.shape[1], dtype=np.float32)
        ramp[-30:] = 0.0  # the overscan left as it is: the level stands
        return rows + ramp  # a new array

    config = DetrendConfig(overscan_degree=2, nonlinearity="off")
    plain = correct_raw(data, overscan, qid, config=config, nonlinearity_coefficients=None)
    corrected = correct_raw(data, overscan, qid, config=config, nonlinearity_coefficients=None, row_corrections=[add_ramp])
    # first the overscan refit (the last data columns read and the overscan), then whole rows
    tail = min(TRAIL_COLUMNS, COLUMNS)
    assert [rows.shape for rows in seen] == [(ROWS, tail + 30), (ROWS, COLUMNS + 30)]
    np.testing.assert_allclose(seen[0], seen[1][:, COLUMNS - tail :], atol=1e-3)  # the refit moves the level by float error
    # the overscan columns come last and are overscan-subtracted (about 0)
    assert abs(float(np.median(seen[1][:, COLUMNS:]))) < 0.5
    np.testing.assert_allclose(to_readout(seen[1][:, :COLUMNS], qid), plain.image, atol=1e-3)
    np.testing.assert_allclose(corrected.overscan.level_stored, plain.overscan.level_stored, atol=1e-9)
    ramp_stored = from_readout(np.tile(np.arange(COLUMNS, dtype=np.float32), (ROWS, 1)), qid)
    np.testing.assert_allclose(corrected.image - plain.image, ramp_stored, atol=1e-3)


def test_the_level_is_refitted_from_the_overscan_the_corrections_leave() -> None:
    """A correction that finds 7 ADU of charge in the overscan (as the pocket finds its trail) lowers the
    level by 7 ADU and so raises the image by 7; the per-row difference is recorded as the trail."""
    qid = 2
    data, overscan, _ = make_raw(qid, 500.0, seed=9)

    def drain_overscan(rows: np.ndarray) -> np.ndarray:
        out = rows.copy()
        out[:, -30:] -= 7.0
        return out

    config = DetrendConfig(overscan_degree=2, nonlinearity="off")
    plain = correct_raw(data, overscan, qid, config=config, nonlinearity_coefficients=None)
    corrected = correct_raw(data, overscan, qid, config=config, nonlinearity_coefficients=None, row_corrections=[drain_overscan])
    np.testing.assert_allclose(corrected.overscan.level_stored, plain.overscan.level_stored - 7.0, atol=1e-3)
    np.testing.assert_allclose(corrected.image - plain.image, 7.0, atol=1e-3)
    assert plain.overscan.trail_readout is None
    np.testing.assert_allclose(corrected.overscan.trail_readout, 7.0, atol=1e-3)


def test_row_correction_must_return_a_new_array() -> None:
    data, overscan, _ = make_raw(1, 500.0, seed=7)

    def in_place(rows: np.ndarray) -> np.ndarray:
        rows += 1.0
        return rows

    with pytest.raises(ValueError, match="new array"):
        correct_raw(data, overscan, 1, config=DetrendConfig(nonlinearity="off"), nonlinearity_coefficients=None, row_corrections=[in_place])


def test_focal_plane_factor_divides_and_bad_flat_gives_nan() -> None:
    data, overscan, truth = make_raw(2, 1000.0, seed=8)
    bias, flat = masters(truth)
    flat.data[5, 5] = 0.0
    config = DetrendConfig(overscan_degree=2)
    common = dict(config=config, nonlinearity_coefficients=(A, B), master_bias=bias, master_flat=flat, gain=GAIN, read_noise=READ_NOISE_E)
    one = detrend_science(data, overscan, 2, **common)  # type: ignore[arg-type]
    scaled = detrend_science(data, overscan, 2, flat_factor=1.25, **common)  # type: ignore[arg-type]
    good = one.mask == 0
    np.testing.assert_allclose(scaled.image[good], one.image[good] / 1.25, rtol=1e-6)
    np.testing.assert_allclose(scaled.variance[good], one.variance[good] / 1.25**2, rtol=1e-5)
    assert np.isnan(one.image[5, 5]) and one.mask[5, 5] & masks.NAN


def test_shape_mismatch_is_refused() -> None:
    data, overscan, truth = make_raw(1, 100.0, seed=9)
    bias, flat = masters(truth)
    small = MasterQuadrant(bias.data[:10], bias.variance[:10], bias.mask[:10])
    with pytest.raises(ValueError, match="master_bias"):
        detrend_science(
            data, overscan, 1, config=DetrendConfig(), nonlinearity_coefficients=(A, B), master_bias=small, master_flat=flat,
            gain=GAIN, read_noise=READ_NOISE_E,
        )
