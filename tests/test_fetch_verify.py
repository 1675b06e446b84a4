"""Structural verification of FITS bytes made with astropy: good files pass, every kind of damage fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamer.archive.verify import BLOCK, VerificationError, header_end, verify_fits


def _raw_file(path: Path, shape: tuple[int, int] = (40, 32), checksum: bool = False) -> Path:
    rng = np.random.default_rng(5)
    hdus: list[fits.PrimaryHDU | fits.CompImageHDU] = [fits.PrimaryHDU(header=fits.Header({"IMGTYPE": "object"}))]
    for _ in range(4):
        hdus.append(fits.CompImageHDU(rng.integers(100, 300, shape).astype(np.int32), compression_type="RICE_1"))
    for _ in range(4):
        hdus.append(fits.CompImageHDU(rng.integers(100, 300, (shape[0], 30)).astype(np.int32), compression_type="RICE_1"))
    fits.HDUList(hdus).writeto(path, checksum=checksum)
    return path


def _mask_file(path: Path, dtype: type = np.int16, checksum: bool = True) -> Path:
    data = np.zeros((40, 32), dtype=dtype)
    data[3, 4] = 2
    fits.PrimaryHDU(data).writeto(path, checksum=checksum)
    return path


def test_good_files_pass(tmp_path: Path) -> None:
    hdus = verify_fits(_raw_file(tmp_path / "raw.fits.fz", checksum=True), "raw")
    assert len(hdus) == 9 and hdus[1].image_shape == (40, 32) and hdus[5].image_shape == (40, 30)
    verify_fits(_mask_file(tmp_path / "m.fits"), "mskimg")


def test_truncated_and_padded_files_fail(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "raw.fits.fz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - BLOCK])
    with pytest.raises(VerificationError, match="truncated|ends inside"):
        verify_fits(path, "raw")
    path.write_bytes(data[:-100])
    with pytest.raises(VerificationError, match="multiple of 2880"):
        verify_fits(path, "raw")
    path.write_bytes(data + bytes(BLOCK))
    with pytest.raises(VerificationError):
        verify_fits(path, "raw")
    path.write_bytes(data)
    with pytest.raises(VerificationError, match="expected 1"):
        verify_fits(path, "raw", expected_size=1)


def test_html_and_wrong_layout_fail(tmp_path: Path) -> None:
    html = tmp_path / "page.fits"
    html.write_bytes(b"<html><body>Please log in</body></html>".ljust(BLOCK))
    with pytest.raises(VerificationError, match="SIMPLE"):
        verify_fits(html, "raw")
    mask32 = _mask_file(tmp_path / "m32.fits", np.int32)
    with pytest.raises(VerificationError, match="int16"):
        verify_fits(mask32, "mskimg")
    with pytest.raises(VerificationError, match="9"):
        verify_fits(_mask_file(tmp_path / "m.fits"), "raw")


def test_checksum_detects_a_flipped_byte(tmp_path: Path) -> None:
    path = _mask_file(tmp_path / "m.fits", checksum=True)
    data = bytearray(path.read_bytes())
    data[-BLOCK + 7] ^= 0x40  # inside the data, structure intact
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="DATASUM"):
        verify_fits(path, "mskimg")


def test_header_end_finds_the_end_card() -> None:
    header = fits.Header({"NAXIS": 0})
    raw = header.tostring().encode()
    assert header_end(raw) == len(raw)
    assert header_end(raw[:BLOCK - 80].ljust(BLOCK)) in (None, BLOCK)
