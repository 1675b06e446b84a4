"""Photometry numerics against slow, obvious references on small images."""

from __future__ import annotations

import math
import pickle

import numpy as np
import numpy.typing as npt
import pytest
import sep

from streamer import photometry as ph

RADII = (3.0, 4.5, 6.0, 8.0)


def overlap_fraction(x: float, y: float, r: float, shape: tuple[int, int], sub: int = 64) -> npt.NDArray[np.float64]:
    """Fraction of each pixel inside a circle, by brute-force sub-sampling of every pixel."""
    ny, nx = shape
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    fraction = np.zeros(shape)
    for i in range(max(0, int(y - r) - 1), min(ny, int(y + r) + 2)):
        for j in range(max(0, int(x - r) - 1), min(nx, int(x + r) + 2)):
            dy = i + offsets[:, None] - y
            dx = j + offsets[None, :] - x
            fraction[i, j] = np.mean(dx * dx + dy * dy < r * r)
    return fraction


def gaussian_star(shape: tuple[int, int], x: float, y: float, flux: float, sigma: float) -> npt.NDArray[np.float64]:
    rows, cols = np.indices(shape)
    return flux / (2 * np.pi * sigma**2) * np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))


def test_sums_match_brute_force_subsampled_reference() -> None:
    rng = np.random.default_rng(11)
    shape = (96, 112)
    sky = 100.0
    xs = np.array([30.3, 70.8, 51.55])
    ys = np.array([25.6, 60.1, 75.25])
    image = np.full(shape, sky)
    for x, y, f in zip(xs, ys, (5e4, 2e4, 8e3), strict=True):
        image += gaussian_star(shape, x, y, f, 1.6)
    variance = rng.uniform(50, 150, shape)
    mask = np.zeros(shape, np.int16)

    result = ph.measure_apertures(image.astype(np.float32), variance.astype(np.float32), mask, 6141, xs, ys, RADII)

    for s in range(xs.size):
        for k, r in enumerate(RADII):
            frac = overlap_fraction(xs[s], ys[s], r, shape)
            expected = float(np.sum(frac * (image.astype(np.float32) - sky)))
            expected_var = float(np.sum(frac * variance.astype(np.float32)))
            assert result.flux[s, k] == pytest.approx(expected, rel=2e-4, abs=0.05)
            assert result.flux_err[s, k] ** 2 == pytest.approx(expected_var, rel=2e-3)
    assert np.all(result.flags == 0)


def test_variance_of_ones_gives_pi_r_squared() -> None:
    shape = (80, 80)
    xs = np.array([40.0, 33.3, 47.9])
    ys = np.array([40.0, 45.2, 31.1])
    result = ph.measure_apertures(
        np.zeros(shape, np.float32), np.ones(shape, np.float32), np.zeros(shape, np.int32), 6141, xs, ys, RADII
    )
    expected = np.pi * np.asarray(RADII) ** 2
    np.testing.assert_allclose(result.flux_err**2, np.broadcast_to(expected, (3, len(RADII))), rtol=1e-10)
    np.testing.assert_allclose(result.flux, 0.0, atol=1e-10)


def test_sep_sum_of_ones_is_pi_r_squared() -> None:
    ones = np.ones((60, 60), np.float32)
    total, _, _ = sep.sum_circle(ones, np.full(4, 30.2), np.full(4, 29.7), np.array(RADII), subpix=0)
    np.testing.assert_allclose(total, np.pi * np.asarray(RADII) ** 2, rtol=1e-10)


def touches(x: float, y: float, r: float, i: int, j: int) -> bool:
    """Whether a circle overlaps pixel (i, j)'s square: the square's nearest point is inside."""
    nearest_x = min(max(x, j - 0.5), j + 0.5)
    nearest_y = min(max(y, i - 0.5), i + 0.5)
    return (nearest_x - x) ** 2 + (nearest_y - y) ** 2 < r * r


def test_masked_flag_per_radius_matches_pixel_geometry() -> None:
    rng = np.random.default_rng(5)
    shape = (120, 130)
    mask = np.zeros(shape, np.int16)
    bad = [(rng.integers(10, 110), rng.integers(10, 120)) for _ in range(12)]
    bits = [1 << 8, 1 << 9, 1 << 2, 1 << 1]  # saturated, dead, low responsivity, (not rejected) source
    for n, (i, j) in enumerate(bad):
        mask[i, j] |= bits[n % len(bits)]
    xs = rng.uniform(15, 115, 60)
    ys = rng.uniform(15, 105, 60)
    result = ph.measure_apertures(
        np.zeros(shape, np.float32), np.ones(shape, np.float32), mask, 6141, xs, ys, RADII
    )
    for s in range(xs.size):
        expected_bits = 0
        for k, r in enumerate(RADII):
            flagged = any(touches(xs[s], ys[s], r, i, j) for i, j in zip(*np.nonzero(mask & 6141), strict=True))
            assert bool(result.flags[s, k] & ph.FLAG_MASKED) == flagged, (s, r)
        for i, j in zip(*np.nonzero(mask & 6141), strict=True):
            if touches(xs[s], ys[s], max(RADII), i, j):
                expected_bits |= int(mask[i, j])
        assert result.mask_bits[s] == expected_bits & 6141
    assert np.any(result.flags & ph.FLAG_MASKED), "the random layout should put some rejected pixel in an aperture"
    assert not np.any(result.mask_bits & (1 << 1)), "bit 1 (source detection) is not a rejected bit"


def test_edge_flag_and_margin() -> None:
    shape = (100, 100)
    xs = np.array([2.0, 50.0, 50.0, 95.0, 50.0])
    ys = np.array([50.0, 50.0, 7.5, 50.0, 91.0])
    args = (np.zeros(shape, np.float32), np.ones(shape, np.float32), np.zeros(shape, np.int16), 6141, xs, ys, RADII)
    plain = ph.measure_apertures(*args)
    for s in range(xs.size):
        for k, r in enumerate(RADII):
            crosses = xs[s] - r < -0.5 or xs[s] + r > 99.5 or ys[s] - r < -0.5 or ys[s] + r > 99.5
            assert bool(plain.flags[s, k] & ph.FLAG_EDGE) == crosses
            if plain.flags[s, k] & sep.APER_TRUNC:
                assert crosses, "sep's own truncation implies ours"
    with_margin = ph.measure_apertures(*args, edge_margin_px=3.0)
    assert with_margin.flags[2, 2] & ph.FLAG_EDGE and not plain.flags[2, 2] & ph.FLAG_EDGE  # y=7.5, r=6: 1.5 px inside
    assert not with_margin.flags[1].any()


def test_nan_pixels_are_flagged_not_propagated() -> None:
    shape = (64, 64)
    image = np.full(shape, 10.0, np.float32)
    image[30, 30] = np.nan
    result = ph.measure_apertures(
        image, np.ones(shape, np.float32), np.zeros(shape, np.int16), 6141, np.array([31.0, 10.0]), np.array([30.0, 10.0]), RADII
    )
    assert np.all(np.isfinite(result.flux))
    assert np.all(result.flags[0] & ph.FLAG_MASKED)
    assert not np.any(result.flags[1])
    assert np.isnan(image[30, 30]), "the caller's image is not modified"


def test_a_caller_that_found_the_values_finite_gets_the_same_result() -> None:
    rng = np.random.default_rng(8)
    shape = (200, 220)
    image = rng.normal(100.0, 5.0, shape).astype(np.float32)
    mask = np.zeros(shape, np.int16)
    mask[rng.random(shape) < 1e-3] = 4
    xs, ys = rng.uniform(5, 215, 30), rng.uniform(5, 195, 30)
    args = (image, np.full(shape, 25.0, np.float32), mask, 6141, xs, ys, RADII)
    checked = ph.measure_apertures(*args, background_box=(64, 64))
    vouched = ph.measure_apertures(*args, background_box=(64, 64), finite=True)
    for name in ("flux", "flux_err", "flags", "mask_bits"):
        np.testing.assert_array_equal(getattr(vouched, name), getattr(checked, name))


def test_background_is_subtracted_with_sources_masked() -> None:
    rng = np.random.default_rng(3)
    shape = (400, 440)
    image = rng.normal(250.0, 5.0, shape)
    xs = rng.uniform(20, 420, 40)
    ys = rng.uniform(20, 380, 40)
    for x, y in zip(xs, ys, strict=True):
        image += gaussian_star(shape, x, y, 3e5, 1.5)
    result = ph.measure_apertures(
        image.astype(np.float32), np.full(shape, 25.0, np.float32), np.zeros(shape, np.int16), 6141, xs, ys, (12.0,),
        background_box=(64, 64),
    )
    ratio = result.flux[:, 0] / 3e5
    assert abs(np.median(ratio) - 1) < 0.005


def test_bad_inputs_raise_value_error() -> None:
    shape = (10, 10)
    ok = (np.zeros(shape, np.float32), np.ones(shape, np.float32), np.zeros(shape, np.int16), 6141)
    with pytest.raises(ValueError, match="finite"):
        ph.measure_apertures(*ok, np.array([np.nan]), np.array([1.0]), RADII)
    with pytest.raises(ValueError, match="radii"):
        ph.measure_apertures(*ok, np.array([1.0]), np.array([1.0]), ())
    with pytest.raises(ValueError, match="shape"):
        ph.measure_apertures(np.zeros((5, 5)), *ok[1:], np.array([1.0]), np.array([1.0]), RADII)


def angular_distance_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    a1, d1, a2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((a2 - a1) / 2) ** 2
    return math.degrees(2 * math.asin(math.sqrt(h)))


@pytest.mark.parametrize(("ra_lo", "ra_hi", "dec_lo", "dec_hi"), [(359.95, 360.05, 9.95, 10.05), (0.0, 360.0, 89.9, 89.95)])
def test_isolation_matches_all_pairs_loop(ra_lo: float, ra_hi: float, dec_lo: float, dec_hi: float) -> None:
    rng = np.random.default_rng(8)
    n = 300
    ra = rng.uniform(ra_lo, ra_hi, n) % 360
    dec = rng.uniform(dec_lo, dec_hi, n)
    ra[1], dec[1] = ra[0] + 10 / 3600 / math.cos(math.radians(dec[0])), dec[0]  # a pair 10" apart
    ra[2], dec[2] = ra[3], dec[3]  # two sources at one position
    got = ph.isolated(ra, dec, 20.0)
    expected = np.array(
        [
            all(angular_distance_deg(ra[i], dec[i], ra[j], dec[j]) * 3600 > 20.0 for j in range(n) if j != i)
            for i in range(n)
        ]
    )
    np.testing.assert_array_equal(got, expected)
    assert not got[0] and not got[1] and not got[2] and not got[3]
    assert got.any() and not got.all()


def test_apertures_round_trip_through_pickle() -> None:
    shape = (40, 40)
    result = ph.measure_apertures(
        np.ones(shape, np.float32), np.ones(shape, np.float32), np.zeros(shape, np.int16), 6141, np.array([20.0]), np.array([20.0]), RADII
    )
    again = pickle.loads(pickle.dumps(result))
    np.testing.assert_array_equal(again.flux, result.flux)
    np.testing.assert_array_equal(again.flags, result.flags)


def test_overwrite_image_gives_the_same_sums_and_only_then_touches_the_image() -> None:
    rng = np.random.default_rng(9)
    shape = (90, 100)
    image = (rng.normal(50.0, 3.0, shape) + gaussian_star(shape, 40.2, 45.7, 4e4, 1.5)).astype(np.float32)
    image[10, 10] = np.inf
    args = (np.full(shape, 9.0, np.float32), np.zeros(shape, np.int16), 6141, np.array([40.2, 12.0]), np.array([45.7, 10.0]), RADII)
    kept = image.copy()
    plain = ph.measure_apertures(image, *args)
    np.testing.assert_array_equal(image, kept)
    again = ph.measure_apertures(image, *args, overwrite_image=True)
    np.testing.assert_array_equal(again.flux, plain.flux)
    np.testing.assert_array_equal(again.flags, plain.flags)
    assert np.all(plain.flags[1] & ph.FLAG_MASKED), "the infinite pixel is rejected"
    assert not np.array_equal(image, kept)
