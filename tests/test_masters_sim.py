"""Masters and science detrending against the simulator's truth (small shape, one CCD, one night)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import pickle
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from streamer.config import DetrendConfig
from streamer.detrend import masks
from streamer.detrend.calibrate import detrend_science, fit_overscan
from streamer.detrend.nonlinearity import coefficients
from streamer.formats.masters import (
    master_quadrants,
    read_master,
    read_master_header,
    read_master_quadrant_header,
)
from streamer.formats.raw import QuadrantReadError, open_raw
from streamer.rules.bias import biases_to_use
from streamer.sim.generate import generate_night
from streamer.sim.pixels import Drift
from streamer.storage.atomic import is_unfinished_name
from streamer.work.masters import (
    IncompleteCalibration,
    LedFlatResult,
    MasterResult,
    build_led_flat,
    build_master_bias,
    combine_master_flat,
)

NIGHT = dt.date(2020, 9, 24)
CCD = 13
FILTER = "zg"
N_BIASES = 16
# The simulator's row drift is up to 1.5 periods of a sine plus a slope: a cubic (ztfimg's
# degree) leaves up to 2.5 ADU rms; the default degree 8 follows it (see BENCHMARKS.md).
CONFIG = DetrendConfig(bias_skip_first=10, min_bias_frames=5)


@dataclasses.dataclass(frozen=True)
class Built:
    out: Path
    work: Path
    params: dict[str, Any]
    raws: dict[str, list[str]]
    by_led: dict[int, list[str]]
    bias: MasterResult
    led_flats: dict[int, LedFlatResult]
    flat: MasterResult


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("sim")
    generate_night(
        out, NIGHT, ccds=(CCD,), n_exposures=2, flats_per_led=5, n_biases=N_BIASES, shape="small", seed=3,
        filters=(FILTER,), flat_filters=(FILTER,),
    )
    params = json.loads((out / "truth" / "params.json").read_text())
    raws: dict[str, list[str]] = defaultdict(list)
    for path in sorted(out.glob("raw/**/*.fits.fz")):
        raws[path.name.split("_")[-1].split(".")[0]].append(str(path))
    by_led: dict[int, list[str]] = defaultdict(list)
    for path in raws["f"]:
        by_led[int(fits.getheader(path, 0)["ILUM_LED"])].append(path)
    work = tmp_path_factory.mktemp("masters")
    used_biases = biases_to_use(raws["b"], CONFIG.bias_skip_first, order=os.path.basename)
    bias = build_master_bias(used_biases, str(work / "bias.fits"), night=NIGHT, ccdid=CCD, detrend=CONFIG, provenance={"config_hash": "abc"})
    led_flats = {
        led: build_led_flat(
            paths, bias.path, str(work / f"led{led}.fits"), led=led, night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG
        )
        for led, paths in sorted(by_led.items())
    }
    flat = combine_master_flat(
        {led: r.path for led, r in led_flats.items()}, str(work / "flat.fits"), night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG
    )
    return Built(out, work, params, dict(raws), dict(by_led), bias, led_flats, flat)


def amplifier(built: Built, qid: int) -> dict[str, Any]:
    result: dict[str, Any] = built.params["amplifiers"][str(CCD)][str(qid)]
    return result


def good_columns(built: Built, qid: int, shape: tuple[int, int]) -> np.ndarray:
    amp = amplifier(built, qid)
    good = np.ones(shape, dtype=bool)
    good[:, amp["dead_columns"] + amp["hot_columns"]] = False
    return good


@pytest.mark.parametrize("qid", [1, 2, 3, 4])
def test_master_bias_within_the_read_noise_limit(built: Built, qid: int) -> None:
    data, variance, _ = read_master(built.bias.path, qid)
    truth = fits.getdata(built.out / "truth" / f"bias_c{CCD:02d}.fits", qid)
    n = len(built.bias.frames_used)
    assert n == N_BIASES - CONFIG.bias_skip_first
    limit = amplifier(built, qid)["read_noise_adu"] / np.sqrt(n)
    good = good_columns(built, qid, data.shape)
    error = (data - truth)[good]
    assert float(np.sqrt(np.mean(error**2))) < 1.5 * limit
    # the variance map is honest: its mean predicts the squared error within 25 %
    assert float(np.mean(variance[good])) == pytest.approx(float(np.mean(error**2)), rel=0.25)


@pytest.mark.parametrize("qid", [1, 2, 3, 4])
def test_master_flat_within_0p3_percent_of_the_injected_flat(built: Built, qid: int) -> None:
    data, variance, _ = read_master(built.flat.path, qid)
    truth = fits.getdata(built.out / "truth" / f"flat_{FILTER}_c{CCD:02d}.fits", qid)
    good = good_columns(built, qid, data.shape)
    relative = (data / truth - 1.0)[good]
    assert float(np.sqrt(np.mean(relative**2))) < 3e-3
    assert float(np.mean(variance[good])) == pytest.approx(float(np.mean((data - truth)[good] ** 2)), rel=0.25)


def test_own_masks_find_injected_dead_and_hot_columns(built: Built) -> None:
    found = injected = false_flags = good_pixels = 0
    for qid in (1, 2, 3, 4):
        amp = amplifier(built, qid)
        bias_mask = read_master(built.bias.path, qid).mask
        flat_mask = read_master(built.flat.path, qid).mask
        for column in amp["hot_columns"]:
            found += int(np.count_nonzero(bias_mask[:, column] & masks.HOT))
            injected += bias_mask.shape[0]
        for column in amp["dead_columns"]:
            found += int(np.count_nonzero(flat_mask[:, column] & masks.DEAD))
            injected += flat_mask.shape[0]
        good = good_columns(built, qid, flat_mask.shape)
        false_flags += int(np.count_nonzero((bias_mask | flat_mask)[good]))
        good_pixels += int(good.sum())
    assert found / injected >= 0.95
    assert false_flags / good_pixels < 1e-3


def test_overscan_drift_removed(built: Built) -> None:
    exposures = {e["filefracday"]: e for e in built.params["nights"][NIGHT.isoformat()]["exposures"]}
    residuals = []
    for path in built.raws["b"][:3] + built.raws["o"]:
        exposure = exposures[os.path.basename(path).split("_")[1]]
        with open_raw(path) as raw:
            for qid in (1, 2, 3, 4):
                overscan = raw.overscan(qid)
                model = fit_overscan(overscan, qid, config=CONFIG, nonlinearity_coefficients=coefficients(NIGHT, CCD, qid))
                drift = Drift(**exposure["drift"][str(CCD)][str(qid)]).rows(overscan.shape[0])
                drift_stored = drift[::-1] if qid in (3, 4) else drift  # the simulator's stored row order
                truth = amplifier(built, qid)["bias_level_adu"] + drift_stored
                residuals.append(float(np.sqrt(np.mean((model.level_stored - truth) ** 2))))
    assert max(residuals) < 0.5


def test_science_detrending_against_the_noise_free_model(built: Built) -> None:
    pulls = []
    for path in built.raws["o"]:
        with open_raw(path) as raw:
            for qid in (1, 2, 3, 4):
                quadrant = raw.quadrant(qid)
                sciimg = Path(path.replace("/raw/", "/sci/").replace("_o.fits.fz", f"_o_q{qid}_sciimg.fits"))
                model = fits.getdata(sciimg)
                result = detrend_science(
                    quadrant.data, quadrant.overscan, qid, config=CONFIG,
                    nonlinearity_coefficients=coefficients(NIGHT, CCD, qid),
                    master_bias=read_master(built.bias.path, qid), master_flat=read_master(built.flat.path, qid),
                    gain=quadrant.gain or 0.0, read_noise=quadrant.read_noise or 0.0, saturate=fits.getheader(sciimg)["SATURATE"],
                )
                good = result.mask == 0
                assert good.mean() > 0.98
                pulls.append((result.image[good] - model[good]) / np.sqrt(result.variance[good]))
    pull = np.concatenate(pulls)
    assert abs(float(np.mean(pull))) < 0.05
    assert float(np.std(pull)) == pytest.approx(1.0, abs=0.03)


def test_master_files_record_provenance_and_are_compact(built: Built) -> None:
    header = read_master_header(built.flat.path)
    assert header["MKIND"] == "flat" and header["NIGHT"] == NIGHT.isoformat() and header["CCD_ID"] == CCD
    assert header["FILTER"] == FILTER and header["LEDS"] == "2,3,4,5" and header["PKGVERS"]
    assert {header[f"LEV{led:02d}"] for led in (2, 3, 4, 5)} == {r.level for r in built.led_flats.values()}
    bias_header = read_master_header(built.bias.path)
    assert bias_header["CFGHASH"] == "abc" and bias_header["NFRAMES"] == len(built.bias.frames_used)
    assert [bias_header[f"FRAME{i:03d}"] for i in range(1, 7)] == list(built.bias.frames_used)
    assert master_quadrants(built.bias.path) == (1, 2, 3, 4)
    assert read_master_quadrant_header(built.bias.path, 2)["NFRAMES"] == 6
    raw_bytes = 4 * 260 * 256 * 4 * 3  # data, variance, mask as float32, uncompressed
    assert os.path.getsize(built.flat.path) < raw_bytes / 3
    assert not [p for p in os.listdir(built.work) if is_unfinished_name(p)]


def test_results_pickle(built: Built) -> None:
    for result in (built.bias, built.flat, *built.led_flats.values()):
        assert pickle.loads(pickle.dumps(result)) == result
    assert pickle.loads(pickle.dumps(CONFIG)) == CONFIG
    for error in (IncompleteCalibration("x"), QuadrantReadError("p", 2, "why")):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)


def test_too_few_biases_after_the_skip(built: Built, tmp_path: Path) -> None:
    used = biases_to_use(built.raws["b"], CONFIG.bias_skip_first, order=os.path.basename)
    assert len(used) == N_BIASES - CONFIG.bias_skip_first == 6
    with pytest.raises(IncompleteCalibration, match="6 biases: fewer than the 7 required"):
        build_master_bias(
            used, str(tmp_path / "b.fits"), night=NIGHT, ccdid=CCD, detrend=dataclasses.replace(CONFIG, min_bias_frames=7)
        )
    assert not list(tmp_path.iterdir())


def test_too_few_flats_for_an_led(built: Built, tmp_path: Path) -> None:
    with pytest.raises(IncompleteCalibration, match="LED 2: 1 flats"):
        build_led_flat(built.by_led[2][:1], built.bias.path, str(tmp_path / "l.fits"), led=2, night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG)
    with pytest.raises(IncompleteCalibration, match="no LED flat"):
        combine_master_flat({}, str(tmp_path / "f.fits"), night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG)


def test_filter_with_an_led_missing_records_the_leds_used(built: Built, tmp_path: Path) -> None:
    present = {led: r.path for led, r in built.led_flats.items() if led != 4}
    result = combine_master_flat(present, str(tmp_path / "f.fits"), night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG)
    assert result.leds_used == (2, 3, 5)
    assert read_master_header(result.path)["LEDS"] == "2,3,5"
    weighted = combine_master_flat(
        present, str(tmp_path / "w.fits"), night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG, weights={2: 2.0, 3: 1.0, 5: 1.0}
    )
    assert weighted.led_weights == ((2, 2.0), (3, 1.0), (5, 1.0))
    led = {n: read_master(built.led_flats[n].path, 1).data for n in (2, 3, 5)}
    np.testing.assert_allclose(read_master(weighted.path, 1).data, (2 * led[2] + led[3] + led[5]) / 4, rtol=2e-4, atol=2e-4)


def corrupt_quadrant(source: str, target: Path, hdu_index: int) -> None:
    """Copy a raw file with random bytes written into one HDU's compressed data."""
    shutil.copy(source, target)
    with fits.open(target) as hdul:
        info = hdul.fileinfo(hdu_index)
    content = bytearray(target.read_bytes())
    start = info["datLoc"] + info["datSpan"] // 4
    content[start : start + 2000] = np.random.default_rng(hdu_index).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(content))


def test_a_corrupt_quadrant_loses_that_quadrant_only(built: Built, tmp_path: Path) -> None:
    paths = biases_to_use(built.raws["b"], CONFIG.bias_skip_first, order=os.path.basename)
    broken = tmp_path / os.path.basename(paths[-1])
    corrupt_quadrant(paths[-1], broken, 2)
    paths[-1] = str(broken)
    result = build_master_bias(paths, str(tmp_path / "b.fits"), night=NIGHT, ccdid=CCD, detrend=CONFIG)
    assert result.quadrants == (1, 2, 3, 4)
    assert dict(result.frames_rejected)[broken.name].startswith("quadrant 2:")
    assert read_master_quadrant_header(result.path, 2)["NFRAMES"] == 5
    assert read_master_quadrant_header(result.path, 1)["NFRAMES"] == 6

    # every frame's quadrant 3 unreadable: the master has the other three
    for i, path in enumerate(list(paths)):
        target = tmp_path / f"all_{i:02d}_{os.path.basename(path)}"
        corrupt_quadrant(path, target, 3)
        paths[i] = str(target)
    result = build_master_bias(paths, str(tmp_path / "b3.fits"), night=NIGHT, ccdid=CCD, detrend=CONFIG)
    assert result.quadrants == (1, 2, 4)
    assert [qid for qid, _ in result.failed_quadrants] == [3]
    assert master_quadrants(result.path) == (1, 2, 4)


def test_band_by_band_decoding_gives_the_same_master(built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import streamer.work.masters as work_masters

    monkeypatch.setattr(work_masters, "RAW_BUDGET_BYTES", 0)  # no whole quadrant held: row bands only
    used = biases_to_use(built.raws["b"], CONFIG.bias_skip_first, order=os.path.basename)
    result = build_master_bias(used, str(tmp_path / "b.fits"), night=NIGHT, ccdid=CCD, detrend=CONFIG)
    for qid in (1, 4):
        np.testing.assert_array_equal(read_master(result.path, qid).data, read_master(built.bias.path, qid).data)


def test_build_master_flat_in_one_call_skips_short_leds(built: Built, tmp_path: Path) -> None:
    from streamer.work.masters import build_master_flat

    by_led = {led: paths for led, paths in built.by_led.items()}
    by_led[5] = by_led[5][:1]  # too few frames for LED 5
    result = build_master_flat(by_led, built.bias.path, str(tmp_path / "f.fits"), night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG)
    assert result.leds_used == (2, 3, 4)
    assert result.frames_rejected[0][0] == "LED 5" and "fewer than the 2 required" in result.frames_rejected[0][1]
    assert sorted(os.listdir(tmp_path)) == ["f.fits"]
    with pytest.raises(IncompleteCalibration, match="no LED with at least 2 usable frames"):
        build_master_flat(
            {led: paths[:1] for led, paths in built.by_led.items()}, built.bias.path, str(tmp_path / "g.fits"),
            night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG,
        )
    assert sorted(os.listdir(tmp_path)) == ["f.fits"]


def test_frames_of_another_led_are_left_out(built: Built, tmp_path: Path) -> None:
    stranger = built.by_led[3][0]
    result = build_led_flat(
        built.by_led[2] + [stranger], built.bias.path, str(tmp_path / "l.fits"), led=2, night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG
    )
    assert dict(result.frames_rejected) == {os.path.basename(stranger): "quadrant 1: ILUM_LED = 3, expected 2"}
    assert len(result.frames_used) == len(built.by_led[2])
    with pytest.raises(IncompleteCalibration, match="no quadrant could be built"):
        build_led_flat(built.by_led[3], built.bias.path, str(tmp_path / "m.fits"), led=2, night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=CONFIG)
