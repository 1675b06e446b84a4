"""The compiled pixel steps (streamer.detrend.fused, through calibrate) against the numpy formulation
they replaced (streamer.detrend.reference): image and variance within float32 rounding, mask bit for bit,
over every option that changes the arithmetic."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence

import numpy as np
import pytest

from streamer.config import DetrendConfig
from streamer.detrend import calibrate, masks, pocket, reference
from streamer.detrend import nonlinearity as nl
from streamer.detrend.calibrate import DetrendedQuadrant, MasterQuadrant, RowCorrection
from streamer.detrend.readout import QUADRANT_SHAPE, from_readout

NIGHT = dt.date(2020, 9, 24)
CCD = 6
GAIN, READ_NOISE_E = 6.2, 9.5
RELATIVE = 1e-6  # float32 rounding


def coefficients(qid: int) -> tuple[float, float]:
    return nl.coefficients(NIGHT, CCD, qid)


def make_raw(shape: tuple[int, int], qid: int, seed: int, dtype: str = "uint16") -> tuple[np.ndarray, np.ndarray]:
    """A stored raw quadrant and overscan: a row drift, sky, a few stars, saturated blobs, ADC-ceiling pixels."""
    rng = np.random.default_rng(seed)
    rows, columns = shape
    drift = from_readout((1000.0 + 4.0 * np.linspace(-1.0, 1.0, rows) ** 2)[:, np.newaxis], qid)
    linear = rng.poisson(300.0 * GAIN, shape) / GAIN
    for _ in range(max(3, rows * columns // 20_000)):
        i, j = rng.integers(0, rows), rng.integers(0, columns)
        linear[max(i - 2, 0) : i + 3, max(j - 2, 0) : j + 3] += 10 ** rng.uniform(2.0, 5.0)
    measured = nl.uncorrect(np.minimum(linear, 62_000.0), *coefficients(qid))
    data = measured + drift + rng.normal(0.0, READ_NOISE_E / GAIN, shape)
    data[rng.random(shape) < 2e-4] = 65535.0  # at the ADC ceiling
    overscan = drift + rng.normal(0.0, READ_NOISE_E / GAIN, (rows, 30))
    overscan[rng.integers(0, rows, 3)] += 40.0  # outlier rows for the fit to leave out
    if dtype == "float32":
        return data.astype(np.float32), overscan.astype(np.float32)
    high = np.iinfo(np.dtype(dtype)).max
    return np.clip(np.rint(data), 0, high).astype(dtype), np.clip(np.rint(overscan), 0, high).astype(dtype)


def make_masters(shape: tuple[int, int], seed: int, *, defects: bool) -> tuple[MasterQuadrant, MasterQuadrant]:
    """Master bias and flat of ``shape``; with ``defects``: NaN, zero and negative flats, NaN bias, mask bits."""
    rng = np.random.default_rng(seed)
    bias = rng.normal(0.0, 0.8, shape).astype(np.float32)
    bias_variance = rng.uniform(1e-3, 3e-3, shape).astype(np.float32)
    flat = rng.normal(1.0, 0.02, shape).astype(np.float32)
    flat_variance = rng.uniform(1e-7, 1e-6, shape).astype(np.float32)
    bias_mask = np.zeros(shape, np.uint16)
    flat_mask = np.zeros(shape, np.uint16)
    if defects:
        for array, values in ((flat, (np.nan, 0.0, -0.5, np.inf)), (bias, (np.nan,)), (flat_variance, (np.nan,))):
            for value in values:
                array[rng.random(shape) < 1e-3] = value
        bias_mask[rng.random(shape) < 1e-2] = masks.HOT | masks.NOISY
        flat_mask[rng.random(shape) < 1e-2] = masks.DEAD | masks.NO_CALIBRATION
        flat_mask[:, 3] |= masks.LOW_RESPONSIVITY
    return MasterQuadrant(bias, bias_variance, bias_mask), MasterQuadrant(flat, flat_variance, flat_mask)


def pocket_corrections(qid: int, enabled: bool) -> Sequence[RowCorrection]:
    if not enabled:
        return ()
    parameters = pocket.pocket_parameters("v0.1", CCD, qid, NIGHT)
    assert parameters is not None
    return (pocket.row_correction(parameters),)


def assert_same(fused: DetrendedQuadrant, numpy: DetrendedQuadrant) -> None:
    for name in ("image", "variance"):
        got, want = getattr(fused, name), getattr(numpy, name)
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN pixels")
        finite = np.isfinite(want)
        np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=f"{name}: infinite pixels")
        np.testing.assert_allclose(got[finite], want[finite], rtol=RELATIVE, atol=0.0, err_msg=name)
    assert fused.mask.dtype == numpy.mask.dtype == np.uint16
    np.testing.assert_array_equal(fused.mask, numpy.mask)
    np.testing.assert_array_equal(fused.overscan.level_stored, numpy.overscan.level_stored)
    assert fused.finite == bool(np.isfinite(fused.image).all() and np.isfinite(fused.variance).all())


def both(data: np.ndarray, overscan: np.ndarray, qid: int, **kwargs: object) -> tuple[DetrendedQuadrant, DetrendedQuadrant]:
    data_before, overscan_before = data.copy(), overscan.copy()
    fused = calibrate.detrend_science(data, overscan, qid, **kwargs)  # type: ignore[arg-type]
    numpy = reference.detrend_science(data, overscan, qid, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(data, data_before)
    np.testing.assert_array_equal(overscan, overscan_before)
    return fused, numpy


SMALL = (97, 83)
OPTIONS = list(
    itertools.product(
        ("after_overscan", "before_overscan", "off"),  # nonlinearity
        (False, True),  # pocket
        (False, True),  # defects in the masters
        ((None, 65535.0), (20_000.0, None)),  # (SATURATE, raw ceiling)
    )
)


@pytest.mark.parametrize(("order", "with_pocket", "defects", "saturation"), OPTIONS)
def test_small_quadrants_every_option(order: str, with_pocket: bool, defects: bool, saturation: tuple[float | None, float | None]) -> None:
    qid = 1 + OPTIONS.index((order, with_pocket, defects, saturation)) % 4
    data, overscan = make_raw(SMALL, qid, seed=qid)
    bias, flat = make_masters(SMALL, seed=100 + qid, defects=defects)
    saturate, raw_ceiling = saturation
    fused, numpy = both(
        data, overscan, qid,
        config=DetrendConfig(nonlinearity=order, overscan_degree=3),
        nonlinearity_coefficients=None if order == "off" else coefficients(qid),
        master_bias=bias, master_flat=flat, gain=GAIN, read_noise=READ_NOISE_E,
        saturate=saturate, raw_ceiling=raw_ceiling, flat_factor=1.0 if defects else 0.93,
        row_corrections=pocket_corrections(qid, with_pocket), block_rows=40,
    )  # fmt: skip
    assert_same(fused, numpy)
    assert fused.finite is not defects
    if defects:
        assert np.isnan(fused.image).any() and (fused.mask & masks.NAN).any()
    assert (fused.mask & masks.SATURATED).any()


@pytest.mark.parametrize("with_pocket", [False, True])
def test_a_variance_alone_not_finite_is_reported(with_pocket: bool) -> None:
    data, overscan = make_raw(SMALL, 2, seed=5)
    bias, flat = make_masters(SMALL, seed=6, defects=False)
    bias.variance[10, 20] = np.inf
    flat.variance[40, 7] = np.nan
    fused, numpy = both(
        data, overscan, 2, config=DetrendConfig(), nonlinearity_coefficients=coefficients(2),
        master_bias=bias, master_flat=flat, gain=GAIN, read_noise=READ_NOISE_E,
        row_corrections=pocket_corrections(2, with_pocket), block_rows=40,
    )  # fmt: skip
    assert_same(fused, numpy)
    assert np.isfinite(fused.image).all() and not fused.finite


@pytest.mark.parametrize(
    ("columns", "degree", "outlier_nmad"), [((5, 25), 8, 3.0), ((0, 30), 0, 3.0), ((10, 12), 2, 1.5), ((3, 28), 5, 50.0)]
)
def test_overscan_settings(columns: tuple[int, int], degree: int, outlier_nmad: float) -> None:
    qid = 3
    data, overscan = make_raw((160, 120), qid, seed=degree)
    bias, flat = make_masters((160, 120), seed=7, defects=True)
    config = DetrendConfig(overscan_columns=columns, overscan_degree=degree, overscan_outlier_nmad=outlier_nmad)
    fused, numpy = both(
        data, overscan, qid, config=config, nonlinearity_coefficients=coefficients(qid), master_bias=bias, master_flat=flat,
        gain=GAIN, read_noise=READ_NOISE_E, saturate=30_000.0,
    )  # fmt: skip
    assert_same(fused, numpy)


@pytest.mark.parametrize("dtype", ["int16", "float32", ">u2", ">f4", "float64"])
def test_raw_and_master_data_types(dtype: str) -> None:
    """Raw pixels as the FITS readers give them (big-endian when not decompressed), read-only masters,
    a float16 variance and a float64 bias: converted exactly, compared as numpy compares."""
    qid = 2
    native = dtype.lstrip(">")
    data, overscan = make_raw(SMALL, qid, seed=3, dtype="float32" if native.startswith("f") else "int16" if native == "int16" else "uint16")
    data, overscan = data.astype(dtype), overscan.astype(dtype)
    bias, flat = make_masters(SMALL, seed=4, defects=True)
    bias = MasterQuadrant(bias.data.astype(np.float64), bias.variance.astype(np.float16), bias.mask)
    for part in (*bias, *flat):
        part.flags.writeable = False
    data.flags.writeable = False
    fused, numpy = both(
        data, overscan, qid, config=DetrendConfig(overscan_degree=2), nonlinearity_coefficients=coefficients(qid),
        master_bias=bias, master_flat=flat, gain=GAIN, read_noise=READ_NOISE_E, saturate=25_000.0,
        raw_ceiling=32000.3 if native.startswith("f") else 65535.0,
    )  # fmt: skip
    assert_same(fused, numpy)


@pytest.mark.parametrize(("qid", "order", "with_pocket"), [(1, "after_overscan", False), (4, "before_overscan", True)])
def test_full_size_quadrant(qid: int, order: str, with_pocket: bool) -> None:
    data, overscan = make_raw(QUADRANT_SHAPE, qid, seed=20 + qid)
    bias, flat = make_masters(QUADRANT_SHAPE, seed=30 + qid, defects=True)
    fused, numpy = both(
        data, overscan, qid, config=DetrendConfig(nonlinearity=order), nonlinearity_coefficients=coefficients(qid),
        master_bias=bias, master_flat=flat, gain=GAIN, read_noise=READ_NOISE_E, saturate=float(nl.correct(64_000.0, *coefficients(qid))),
        flat_factor=1.07, row_corrections=pocket_corrections(qid, with_pocket),
    )  # fmt: skip
    assert_same(fused, numpy)


@pytest.mark.parametrize(("order", "with_pocket", "given_out"), list(itertools.product(("after_overscan", "before_overscan", "off"), (False, True), (False, True))))
def test_correct_rows_of_the_masters(order: str, with_pocket: bool, given_out: bool) -> None:
    """Steps 2-4 on a band of rows, as the master builder calls them."""
    qid = 2
    data, overscan = make_raw((50, 70), qid, seed=11)
    level = np.random.default_rng(12).normal(1000.0, 2.0, 50)
    kwargs = dict(nonlinearity=order, nonlinearity_coefficients=None if order == "off" else coefficients(qid), row_corrections=pocket_corrections(qid, with_pocket))
    out = np.full(data.shape, np.nan, np.float32) if given_out else None
    got = calibrate.correct_rows(data[10:40], overscan[10:40], level[10:40], qid, out=None if out is None else out[10:40], **kwargs)  # type: ignore[arg-type]
    want = reference.correct_rows(data[10:40], overscan[10:40], level[10:40], qid, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, want, rtol=RELATIVE, atol=0.0)
    if out is not None:
        assert got.base is out or got is out[10:40] or np.shares_memory(got, out)
        assert np.isnan(out[:10]).all() and np.isnan(out[40:]).all()


def test_linearise_matches_the_numpy_formulation() -> None:
    values = np.random.default_rng(13).uniform(-50.0, 65_000.0, (300, 30)).astype(np.float32)
    a, b = coefficients(1)
    want = values.copy()
    reference.linearise_in_place(want, a, b)
    got = calibrate.linearise(values[:, ::2], a, b)
    np.testing.assert_allclose(got, want[:, ::2], rtol=RELATIVE, atol=0.0)
    assert got.dtype == np.float32 and got.shape == (300, 15)
