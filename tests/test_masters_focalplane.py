"""Focal-plane flat factors: relative CCD levels per LED, median over the CCDs present."""

from __future__ import annotations

import pytest

from streamer.work.masters import MasterResult, focalplane_factors


def flat(ccdid: int, levels: dict[int, float], weights: dict[int, float] | None = None) -> MasterResult:
    leds = tuple(sorted(levels))
    return MasterResult(
        path=f"flat_c{ccdid:02d}.fits", kind="flat", night="2020-09-24", ccdid=ccdid, filtercode="zr",
        frames_used=(), frames_rejected=(), quadrants=(1, 2, 3, 4), failed_quadrants=(), leds_used=leds,
        led_levels=tuple((led, levels[led]) for led in leds),
        led_weights=tuple((led, (weights or {}).get(led, 1.0)) for led in leds), median=1.0,
    )


def test_relative_levels_against_the_median_ccd() -> None:
    # CCD responses 0.9, 1.0, 1.2 under every LED; LED brightnesses differ
    response = {1: 0.9, 2: 1.0, 3: 1.2}
    brightness = {7: 10_000.0, 8: 14_000.0}
    flats = [flat(c, {led: b * r for led, b in brightness.items()}) for c, r in response.items()]
    factors = focalplane_factors(flats)
    assert factors == pytest.approx({1: 0.9, 2: 1.0, 3: 1.2})


def test_missing_ccds_and_a_missing_led() -> None:
    flats = [flat(4, {7: 9_000.0, 8: 12_600.0}), flat(9, {7: 11_000.0}), flat(16, {7: 10_000.0, 8: 14_000.0})]
    factors = focalplane_factors(flats)
    # LED 7: median 10000; LED 8: median of (12600, 14000) = 13300
    assert factors[4] == pytest.approx((0.9 + 12_600 / 13_300) / 2)
    assert factors[9] == pytest.approx(1.1)
    assert factors[16] == pytest.approx((1.0 + 14_000 / 13_300) / 2)


def test_weights_and_refusals() -> None:
    flats = [flat(1, {7: 1.0, 8: 4.0}, {7: 3.0, 8: 1.0}), flat(2, {7: 1.0, 8: 1.0}), flat(3, {7: 1.0, 8: 1.0})]
    assert focalplane_factors(flats)[1] == pytest.approx((3 * 1.0 + 1 * 4.0) / 4)
    assert focalplane_factors([]) == {}
    with pytest.raises(ValueError, match="same CCD"):
        focalplane_factors([flat(1, {7: 1.0}), flat(1, {7: 2.0})])


def test_ccd_wide_median_is_exact_over_the_quadrants() -> None:
    import numpy as np

    from streamer.work.masters import _ccd_median

    rng = np.random.default_rng(0)
    for n in (5, 6, 1000, 1001):
        quadrants = [rng.normal(size=(2, n)).astype(np.float32), rng.normal(size=(3, n)).astype(np.float32)]
        quadrants[1][0, 0] = np.nan
        expected = np.median(np.concatenate([quadrants[0].ravel(), quadrants[1][np.isfinite(quadrants[1])]]))
        assert _ccd_median(quadrants) == pytest.approx(float(expected), abs=1e-6)
        assert np.isnan(quadrants[1][0, 0])  # inputs untouched
