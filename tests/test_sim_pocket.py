"""The simulator's pocket effect: injected in the serial register, per amplifier, with known parameters.

The reference is the numpy forward model (``pocket.forward_reference``, not the compiled kernel the
simulator runs) applied to the simulator's own noiseless signal, and the parameters are read from the
shipped table's text.
"""

from __future__ import annotations

import datetime as dt
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamer.detrend import pocket
from streamer.detrend.readout import to_readout
from streamer.sim import pixels
from streamer.sim.generate import NightTruth, generate_night
from streamer.sim.pixels import Amplifier, Drift, raw_quadrant

NIGHT = dt.date(2020, 9, 24)  # period 3 of the readout electronics
CCD = 6
OVERSCAN = 30
ROWS, COLS = 24, 64
SKY = 150.0


def _shipped(ccdid: int, qid: int) -> pocket.Parameters:
    text = resources.files("streamer.detrend").joinpath("data/pocket_v0.1.txt").read_text()
    for line in text.splitlines():
        parts = line.split()
        if parts and not parts[0].startswith("#") and (int(parts[0]), int(parts[1])) == (ccdid, qid):
            alpha, cmax, beta, nmax = map(float, parts[2:6])
            return pocket.Parameters(alpha=alpha, cmax=cmax, beta=beta, nmax=nmax)
    raise AssertionError(f"no row for CCD {ccdid} q{qid}")


# ---------------------------------------------------------------- one quadrant, controlled signal


def _quadrant(signal: np.ndarray | None, qid: int, p: pocket.Parameters | None) -> tuple[np.ndarray, np.ndarray]:
    """Raw data and overscan (float, bias level removed) of a quadrant with no noise to speak of: a
    gain of 1e6 e-/ADU makes the photon noise 0.01 ADU; no read noise, drift, structure or nonlinearity."""
    amp = Amplifier(ccdid=CCD, qid=qid, gain=1e6, read_noise_e=0.0, bias_level=1000.0, dead_columns=(), hot_columns=(), hot_excess=())
    raw = raw_quadrant(
        None if signal is None else signal.astype(np.float32), amp, (0.0, 0.0), Drift(0.0, 1.0, 0.0, 0.0),
        np.zeros((ROWS, COLS), dtype=np.float32), OVERSCAN, np.random.default_rng(1), np.random.default_rng(2), pocket=p,
    )  # fmt: skip
    return raw.data.astype(np.float64) - 1000.0, raw.overscan.astype(np.float64) - 1000.0


def _scene_readout() -> np.ndarray:
    """Rows in readout order: sky only (rows 0-7), a bright star read last (8-15), one read mid-row (16-23)."""
    scene = np.full((ROWS, COLS), SKY)
    scene[8:16, COLS - 3 :] += np.array([4000.0, 12000.0, 20000.0])
    scene[16:24, 30:33] += np.array([4000.0, 12000.0, 20000.0])
    return scene


@pytest.mark.parametrize("qid", [1, 3])
def test_the_pocket_raises_the_overscan_behind_a_bright_star_and_lowers_the_first_columns(qid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows in readout order through one quadrant (q3: rows and columns flipped on the stored grid)."""
    monkeypatch.setattr(pixels, "TRAIL_FRACTION", 0.0)  # the simulator's other overscan trail, off to see the pocket alone
    p = _shipped(CCD, qid)
    scene = _scene_readout()
    stored = to_readout(scene, qid)  # its own inverse: the stored grid of a readout-order scene
    data, overscan = _quadrant(stored, qid, p)
    data_plain, overscan_plain = _quadrant(stored, qid, None)
    effect = np.concatenate([to_readout(data - data_plain, qid), to_readout(overscan - overscan_plain, qid)], axis=1)
    true = np.concatenate([scene, np.zeros((ROWS, OVERSCAN))], axis=1)
    predicted = pocket.forward_reference(true, p)[0] - true
    # each raw value is rounded to an integer: the difference of two is within 1 ADU of the model
    np.testing.assert_allclose(effect, predicted, atol=1.01)

    sky_rows, end_rows, mid_rows = slice(0, 8), slice(8, 16), slice(16, 24)
    first_overscan = to_readout(overscan, qid)[:, :5].mean(axis=1)
    raised = first_overscan[end_rows].mean() - first_overscan[sky_rows].mean()
    assert raised > 30  # ADU: the pocket filled by the star empties into the overscan
    assert raised == pytest.approx(predicted[end_rows, COLS : COLS + 5].mean() - predicted[sky_rows, COLS : COLS + 5].mean(), abs=1)
    # a star read mid-row: the pocket is back at the sky's equilibrium long before the overscan
    assert abs(first_overscan[mid_rows].mean() - first_overscan[sky_rows].mean()) < 1
    # the pocket starts every row empty: it fills from the first pixels read
    first_columns = to_readout(data, qid)[sky_rows, :3].mean(axis=0) - SKY
    assert first_columns[0] < -50 and first_columns[0] < first_columns[1] < first_columns[2] < 0
    np.testing.assert_allclose(first_columns, predicted[sky_rows, :3].mean(axis=0), atol=1)


def test_a_bias_has_no_charge_for_the_pocket() -> None:
    p = _shipped(CCD, 1)
    with_pocket, without = _quadrant(None, 1, p), _quadrant(None, 1, None)
    np.testing.assert_array_equal(with_pocket[0], without[0])
    np.testing.assert_array_equal(with_pocket[1], without[1])


# ---------------------------------------------------------------- a generated night


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> tuple[NightTruth, NightTruth]:
    kwargs = {"ccds": (CCD,), "n_exposures": 1, "flats_per_led": 1, "n_biases": 1, "seed": 4, "shape": "small", "flat_filters": ("zg",)}
    plain = generate_night(tmp_path_factory.mktemp("plain"), NIGHT, **kwargs)  # type: ignore[arg-type]
    injected = generate_night(tmp_path_factory.mktemp("pocket"), NIGHT, pocket="v0.1", **kwargs)  # type: ignore[arg-type]
    return plain, injected


def test_the_truth_records_the_injected_parameters(nights: tuple[NightTruth, NightTruth]) -> None:
    plain, injected = nights
    assert "pocket" not in plain.params["nights"][NIGHT.isoformat()]
    record = injected.params["nights"][NIGHT.isoformat()]["pocket"]
    assert record["model"] == "v0.1"
    for qid in (1, 2, 3, 4):
        p = _shipped(CCD, qid)
        assert record["parameters"][str(CCD)][str(qid)] == {"alpha": p.alpha, "cmax": p.cmax, "beta": p.beta, "nmax": p.nmax}


def test_the_injected_trail_is_the_forward_model_of_the_noiseless_truth(nights: tuple[NightTruth, NightTruth]) -> None:
    """Same seed, same noise: the raw science frame with the pocket less the one without is the pocket
    alone, compared with the forward model of the noiseless signal (sciimg x truth flat). The photon
    noise (about 5 ADU a sky pixel) moves the pocket's content a little, hence the tolerances."""
    plain, injected = nights
    science = plain.raw_relpaths("object")[0]
    exposure = next(e for e in injected.exposures if e.imgtype == "object")
    with fits.open(plain.out / science) as a, fits.open(injected.out / science) as b, fits.open(
        injected.out / "truth" / f"flat_{exposure.filtercode}_c{CCD:02d}.fits"
    ) as flats:
        for qid in (1, 2, 3, 4):
            sciimg = exposure.raw_name(CCD).sci(qid, "sciimg.fits").relpath
            noiseless = fits.getdata(injected.out / sciimg).astype(np.float64) * flats[qid].data
            columns = noiseless.shape[1]
            true = np.concatenate([to_readout(noiseless, qid), np.zeros((noiseless.shape[0], OVERSCAN))], axis=1)
            predicted = pocket.forward_reference(true, _shipped(CCD, qid))[0] - true
            measured = np.concatenate(
                [to_readout(b[qid].data - a[qid].data.astype(np.float64), qid),
                 to_readout(b[qid + 4].data - a[qid + 4].data.astype(np.float64), qid)], axis=1,
            )  # fmt: skip
            overscan_rise = measured[:, columns : columns + 5].mean(axis=1)
            assert overscan_rise.min() > 20  # ADU: the sky alone fills the pocket, which empties into the overscan
            assert np.sqrt(np.mean((overscan_rise - predicted[:, columns : columns + 5].mean(axis=1)) ** 2)) < 1.0
            assert measured[:, 0].mean() < -50  # the deficit of the first pixel read
            assert measured[:, 0].mean() == pytest.approx(predicted[:, 0].mean(), abs=2)



def test_the_hot_columns_of_a_bias_are_charge_through_the_pocket(nights: tuple[NightTruth, NightTruth]) -> None:
    """A bias holds no charge but the hot columns' dark current: with the pocket, the bias less its
    pocket-free twin is the forward model of those columns alone (1 ADU: the rounding of the two, and
    the nonlinearity, which the hot excess now goes through, a few 0.1 ADU at 2000 ADU)."""
    plain, injected = nights
    bias = plain.raw_relpaths("bias")[0]
    with fits.open(plain.out / bias) as a, fits.open(injected.out / bias) as b:
        for qid in (1, 2, 3, 4):
            amp = injected.params["amplifiers"][str(CCD)][str(qid)]
            charge = np.zeros(a[qid].data.shape)
            charge[:, amp["hot_columns"]] = amp["hot_excess_adu"]
            true = np.concatenate([to_readout(charge, qid), np.zeros((charge.shape[0], OVERSCAN))], axis=1)
            predicted = pocket.forward_reference(true, _shipped(CCD, qid))[0] - true
            measured = np.concatenate(
                [to_readout(b[qid].data - a[qid].data.astype(np.float64), qid),
                 to_readout(b[qid + 4].data - a[qid + 4].data.astype(np.float64), qid)], axis=1,
            )  # fmt: skip
            assert predicted.min() < -20 and predicted.max() > 5  # taken from the hot column, given back after it
            np.testing.assert_allclose(measured, predicted, atol=1.5)


def test_a_night_before_the_first_period_gets_no_pocket(tmp_path: Path) -> None:
    early = dt.date(2018, 2, 1)
    kwargs = {"ccds": (CCD,), "n_exposures": 1, "flats_per_led": 0, "n_biases": 0, "seed": 4, "shape": "small"}
    plain = generate_night(tmp_path / "plain", early, **kwargs)  # type: ignore[arg-type]
    injected = generate_night(tmp_path / "pocket", early, pocket="v0.1", **kwargs)  # type: ignore[arg-type]
    assert injected.params["nights"][early.isoformat()]["pocket"]["parameters"][str(CCD)] == {str(q): None for q in (1, 2, 3, 4)}
    science = plain.raw_relpaths("object")[0]
    with fits.open(plain.out / science) as x, fits.open(injected.out / science) as y:
        assert all(np.array_equal(x[h].data, y[h].data) for h in range(1, 9))
