"""Starflat comparison: the fit on synthetic catalogues with known responses, then end to end on the
simulator's dithered starflat sequence, whose per-quadrant responses the LED flats do not see."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from e2e import NIGHT, backfill_args, config_for, run_cli
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night
from streamer.work import starflat

CCDS = (13, 14)  # side by side: a dither of half a quadrant carries stars from one to the other


def _synthetic_tables(seed: int, n_stars: int = 400, n_exposures: int = 9) -> tuple[list[pa.Table], dict[int, float]]:
    """Catalogues of stars seen by 8 quadrants over dithered exposures, with injected responses."""
    rng = np.random.default_rng(seed)
    rcids = np.arange(48, 56)
    response = dict(zip(rcids.tolist(), (1.0 + rng.normal(0, 0.01, rcids.size)).tolist(), strict=True))
    true_flux = 10 ** rng.uniform(3.0, 5.0, n_stars)
    tables = []
    for e in range(n_exposures):
        on = rng.random(n_stars) < 0.7
        quadrant = rng.choice(rcids, n_stars)
        transparency = 10 ** (-0.4 * rng.normal(0, 0.05))
        flux = true_flux * transparency * np.array([response[int(q)] for q in quadrant])
        error = np.sqrt(flux + 400.0)
        measured = flux + rng.normal(0, 1, n_stars) * error
        measured[rng.random(n_stars) < 0.01] *= 3.0  # a few blends or cosmic rays: to be clipped
        tables.append(pa.table({
            "source_id": np.arange(n_stars)[on], "expid": np.full(on.sum(), 1000 + e), "rcid": quadrant[on],
            "f_0": measured[on], "f_0_e": error[on], "f_0_f": np.zeros(on.sum(), np.int32), "r_0": np.full(on.sum(), 3.0),
        }))  # fmt: skip
    return tables, response


def _relative(values: dict[int, float]) -> dict[int, float]:
    mean = np.exp(np.mean(np.log(list(values.values()))))
    return {k: v / mean for k, v in values.items()}


def test_the_fit_recovers_injected_responses_within_its_errors() -> None:
    pulls = []
    for seed in range(6):
        tables, injected = _synthetic_tables(seed)
        solution = starflat.solve(starflat.collect(tables))
        truth = _relative(injected)
        assert solution.rejected > 0
        for q in solution.quadrants:
            assert abs(q.response - truth[q.rcid]) < 5 * q.error
            pulls.append((q.response - truth[q.rcid]) / q.error)
    assert 0.6 < float(np.std(pulls)) < 1.5  # errors neither hide nor inflate the scatter (48 pulls)


def test_a_catalogue_without_repeated_stars_is_a_clear_error() -> None:
    table = pa.table({"source_id": [1, 2], "expid": [1, 1], "rcid": [0, 1], "f_0": [1e4, 1e4], "f_0_e": [10.0, 10.0],
                      "f_0_f": [0, 0], "r_0": [3.0, 3.0]})  # fmt: skip
    with pytest.raises(ValueError, match="measured twice"):
        starflat.solve(starflat.collect([table]))


def _fit_table(path: Path) -> dict[int, tuple[float, float]]:
    with open(path, newline="") as handle:
        return {int(r["rcid"]): (float(r["response"]), float(r["error"])) for r in csv.DictReader(handle)}


def _recovered(fit: dict[int, tuple[float, float]], injected: dict[int, float]) -> None:
    assert set(fit) == set(injected)
    differences = [fit[r][0] - injected[r] for r in injected]
    errors = [fit[r][1] for r in injected]
    rms = float(np.sqrt(np.mean(np.square(differences))))
    assert rms < max(0.002, float(np.sqrt(np.mean(np.square(errors))))), (differences, errors)


def test_the_simulated_starflat_sequence_gives_back_its_quadrant_responses(tmp_path: Path) -> None:
    """Two neighbouring CCDs of different sensitivities, one run with the focal-plane factors, both variants:
    the focal-plane variant gives back the residuals the LED flats do not see; the CCD variant gives
    them times each CCD's level (which its own flat normalised away)."""
    archive = tmp_path / "archive"
    generate_night(archive, NIGHT, ccds=CCDS, n_exposures=9, flats_per_led=2, n_biases=8, seed=3, shape="small",
                   jobs=2, filters=("zr",), flat_filters=("zr",), fields=(655,), starflat=True,
                   response_levels=True)  # fmt: skip
    with serve_archive(archive) as url:
        config = config_for(tmp_path, archive, url, budget=10**10)
        text = config.read_text()
        config.write_text(text.replace("\n[detrend]\n", '\n[detrend]\nflat_normalisation = "focalplane"\n', 1))
        result = run_cli(config, *backfill_args(ccds=CCDS))
        assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "starflat"
    result = run_cli(config, "starflat", "--start", NIGHT.isoformat(), "--end", NIGHT.isoformat(), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "zr (ccd)" in result.stdout and "zr (focalplane)" in result.stdout
    night = json.loads((archive / "truth" / "params.json").read_text())["nights"][NIGHT.isoformat()]
    residual = {4 * (c - 1) + int(q) - 1: r for c in CCDS for q, r in night["starflat"]["response"][str(c)].items()}
    level = {4 * (c - 1) + q - 1: night["response"]["sky_levels"]["zr"][str(c)] for c in CCDS for q in (1, 2, 3, 4)}
    injected = _relative(residual)
    assert max(injected.values()) - min(injected.values()) > 0.01, "the injected responses are too alike to show anything"
    assert abs(level[48] / level[52] - 1) > 0.01, "the CCD levels are too alike to show anything"
    _recovered(_fit_table(out / "starflat_focalplane_zr.csv"), injected)
    _recovered(_fit_table(out / "starflat_ccd_zr.csv"), _relative({r: residual[r] * level[r] for r in residual}))
    for variant in ("ccd", "focalplane"):
        assert (out / f"starflat_{variant}_zr.png").stat().st_size > 1000
    injected = _relative({r: residual[r] * level[r] for r in residual})  # what the catalogues' zero-points show
    # the night's QA report shows the same pattern in its per-quadrant zero-points (ZP grows by 2.5 log10 R)
    report = run_cli(config, "report", "--night", NIGHT.isoformat(), "--out", str(tmp_path / "report"), "--json")
    assert report.returncode == 0, report.stderr
    zero_points = json.loads(report.stdout)["zero_points"]
    by_exposure: dict[int, dict[int, float]] = {}
    for zp in zero_points:
        by_exposure.setdefault(zp["expid"], {})[zp["rcid"]] = zp["zp"]
    complete = [zps for zps in by_exposure.values() if set(zps) == set(injected)]
    assert len(complete) >= 5
    offsets = {rcid: float(np.mean([zps[rcid] - np.mean(list(zps.values())) for zps in complete])) for rcid in injected}
    expected = {rcid: 2.5 * np.log10(r) for rcid, r in injected.items()}  # injected is already relative to its mean
    residuals = np.array([offsets[r] - expected[r] for r in injected])
    # mag; the pattern spans 0.08 mag. The report's zero-point of a quadrant-exposure is a median over its
    # stars (the seeds here give residuals of 0.004 mag rms, 0.010 at most)
    assert float(np.sqrt(np.mean(residuals**2))) < 0.006 and float(np.max(np.abs(residuals))) < 0.015, residuals
    elsewhere = run_cli(config, "starflat", "--start", "2021-01-01", "--end", "2021-01-02", "--out", str(out))
    assert elsewhere.returncode == 1 and "no catalogue on disk" in elsewhere.stderr and elsewhere.stderr.count("\n") == 1


def test_no_ledger_is_one_line(tmp_path: Path, minimal_config: Path) -> None:
    result = run_cli(minimal_config, "starflat", "--start", "2020-01-01", "--end", "2020-01-02", "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "no ledger yet" in result.stderr
