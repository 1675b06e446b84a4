"""`streamer sim generate` options that reach generate_night: bad values are one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(("option", "value", "expected"), [("--pocket", "v9", "pocket"), ("--filters", "zg,zq", "filters"), ("--flat-filters", "zr,zq", "flat_filters")])
def test_a_bad_simulator_option_is_one_line(tmp_path: Path, option: str, value: str, expected: str) -> None:
    command = [sys.executable, "-m", "streamer.cli", "sim", "generate", "--out", str(tmp_path / "a"), "--night",
               "2020-09-24", "--shape", "small", "--exposures", "1", option, value]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and expected in result.stderr and "Traceback" not in result.stderr


def test_response_levels_are_written_to_the_truth_and_fixed_for_the_archive(tmp_path: Path) -> None:
    """--response-levels: per-CCD and per-amplifier levels in the truth, the LED flats showing each CCD's level,
    and a second night of the archive without them refused (the instrument is the same every night)."""
    import json

    import numpy as np
    from astropy.io import fits

    out = tmp_path / "a"
    base = [sys.executable, "-m", "streamer.cli", "sim", "generate", "--out", str(out), "--shape", "small",
            "--exposures", "1", "--ccds", "1,16", "--filters", "zr", "--flats-per-led", "1", "--biases", "1"]  # fmt: skip
    first = subprocess.run([*base, "--night", "2020-09-24", "--response-levels"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    params = json.loads((out / "truth" / "params.json").read_text())
    assert params["response_levels"] is True
    response = params["nights"]["2020-09-24"]["response"]
    ccd_levels = {int(c): v for c, v in response["ccd_levels"].items()}
    assert set(ccd_levels) == {1, 16} and all(0.95 <= v <= 1.05 for v in ccd_levels.values())
    assert all(0.97 <= v <= 1.03 for amps in response["amplifier_levels"].values() for v in amps.values())
    # the raw LED flats of a CCD carry its level: the ratio of the two CCDs' flats of one LED, read back from
    # the raw files (overscan-subtracted by hand, a plain median), against the ratio of the recorded levels
    medians = {}
    for ccdid in (1, 16):
        (path,) = sorted(out.rglob(f"*_c{ccdid:02d}_f.fits.fz"))[:1]
        with fits.open(path) as hdus:
            medians[ccdid] = float(np.median([
                np.median(hdus[q].data.astype(np.float64)) - np.median(hdus[q + 4].data.astype(np.float64)[:, 5:25])
                for q in (1, 2, 3, 4)
            ]))  # fmt: skip
    sky = response["sky_levels"]["zr"]
    assert medians[1] / medians[16] == pytest.approx(sky["1"] / sky["16"], rel=0.01)
    assert abs(sky["1"] / sky["16"] - 1) > 0.01  # the check above could tell
    second = subprocess.run([*base, "--night", "2020-09-25"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and second.stderr.count("\n") == 1 and "response levels" in second.stderr


def test_flat_filters_choose_which_led_flats_are_taken(tmp_path: Path) -> None:
    """--flat-filters zr: the night's flats are the 4 zr LEDs' (7-10, ILUM_LED), none of zg's or zi's; "" takes none."""
    from astropy.io import fits

    base = [sys.executable, "-m", "streamer.cli", "sim", "generate", "--night", "2020-09-24", "--shape", "small",
            "--exposures", "1", "--filters", "zr", "--flats-per-led", "1", "--biases", "1"]  # fmt: skip
    chosen = subprocess.run([*base, "--out", str(tmp_path / "zr"), "--flat-filters", "zr"], capture_output=True, text=True, timeout=300)
    assert chosen.returncode == 0, chosen.stderr
    flats = sorted((tmp_path / "zr").rglob("*_f.fits.fz"))
    leds = sorted(int(fits.getheader(path, 0)["ILUM_LED"]) for path in flats)
    assert leds == [7, 8, 9, 10]
    none = subprocess.run([*base, "--out", str(tmp_path / "none"), "--flat-filters", ""], capture_output=True, text=True, timeout=300)
    assert none.returncode == 0, none.stderr
    assert not list((tmp_path / "none").rglob("*_f.fits.fz"))
    assert list((tmp_path / "none").rglob("*_o.fits.fz"))  # the science exposure is still there
