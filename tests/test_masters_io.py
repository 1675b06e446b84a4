"""Master files: error within the quantisation step, exact masks and outliers, provenance kept,
deterministic bytes, atomic writes, the old format still read, clear one-line errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamer.detrend.calibrate import MasterQuadrant
from streamer.formats.masters import (
    MasterReadError,
    master_quadrants,
    read_master,
    read_master_header,
    read_master_quadrant_header,
    write_master,
)

SHAPE = (120, 100)


def make_quadrant(seed: int, noise: float = 0.5) -> MasterQuadrant:
    """A bias-like quadrant: noise around 0, a NaN, hot pixels far outside the noise, a bad column."""
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, noise, SHAPE).astype(np.float32)
    data[3, 4] = np.nan
    data[10, 11] = np.inf
    data[50, 60] = 5000.0 + 1.0 / 3.0
    data[51, 61] = -7777.125
    variance = (noise**2 * rng.chisquare(9, SHAPE) / 9).astype(np.float32)
    variance[80, 90] = 4000.0 * noise**2
    mask = np.zeros(SHAPE, dtype=np.uint16)
    mask[:, 7] = 1 << 13
    mask[5, 5] = (1 << 15) | 3
    return MasterQuadrant(data, variance, mask)


def make_flat_quadrant(seed: int) -> MasterQuadrant:
    """A flat-like quadrant: a smooth +-10 % pattern (hundreds of steps) plus noise 0.002."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    pattern = 1.0 + 0.1 * np.sin(rows / 20.0) * np.cos(cols / 15.0)
    data = (pattern + rng.normal(0.0, 0.002, SHAPE)).astype(np.float32)
    variance = (0.002**2 * rng.chisquare(20, SHAPE) / 20).astype(np.float32)
    mask = (rng.random(SHAPE) < 0.3).astype(np.uint16) * np.uint16(1 << 9)  # a dense mask
    return MasterQuadrant(data, variance, mask)


def documented_steps(quadrant: MasterQuadrant) -> tuple[float, float]:
    """The steps the format documents: 0.2 x the median noise for the data, 0.1 x the median variance."""
    median_variance = float(np.median(quadrant.variance[quadrant.variance > 0]))
    return 0.2 * math.sqrt(median_variance), 0.1 * median_variance


def assert_within_step(read: np.ndarray, truth: np.ndarray, step: float) -> np.ndarray:
    """|read - truth| <= step / 2 (plus float32 rounding) where truth is finite; return the errors."""
    finite = np.isfinite(truth)
    error = read[finite].astype(np.float64) - truth[finite].astype(np.float64)
    slack = 4 * np.spacing(np.abs(truth[finite]).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(error) <= step / 2 + slack)
    return error


@pytest.mark.parametrize("make", [make_quadrant, make_flat_quadrant])
def test_round_trip_is_within_half_a_step_and_masks_are_exact(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    quadrant = make(1)
    path = tmp_path / "m.fits"
    size = write_master(path, {2: quadrant}, primary_cards={"MKIND": "bias"})
    assert size == os.path.getsize(path)  # what the budget counts is the file's size
    data, variance, mask = read_master(path, 2)
    assert data.dtype == variance.dtype == np.float32 and mask.dtype == np.uint16
    assert data.shape == variance.shape == mask.shape == SHAPE
    data_step, variance_step = documented_steps(quadrant)
    error = assert_within_step(data, quadrant.data, data_step)
    # no dither: the error is the rounding to the nearest step, uniform, rms step / sqrt(12), unbiased
    assert abs(float(np.std(error)) / (data_step / math.sqrt(12)) - 1.0) < 0.05
    assert abs(float(np.mean(error))) < 0.02 * data_step
    assert_within_step(variance, quadrant.variance, variance_step)
    assert variance.min() >= 0.0
    np.testing.assert_array_equal(np.isnan(data), np.isnan(quadrant.data))
    np.testing.assert_array_equal(np.isposinf(data), np.isposinf(quadrant.data))
    np.testing.assert_array_equal(mask, quadrant.mask)


def test_outliers_beyond_the_integer_range_are_exact(tmp_path: Path) -> None:
    quadrant = make_quadrant(2)
    write_master(tmp_path / "m.fits", {1: quadrant}, primary_cards={"MKIND": "bias"})
    data, variance, _ = read_master(tmp_path / "m.fits", 1)
    assert data[50, 60] == np.float32(5000.0 + 1.0 / 3.0) and data[51, 61] == np.float32(-7777.125)
    assert variance[80, 90] == np.float32(4000.0 * 0.25)


@pytest.mark.parametrize("integer_type, base, top", [(np.uint8, -128, 255), (np.uint16, -30000, 65535)])
def test_quantised_integers_and_exceptions_equal_a_plain_numpy_reading(integer_type: type, base: int, top: int) -> None:
    """The compiled quantisation against numpy's formulation of its rule, on a plane whose size is
    not a multiple of the kernel's chunks, with NaN, infinities and values outside the integers'
    range on both sides of a chunk boundary, at the first pixel and at the last."""
    from streamer.formats.masters import QUANTISE_CHUNK, _quantise

    rng = np.random.default_rng(23)
    plane = rng.normal(0.0, 20.0, 3 * QUANTISE_CHUNK + 77).astype(np.float32)
    odd = [0, QUANTISE_CHUNK - 1, QUANTISE_CHUNK, 2 * QUANTISE_CHUNK + 5, plane.size - 1]
    plane[odd] = [np.nan, np.inf, -np.inf, 1e9, -1e9]
    plane[rng.integers(0, plane.size, 40)] = rng.normal(0.0, 1e5, 40).astype(np.float32)
    step = 0.37
    integers = np.empty(plane.size, dtype=integer_type)
    exceptions = np.empty(plane.size, dtype=np.int64)
    count = _quantise(plane, step, base, top, integers, exceptions)

    with np.errstate(invalid="ignore"):
        q = np.rint(plane.astype(np.float64) / step) - base
        inside = (q >= 0) & (q <= top)
    np.testing.assert_array_equal(exceptions[:count], np.flatnonzero(~inside))
    np.testing.assert_array_equal(integers, np.where(inside, q, 0).astype(integer_type))
    assert set(odd) <= set(exceptions[:count].tolist())


def test_the_sample_for_the_integer_range_equals_numpy_s() -> None:
    """Every 7th pixel's rint(x / step), the non-finite ones left out, as numpy computes it."""
    from streamer.formats.masters import _finite_sample

    rng = np.random.default_rng(29)
    plane = rng.normal(1.0, 0.02, 7 * 1000 + 3).astype(np.float32)
    plane[[0, 7, 14, 700, 7 * 1000]] = [np.nan, np.inf, -np.inf, 3e38, np.nan]
    step = 0.0013
    with np.errstate(over="ignore", invalid="ignore"):
        expected = np.rint(plane[::7].astype(np.float64) / step)
    np.testing.assert_array_equal(_finite_sample(plane, step, 7), expected[np.isfinite(expected)])


def test_both_integer_widths_and_both_plane_storages_are_exercised(tmp_path: Path) -> None:
    """The bias-like plane fits 8 bits, the flat-like one needs 16; noise compresses poorly, a pattern well."""
    write_master(tmp_path / "m.fits", {1: make_quadrant(3), 2: make_flat_quadrant(3)}, primary_cards={"MKIND": "bias"})
    with fits.open(tmp_path / "m.fits") as hdul:
        kinds = {(hdu.header["ZINTTYPE"], hdu.header["PLANECMP"]) for hdu in hdul[1:] if "ZINTTYPE" in hdu.header}
    assert {"uint8", "uint16"} <= {kind for kind, _ in kinds}
    assert {"none", "blosc2"} <= {storage for _, storage in kinds}


def test_provenance_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "m.fits"
    cards = {"MKIND": "flat", "NIGHT": "2021-03-02", "CCD_ID": 7, "FILTER": "zi", "NORMFACT": 1234.5, "A_LONG_KEYWORD": "kept"}
    write_master(path, {1: make_quadrant(4), 3: make_quadrant(5)}, primary_cards=cards,
                 quadrant_cards={1: {"NFRAMES": 6, "GAIN": 6.2, "READNOI": None}, 3: {"NFRAMES": 5}})  # fmt: skip
    header = read_master_header(path)
    assert header["FORMAT"] == 2
    for key, value in cards.items():
        assert header[key] == value
    assert master_quadrants(path) == (1, 3)
    first = read_master_quadrant_header(path, 1)
    assert first["NFRAMES"] == 6 and first["GAIN"] == 6.2 and "READNOI" not in first and first["QSTEP"] > 0
    assert read_master_quadrant_header(path, 3)["NFRAMES"] == 5


def test_same_input_gives_the_same_bytes(tmp_path: Path) -> None:
    quadrant = make_quadrant(2)
    write_master(tmp_path / "a.fits", {1: quadrant}, primary_cards={"MKIND": "bias"})
    write_master(tmp_path / "b.fits", {1: quadrant}, primary_cards={"MKIND": "bias"})
    assert (tmp_path / "a.fits").read_bytes() == (tmp_path / "b.fits").read_bytes()


def test_failed_write_leaves_neither_temporary_nor_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_master(tmp_path / "m.fits", {1: make_quadrant(3)}, primary_cards={"MKIND": "bias"})
    assert list(tmp_path.iterdir()) == []


def test_missing_quadrant_and_file_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.fits"
    write_master(path, {1: make_quadrant(4)}, primary_cards={"MKIND": "bias"})
    with pytest.raises(MasterReadError, match="no quadrant 3"):
        read_master(path, 3)
    with pytest.raises(MasterReadError, match="no such master file"):
        read_master(tmp_path / "absent.fits", 1)
    (tmp_path / "junk.fits").write_bytes(b"not a fits file" * 300)
    with pytest.raises(MasterReadError):
        read_master(tmp_path / "junk.fits", 1)
    (tmp_path / "empty.fits").write_bytes(b"")
    with pytest.raises(MasterReadError, match="empty"):
        read_master(tmp_path / "empty.fits", 1)


def _data_span(path: Path, name: str) -> tuple[int, int]:
    with fits.open(path) as hdul:
        info = hdul.fileinfo(hdul.index_of(name))
    return info["datLoc"], info["datSpan"]


@pytest.mark.parametrize("name", ["Q1_DATA", "Q1_VAR", "Q1_MASK"])
def test_corrupt_bytes_give_one_line_errors(tmp_path: Path, name: str) -> None:
    path = tmp_path / "m.fits"
    write_master(path, {1: make_quadrant(6)}, primary_cards={"MKIND": "bias"})
    start, span = _data_span(path, name)
    content = bytearray(path.read_bytes())
    position = start + min(span // 3, 40)
    content[position] ^= 0x5A
    path.write_bytes(bytes(content))
    with pytest.raises(MasterReadError) as caught:
        read_master(path, 1)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and name in message and "CRC32" in message


def test_truncated_files_give_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.fits"
    write_master(path, {1: make_quadrant(7)}, primary_cards={"MKIND": "bias"})
    content = path.read_bytes()
    start, span = _data_span(path, "Q1_VAR")
    for cut in (100, 2880 + 100, start + span // 2, len(content) - 3000):
        path.write_bytes(content[:cut])
        with pytest.raises(MasterReadError, match="truncated") as caught:
            read_master(path, 1)
        assert "\n" not in str(caught.value)


def _write_format1(path: Path, quadrant: MasterQuadrant, step: float, variance_step: float) -> None:
    """A master as format 1 wrote it: Rice-compressed floats, fixed step, subtractive dither (seed 8191)."""
    primary = fits.PrimaryHDU()
    primary.header["FORMAT"] = 1
    primary.header["MKIND"] = "bias"
    hdus: list[fits.PrimaryHDU | fits.CompImageHDU] = [primary]
    for name, array, quantum in (("Q1_DATA", quadrant.data, step), ("Q1_VAR", quadrant.variance, variance_step)):
        hdus.append(fits.CompImageHDU(array, name=name, compression_type="RICE_1", quantize_level=-quantum,
                                      quantize_method=1, dither_seed=8191))  # fmt: skip
    hdus.append(fits.CompImageHDU(quadrant.mask.astype(np.int16), name="Q1_MASK", compression_type="RICE_1"))
    fits.HDUList(hdus).writeto(path)


def test_format_1_is_still_read_and_a_newer_format_refused(tmp_path: Path) -> None:
    quadrant = make_quadrant(8)
    quadrant = MasterQuadrant(np.nan_to_num(quadrant.data, posinf=0.0), quadrant.variance, quadrant.mask & 0x7FFF)
    data_step, variance_step = documented_steps(quadrant)
    old = tmp_path / "old.fits"
    _write_format1(old, quadrant, data_step, variance_step)
    data, variance, mask = read_master(old, 1)
    ordinary = np.abs(quadrant.data) < 100
    assert np.all(np.abs(data[ordinary] - quadrant.data[ordinary]) <= data_step)  # dithered: within one step
    np.testing.assert_array_equal(mask, quadrant.mask)
    assert master_quadrants(old) == (1,)

    newer = tmp_path / "newer.fits"
    write_master(newer, {1: quadrant}, primary_cards={"MKIND": "bias"})
    with fits.open(newer, mode="update") as hdul:
        hdul[0].header["FORMAT"] = 3
    with pytest.raises(MasterReadError, match="master format 3; this version reads formats 1, 2") as caught:
        read_master(newer, 1)
    assert "\n" not in str(caught.value)
