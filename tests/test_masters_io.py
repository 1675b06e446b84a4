"""Master files: quantisation error far below the noise, deterministic bytes, atomic writes, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from streamer.detrend.calibrate import MasterQuadrant
from streamer.formats.masters import (
    MasterReadError,
    master_quadrants,
    read_master,
    read_master_header,
    write_master,
)


def make_quadrant(seed: int, noise: float = 0.5) -> MasterQuadrant:
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, noise, (120, 100)).astype(np.float32)
    data[3, 4] = np.nan
    variance = (noise**2 * rng.chisquare(9, (120, 100)) / 9).astype(np.float32)
    mask = np.zeros((120, 100), dtype=np.uint16)
    mask[:, 7] = 1 << 13
    return MasterQuadrant(data, variance, mask)


def test_round_trip_error_is_far_below_the_noise(tmp_path: Path) -> None:
    quadrant = make_quadrant(1)
    path = tmp_path / "m.fits"
    size = write_master(path, {2: quadrant}, primary_cards={"MKIND": "bias", "A_LONG_KEYWORD": "kept"})
    assert size == os.path.getsize(path)
    data, variance, mask = read_master(path, 2)
    finite = np.isfinite(quadrant.data)
    assert np.isnan(data[3, 4]) and np.array_equal(np.isfinite(data), finite)
    error = data[finite] - quadrant.data[finite]
    assert float(np.std(error)) < 0.07 * 0.5  # step 0.2 sigma: rms 0.058 sigma
    assert abs(float(np.mean(error))) < 0.01 * 0.5
    assert float(np.std(variance / quadrant.variance - 1.0)) < 0.05
    assert variance.min() >= 0.0
    np.testing.assert_array_equal(mask, quadrant.mask)
    assert mask.dtype == np.uint16 and data.dtype == np.float32
    assert master_quadrants(path) == (2,)
    assert read_master_header(path)["A_LONG_KEYWORD"] == "kept"


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
