"""Full-size (3080 x 3072) masters against the simulator's truth: run with `make test-slow`."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamer.config import DetrendConfig
from streamer.detrend import masks
from streamer.formats.masters import read_master
from streamer.rules.bias import biases_to_use
from streamer.sim.generate import generate_night
from streamer.work.masters import build_led_flat, build_master_bias, combine_master_flat

pytestmark = pytest.mark.slow

NIGHT = dt.date(2021, 3, 2)
CCD = 7
FILTER = "zi"  # 3 LEDs: the smallest complete flat sequence
CONFIG = DetrendConfig(overscan_degree=8, bias_skip_first=2, min_bias_frames=5, min_flats_per_led=3)


def test_full_size_masters_recover_the_truth(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    generate_night(
        out, NIGHT, ccds=(CCD,), n_exposures=0, flats_per_led=3, n_biases=8, shape="full", seed=11,
        filters=(FILTER,), flat_filters=(FILTER,), jobs=2,
    )
    params = json.loads((out / "truth" / "params.json").read_text())
    raws = sorted(str(p) for p in out.glob("raw/**/*.fits.fz"))
    by_led: dict[int, list[str]] = defaultdict(list)
    for path in raws:
        if path.endswith("_f.fits.fz"):
            by_led[int(fits.getheader(path, 0)["ILUM_LED"])].append(path)
    biases = biases_to_use([p for p in raws if p.endswith("_b.fits.fz")], CONFIG.bias_skip_first, order=os.path.basename)
    bias = build_master_bias(
        biases, str(tmp_path / "bias.fits"), night=NIGHT, ccdid=CCD, detrend=CONFIG
    )
    led_paths = {
        led: build_led_flat(
            paths, bias.path, str(tmp_path / f"led{led}.fits"), led=led, night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG
        ).path
        for led, paths in by_led.items()
    }
    flat = combine_master_flat(led_paths, str(tmp_path / "flat.fits"), night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG)
    assert bias.quadrants == flat.quadrants == (1, 2, 3, 4)
    assert flat.leds_used == (11, 12, 13)

    n = len(bias.frames_used)
    for qid in (1, 2, 3, 4):
        amp = params["amplifiers"][str(CCD)][str(qid)]
        master_bias = read_master(bias.path, qid)
        master_flat = read_master(flat.path, qid)
        good = np.ones(master_bias.data.shape, dtype=bool)
        good[:, amp["dead_columns"] + amp["hot_columns"]] = False
        bias_error = (master_bias.data - fits.getdata(out / "truth" / f"bias_c{CCD:02d}.fits", qid))[good]
        assert float(np.sqrt(np.mean(bias_error**2))) < 1.5 * amp["read_noise_adu"] / np.sqrt(n)
        flat_error = (master_flat.data / fits.getdata(out / "truth" / f"flat_{FILTER}_c{CCD:02d}.fits", qid) - 1.0)[good]
        assert float(np.sqrt(np.mean(flat_error**2))) < 3e-3
        for column in amp["hot_columns"]:
            assert np.mean(master_bias.mask[:, column] & masks.HOT > 0) >= 0.95
        for column in amp["dead_columns"]:
            assert np.mean(master_flat.mask[:, column] & masks.DEAD > 0) >= 0.95
        assert np.mean((master_bias.mask | master_flat.mask)[good] != 0) < 1e-3
