"""The raw reader: integer and float tile-compressed quadrants, read-only arrays, per-quadrant errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamer.formats.raw import QuadrantReadError, RawFileError, open_raw, read_primary_header, read_raw_quadrant

ROWS, COLUMNS = 40, 24


def write_raw(path: Path, dtype: type, *, drop: int | None = None, wrong_amp: int | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    primary = fits.PrimaryHDU()
    primary.header["IMGTYPE"] = "bias"
    hdus: list[fits.PrimaryHDU | fits.CompImageHDU | fits.ImageHDU] = [primary]
    quadrants = []
    for index in range(1, 9):
        qid = index if index <= 4 else index - 4
        shape = (ROWS, COLUMNS) if index <= 4 else (ROWS, 30)
        values = rng.integers(900, 1100, shape).astype(dtype)
        if index <= 4:
            quadrants.append(values)
        header = fits.Header()
        header["AMP_ID"] = (wrong_amp if wrong_amp is not None and qid == 2 else qid) - 1
        header["GAIN"], header["READNOI"] = 6.1, 9.2
        if index == drop:
            hdus.append(fits.ImageHDU(header=header))
        elif np.issubdtype(dtype, np.floating):
            hdus.append(fits.CompImageHDU(values, header=header, compression_type="RICE_1", quantize_level=0.0))
        else:
            hdus.append(fits.CompImageHDU(values, header=header, compression_type="RICE_1"))
    fits.HDUList(hdus).writeto(path)
    return quadrants


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_reads_as_stored_and_read_only(tmp_path: Path, dtype: type) -> None:
    path = tmp_path / "raw.fits.fz"
    quadrants = write_raw(path, dtype)
    quadrant = read_raw_quadrant(path, 3)
    assert quadrant.data.dtype == np.dtype(dtype) and quadrant.overscan.shape == (ROWS, 30)
    np.testing.assert_array_equal(quadrant.data, quadrants[2])
    assert (quadrant.gain, quadrant.read_noise) == (6.1, 9.2)
    with pytest.raises(ValueError, match="read-only"):
        quadrant.data[0, 0] = 0
    with open_raw(path) as raw:
        np.testing.assert_array_equal(raw.data_rows(1, 5, 9), quadrants[0][5:9])
        assert raw.data_shape(2) == (ROWS, COLUMNS)
        assert raw.data_nbytes(2) == ROWS * COLUMNS * np.dtype(dtype).itemsize
    assert read_primary_header(path)["IMGTYPE"] == "bias"


def test_a_missing_quadrant_hdu_loses_that_quadrant_only(tmp_path: Path) -> None:
    path = tmp_path / "raw.fits.fz"
    write_raw(path, np.uint16, drop=2)
    with open_raw(path) as raw:
        for qid in (1, 3, 4):
            assert raw.quadrant(qid).data.shape == (ROWS, COLUMNS)
        with pytest.raises(QuadrantReadError, match="quadrant 2: HDU 2 .* no 2-D image") as err:
            raw.quadrant(2)
    assert err.value.qid == 2
    back = pickle.loads(pickle.dumps(err.value))
    assert (back.path, back.qid, back.reason) == (err.value.path, 2, err.value.reason)


def test_hdu_of_another_amplifier_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "raw.fits.fz"
    write_raw(path, np.uint16, wrong_amp=4)
    with pytest.raises(QuadrantReadError, match="AMP_ID 3, expected 1"):
        read_raw_quadrant(path, 2)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(RawFileError, match="no such file"):
        read_raw_quadrant(tmp_path / "absent.fits.fz", 1)
    junk = tmp_path / "junk.fits.fz"
    junk.write_bytes(b"<html>not found</html>" * 200)
    with pytest.raises(RawFileError):
        read_raw_quadrant(junk, 1)
    short = tmp_path / "short.fits.fz"
    write_raw(short, np.uint16)
    short.write_bytes(short.read_bytes()[:2880 * 2])
    with pytest.raises(QuadrantReadError):
        read_raw_quadrant(short, 4)
