"""The one-pass aperture kernel against sep.sum_circle (exact overlap), the former sep-based
measurement, and slow obvious references (sub-sampled pixels, areas of discs cut by edges)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
import sep

from streamer import photometry as ph
from streamer.photometry_kernels import _area_arc_series, circle_overlap, mask_bits_in_circles, rejected_pixels, sum_circles

RADII_1_15 = np.arange(1.0, 16.0)


def random_case(seed: int, shape: tuple[int, int], n: int) -> dict[str, npt.NDArray[np.generic]]:
    """An image, variance and rejected map, with positions inside, near and beyond the edges."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    image = rng.normal(0.0, 30.0, shape).astype(np.float32)  # background-subtracted-like: sums near 0 too
    image += rng.uniform(0, 500, shape).astype(np.float32) * (rng.random(shape) < 0.05)
    variance = rng.uniform(20.0, 200.0, shape).astype(np.float32)
    rejected = rng.random(shape) < 0.004
    x = np.concatenate([rng.uniform(-18.0, nx + 17.0, n - 12), [0.0, -0.5, nx - 0.5, 10.0, 10.5, 3.25, 12.0, -3.0, nx + 2.0, 7.0, 8.5, nx / 2]])
    y = np.concatenate([rng.uniform(-18.0, ny + 17.0, n - 12), [0.0, -0.5, ny - 0.5, 20.0, 20.5, 0.75, -7.3, 5.0, 9.0, ny - 1.0, ny + 14.9, ny / 2]])
    return {"image": image, "variance": variance, "rejected": rejected, "x": x, "y": y}


def sep_reference(case: dict[str, npt.NDArray[np.generic]], radii: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], ...]:
    """sep.sum_circle per (position, radius): sum, error, flags, and the sum over the rejected map."""
    n, k = case["x"].size, radii.size
    xs, ys, rs = np.repeat(case["x"], k), np.repeat(case["y"], k), np.tile(radii, n)
    total, error, flags = sep.sum_circle(case["image"], xs, ys, rs, var=case["variance"], subpix=0)
    counts, _, _ = sep.sum_circle(np.ascontiguousarray(case["rejected"]).view(np.uint8), xs, ys, rs, subpix=0)
    absolute, _, _ = sep.sum_circle(np.nan_to_num(np.abs(case["image"])), xs, ys, rs, subpix=0)
    return tuple(a.reshape(n, k) for a in (total, error, flags, counts, absolute))


def assert_sums_close(ours: npt.NDArray[np.float64], theirs: npt.NDArray[np.float64], scale: npt.NDArray[np.float64]) -> None:
    """Equal within 1e-6 relative (of the sum, or of the sum of |pixels| where the sum nears 0); NaN where sep has NaN."""
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=0)
    assert np.all(np.abs(ours[finite] - theirs[finite]) <= 1e-6 * np.maximum(np.abs(theirs[finite]), scale[finite]))


@pytest.mark.parametrize(("seed", "shape"), [(1, (90, 70)), (2, (41, 123)), (3, (200, 180))])
def test_kernel_matches_sep_sum_circle(seed: int, shape: tuple[int, int]) -> None:
    case = random_case(seed, shape, 300)
    radii = np.random.default_rng(seed).permutation(RADII_1_15)  # any order of radii
    total, variance_sum, rejected_area, truncated = sum_circles(
        case["image"], case["variance"], case["rejected"], case["x"], case["y"], radii
    )
    sep_total, sep_error, sep_flags, sep_counts, sep_absolute = sep_reference(case, radii)
    assert_sums_close(total, sep_total, sep_absolute)
    assert_sums_close(np.sqrt(variance_sum), sep_error, sep_error)
    np.testing.assert_array_equal(truncated, (sep_flags & sep.APER_TRUNC) != 0)
    assert not np.any(sep_flags & ~sep.APER_TRUNC), "sep sets no other flag without a mask"
    np.testing.assert_array_equal(rejected_area > 0, sep_counts > 0)
    assert truncated.any() and not truncated.all(), "the layout puts apertures across the edges and inside"
    assert (rejected_area > 0).any() and not (rejected_area > 0).all()


def test_kernel_propagates_nan_as_sep_does() -> None:
    case = random_case(4, (80, 80), 200)
    rng = np.random.default_rng(4)
    case["image"][rng.random((80, 80)) < 0.002] = np.nan
    case["variance"][rng.random((80, 80)) < 0.002] = np.inf
    total, variance_sum, rejected_area, _ = sum_circles(case["image"], case["variance"], case["rejected"], case["x"], case["y"], RADII_1_15)
    sep_total, sep_error, _, sep_counts, sep_absolute = sep_reference(case, RADII_1_15)
    assert np.isnan(sep_total).any() and np.isfinite(sep_total).any()
    assert_sums_close(total, sep_total, sep_absolute)
    np.testing.assert_array_equal(np.isinf(np.sqrt(variance_sum)), np.isinf(sep_error))
    np.testing.assert_array_equal(rejected_area > 0, sep_counts > 0)


# --- the measurement as a whole, against the former sep-based one -------------------------------


def former_measure(
    image: npt.NDArray[np.float32], variance: npt.NDArray[np.float32], mask: npt.NDArray[np.int16],
    reject_bits: int, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], radii: Sequence[float], edge_margin_px: float,
) -> ph.Apertures:  # fmt: skip
    """The measurement as it was made with two sep.sum_circle calls (a reference written for this test)."""
    radii_arr = np.asarray(radii, dtype=np.float64)
    n, k = x.size, radii_arr.size
    rejected_bits = mask & np.int16(reject_bits)
    rejected = rejected_bits != 0
    work = image.copy()
    var = variance.copy()
    nonfinite = ~(np.isfinite(work) & np.isfinite(var))
    work[nonfinite] = 0.0
    var[nonfinite] = 0.0
    rejected |= nonfinite
    xs, ys, rs = np.repeat(x, k), np.repeat(y, k), np.tile(radii_arr, n)
    counts, _, _ = sep.sum_circle(rejected.view(np.uint8), xs, ys, rs, subpix=0)
    touched = counts.reshape(n, k) > 0
    bits = np.zeros(n, np.int32)
    for s in np.flatnonzero(touched.any(axis=1)):
        for i, j in zip(*np.nonzero(rejected_bits), strict=True):
            near_x = min(max(x[s], j - 0.5), j + 0.5) - x[s]
            near_y = min(max(y[s], i - 0.5), i + 0.5) - y[s]
            if near_x**2 + near_y**2 < radii_arr.max() ** 2:
                bits[s] |= int(rejected_bits[i, j])
    background_mask = rejected.copy()
    disc = ph.background_disc_radius(rejected, x, y, radii_arr, (32, 32))  # the background rule, not under test here
    if disc > 0:
        sep.mask_ellipse(background_mask, x, y, disc, disc, 0.0)
    sep.Background(work, mask=background_mask, bw=32, bh=32).subfrom(work)
    total, error, sep_flags = sep.sum_circle(work, xs, ys, rs, var=var, subpix=0)
    flux, flux_err = total.reshape(n, k), error.reshape(n, k)
    flags = sep_flags.reshape(n, k).astype(np.int32) | np.where(touched, ph.FLAG_MASKED, 0).astype(np.int32)
    ny, nx = image.shape
    reach = radii_arr[None, :] + edge_margin_px
    near_edge = (x[:, None] - reach < -0.5) | (x[:, None] + reach > nx - 0.5) | (y[:, None] - reach < -0.5) | (y[:, None] + reach > ny - 0.5)
    flags |= np.where(near_edge, ph.FLAG_EDGE, 0).astype(np.int32)
    flags |= np.where(np.isfinite(flux) & np.isfinite(flux_err), 0, ph.FLAG_NONFINITE).astype(np.int32)
    return ph.Apertures(flux, flux_err, flags, bits)


@pytest.mark.parametrize("seed", [7, 8])
def test_measure_apertures_matches_the_former_sep_measurement(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (150, 140)
    image = (100.0 + rng.normal(0.0, 8.0, shape)).astype(np.float32)
    image[rng.random(shape) < 0.001] = np.nan
    variance = rng.uniform(40.0, 90.0, shape).astype(np.float32)
    mask = np.zeros(shape, np.int16)
    for bit in (1 << 8, 1 << 9, 1 << 2, 1 << 1):  # saturated, dead, low responsivity, and a bit that is not rejected
        mask[rng.random(shape) < 0.001] |= np.int16(bit)
    x = np.concatenate([rng.uniform(-3.0, 143.0, 120), [0.0, 139.0, 70.5]])
    y = np.concatenate([rng.uniform(-3.0, 153.0, 120), [149.0, 0.0, 75.25]])
    radii = (3.0, 4.0, 5.5, 8.0, 12.0)
    args = (image, variance, mask, 6141, x, y, radii)
    ours = ph.measure_apertures(*args, background_box=(32, 32), edge_margin_px=2.0)
    theirs = former_measure(*args, edge_margin_px=2.0)
    scale = np.asarray(sep.sum_circle(np.ones(shape, np.float32), np.repeat(x, 5), np.repeat(y, 5), np.tile(radii, x.size), subpix=0)[0])
    assert_sums_close(ours.flux, theirs.flux, 100.0 * scale.reshape(x.size, 5))  # |pixels| ~ 100 ADU before the sky is removed
    assert_sums_close(ours.flux_err, theirs.flux_err, theirs.flux_err)
    np.testing.assert_array_equal(ours.flags, theirs.flags)
    np.testing.assert_array_equal(ours.mask_bits, theirs.mask_bits)
    assert np.any(ours.flags & ph.FLAG_MASKED) and np.any(ours.flags & sep.APER_TRUNC) and np.any(ours.flags == 0)


# --- slow obvious references --------------------------------------------------------------------


def subsampled_overlap(dx: float, dy: float, r: float, sub: int = 400) -> float:
    """Fraction of the unit square centred at (dx, dy) inside the circle of radius ``r`` at the origin."""
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    px = dx + offsets[None, :]
    py = dy + offsets[:, None]
    return float(np.mean(px * px + py * py < r * r))


def test_pixel_overlap_matches_subsampling() -> None:
    rng = np.random.default_rng(9)
    for r in (0.4, 1.0, 2.5, 7.3, 15.0):
        for _ in range(25):
            angle = rng.uniform(0, 2 * math.pi)
            distance = r + rng.uniform(-0.9, 0.9)  # pixels the circle crosses, or nearly
            dx, dy = distance * math.cos(angle), distance * math.sin(angle)
            exact = circle_overlap(dx - 0.5, dy - 0.5, dx + 0.5, dy + 0.5, r)
            assert exact == pytest.approx(subsampled_overlap(dx, dy, r), abs=3e-3)  # the sampling's own error: ~1/400 of the edge
    assert circle_overlap(-0.5, -0.5, 0.5, 0.5, 0.3) == pytest.approx(math.pi * 0.09, rel=1e-14)  # a circle inside one pixel
    assert circle_overlap(-0.5, -0.5, 0.5, 0.5, 0.6) == pytest.approx(  # a centred pixel, its corners outside: the disc less 4 segments
        math.pi * 0.36 - 4 * (0.36 * math.acos(0.5 / 0.6) - 0.5 * math.sqrt(0.36 - 0.25)), rel=1e-14
    )
    assert circle_overlap(-0.5, -0.5, 0.5, 0.5, 0.75) == 1.0  # the corners (0.707 away) inside


def test_segment_series_against_closed_forms() -> None:
    """The segment area by series against ``r^2 (asin s - s sqrt(1 - s^2))`` (accurate where s is not
    small) and against its two leading terms (where s is small enough for them to be exact)."""
    for r in (3.0, 7.5, 15.0):
        for s in (0.02, 0.07, 0.13, 0.2, 0.25):
            chord = 2 * s * r
            closed = r * r * (math.asin(s) - s * math.sqrt(1 - s * s))
            assert _area_arc_series(0.0, 0.0, chord, 0.0, r) == pytest.approx(closed, rel=1e-12)
        for s in (1e-6, 1e-4, 1e-3):
            leading = r * r * (2 / 3 * s**3 + s**5 / 5)
            assert _area_arc_series(0.0, 0.0, 2 * s * r, 0.0, r) == pytest.approx(leading, rel=1e-14)
    assert _area_arc_series(0.0, 0.0, 1.0, 1.0, 1.0) == pytest.approx(0.5 * (math.pi / 2 - 1), rel=1e-14)  # s > 1/4: closed form


def test_sums_of_ones_are_the_areas_of_whole_half_and_quarter_discs() -> None:
    shape = (60, 70)
    ones = np.ones(shape, np.float32)
    nothing = np.zeros(shape, np.bool_)
    # centres well inside, on the left edge line (x = -0.5), on the bottom-left corner of the image
    x = np.array([35.3, -0.5, -0.5, 34.0])
    y = np.array([29.8, 30.1, -0.5, 59.5])  # the last: on the top edge line (y = 59.5)
    total, variance_sum, rejected_area, truncated = sum_circles(ones, ones, nothing, x, y, RADII_1_15)
    disc = math.pi * RADII_1_15**2
    np.testing.assert_allclose(total[0], disc, rtol=1e-12)
    np.testing.assert_allclose(variance_sum[0], disc, rtol=1e-12)
    np.testing.assert_allclose(total[1], disc / 2, rtol=1e-12)
    np.testing.assert_allclose(total[2], disc / 4, rtol=1e-12)
    np.testing.assert_allclose(total[3], disc / 2, rtol=1e-12)
    assert not truncated[0].any() and truncated[1:].all()
    assert not rejected_area.any()


def test_masked_area_is_the_rejected_pixels_overlap() -> None:
    shape = (40, 40)
    rejected = np.zeros(shape, np.bool_)
    rejected[20, 27] = True
    x, y = np.array([20.2]), np.array([19.9])
    _, _, rejected_area, _ = sum_circles(np.zeros(shape, np.float32), np.zeros(shape, np.float32), rejected, x, y, RADII_1_15)
    expected = [subsampled_overlap(27 - 20.2, 20 - 19.9, r) for r in RADII_1_15]
    np.testing.assert_allclose(rejected_area[0], expected, atol=3e-3)
    assert rejected_area[0, 5] == 0.0 and rejected_area[0, 6] > 0  # r = 6 ends at 6.0 < 6.3 (the pixel's near edge), r = 7 crosses it


def test_bad_arguments_raise_value_error() -> None:
    image = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="radii"):
        sum_circles(image, image, image > 0, [1.0], [1.0], [2.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        sum_circles(image, image, image > 0, [np.nan], [1.0], [2.0])
    with pytest.raises(ValueError, match="one 2-d shape"):
        sum_circles(image, image[:5], image > 0, [1.0], [1.0], [2.0])


def mask_bits_reference(bits: npt.NDArray[np.integer], x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], radius: float) -> npt.NDArray[np.int32]:
    """OR of ``bits`` over the pixels whose square has a point closer than ``radius``, in numpy, position by position."""
    ny, nx = bits.shape
    out = np.zeros(len(x), dtype=np.int32)
    for i, (xc, yc) in enumerate(zip(x, y, strict=True)):
        rows = np.arange(ny, dtype=np.float64)[:, None]
        cols = np.arange(nx, dtype=np.float64)[None, :]
        nearest_dy = np.clip(yc, rows - 0.5, rows + 0.5) - yc
        nearest_dx = np.clip(xc, cols - 0.5, cols + 0.5) - xc
        inside = nearest_dx**2 + nearest_dy**2 < radius**2
        out[i] = int(np.bitwise_or.reduce(bits[inside], initial=0))
    return out


@pytest.mark.parametrize("radius", [0.3, 3.0, 7.5, 12.0])
def test_mask_bits_of_the_largest_aperture_match_the_numpy_reference(radius: float) -> None:
    rng = np.random.default_rng(int(radius * 10))
    shape = (60, 70)
    bits = np.zeros(shape, np.uint16)
    for bit in range(12):
        bits[rng.random(shape) < 0.002] |= np.uint16(1 << bit)
    case = random_case(11, shape, 150)
    x = np.concatenate([case["x"], [20.5 + radius, 30.0, 5.5]])  # a square's edge exactly at the radius
    y = np.concatenate([case["y"], [10.0, 30.5 - radius, 5.5 + radius]])
    bits[10, 20], bits[30, 30], bits[5, 5] = 1 << 13, 1 << 14, 1 << 15
    got = mask_bits_in_circles(bits, x, y, radius)
    np.testing.assert_array_equal(got, mask_bits_reference(bits, x, y, radius))
    assert np.count_nonzero(got) >= 3


@pytest.mark.parametrize("dtype", ["uint16", "int16", "int32", "uint8"])
def test_rejected_pixels_are_numpys_mask_and_bits(dtype: str) -> None:
    info = np.iinfo(np.dtype(dtype))
    mask = np.random.default_rng(4).integers(info.min, info.max, (37, 41), endpoint=True).astype(dtype)
    for bits in (6141, 1 << 15 | 2, 0):
        expected = (mask & np.asarray(bits).astype(mask.dtype)) != 0
        np.testing.assert_array_equal(rejected_pixels(mask, bits), expected)
    assert rejected_pixels(mask, 6141).any() and not rejected_pixels(mask, 0).any()


def test_mask_bits_keep_the_rejected_bits_in_the_masks_type() -> None:
    shape = (40, 40)
    image, variance = np.zeros(shape, np.float32), np.ones(shape, np.float32)
    x, y = np.array([20.0, 5.0]), np.array([20.0, 30.0])
    for dtype in ("uint16", "int16"):
        mask = np.zeros(shape, dtype)
        mask[20, 22] = np.array(1 << 15 | 4 | 2, dtype=np.uint16).view(dtype)  # bit 15: negative as int16
        mask[30, 6] = 2  # a bit that is not rejected
        reject = 1 << 15 | 4
        result = ph.measure_apertures(image, variance, mask, reject, x, y, (3.0,))
        expected = int(np.asarray(mask[20, 22] & np.asarray(reject).astype(dtype)).astype(np.int32))
        assert result.mask_bits.tolist() == [expected, 0]
        assert result.flags[0, 0] & ph.FLAG_MASKED and not result.flags[1, 0] & ph.FLAG_MASKED
