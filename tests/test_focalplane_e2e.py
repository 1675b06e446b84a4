"""``flat_normalisation = "focalplane"`` through the real CLI on a small simulated night of 4 CCDs whose
sensitivities differ (``generate_night(response_levels=True)``: CCD and amplifier levels of a few per
cent under a focal-plane illumination, seen alike by the LEDs and the sky).

One backfill gives both variants: the catalogues hold the CCD-flatfielded fluxes and each CCD's
focal-plane factor (the ``focalplane_factor`` column). Against the simulator's truth, star by star:

- CCD-flatfielded, the per-CCD median of flux / true shows the injected per-CCD levels (the truth's
  ``response.sky_levels``), recovered within 0.2 %;
- focal-plane-flatfielded (flux / factor), it is the same on every CCD within 0.2 %.

The CCDs are chosen across the focal plane (two corners, two central), so that the illumination
differs between them as well as the CCD levels. The same night in the IN2P3 layout, with the
normalisation left to its default there (IN2P3 production: the focal-plane flat), holds our fluxes
divided by the factor; the detrended images of the focal-plane run are that variant too.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from e2e import NIGHT, backfill_args, config_for, run_cli, status_json, store_of
from in2p3_reader import apcat_path, in2p3_columns
from streamer.demo import serve_archive
from streamer.ledger.budget import most_flats_per_focalplane_job
from streamer.ledger.core import Ledger
from streamer.photometry import FLAG_MASKED
from streamer.sim.generate import generate_night

CCDS = (1, 6, 11, 16)
FILTER = "zr"
EXPOSURES = 3
UNLIMITED = 50 * 10**9
KEEP_MASTERS = '\n[[consumers]]\nname = "calibration"\nkeep = ["masters", "detrended"]\n'
RADIUS_PX = 3.0  # small: on small frames a larger aperture holds neighbours' light (issue 11's bias)
MIN_SNR = 50.0


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    generate_night(
        out, NIGHT, ccds=CCDS, n_exposures=EXPOSURES, flats_per_led=2, n_biases=8, seed=11, shape="small", jobs=2,
        fields=(655,), filters=(FILTER,), flat_filters=(FILTER,), response_levels=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def base_url(archive: Path) -> Iterator[str]:
    with serve_archive(archive) as url:
        yield url


class JsonCopier:
    """Copies every focal-plane JSON that appears under ``store/masters`` while a backfill runs
    (independent of the consumer that keeps it: it proves what the exposures could read)."""

    def __init__(self, store: Path, period: float = 0.02) -> None:
        self.store, self.period = store, period
        self.copies: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                found = sorted((self.store / "masters").rglob("*_focalplane.json"))
            except OSError:
                found = []
            for path in found:
                relpath = path.relative_to(self.store).as_posix()
                if relpath not in self.copies:
                    try:
                        self.copies[relpath] = json.loads(path.read_text())
                    except (OSError, ValueError):
                        continue
            self._stop.wait(self.period)

    def __enter__(self) -> JsonCopier:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def add_lines(config: Path, section: str, lines: str) -> None:
    text = config.read_text()
    assert f"\n[{section}]\n" in text
    config.write_text(text.replace(f"\n[{section}]\n", f"\n[{section}]\n{lines}\n", 1))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, archive: Path, base_url: str) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("run")
    config = config_for(tmp, archive, base_url, budget=UNLIMITED, name="focalplane.toml", extra=KEEP_MASTERS)
    add_lines(config, "detrend", 'flat_normalisation = "focalplane"\nwrite_detrended = true')
    with JsonCopier(store_of(config)) as copier:
        result = run_cli(config, *backfill_args(ccds=CCDS))
    assert result.returncode == 0, result.stdout + result.stderr
    return config, copier.copies


def _tables(store: Path) -> list[Any]:
    return [pq.read_table(p) for p in sorted((store / "apcat").rglob("*.parquet"))]


def _factors(copies: dict[str, dict[str, Any]]) -> dict[int, float]:
    (only,) = copies.values()
    assert only["filtercode"] == FILTER
    return {int(ccd): float(f) for ccd, f in only["factors"].items()}


def per_ccd_ratios(tables: list[Any], truth: Path) -> dict[int, tuple[float, float]]:
    """{ccdid: (median flux / true over exposures, its error)} at RADIUS_PX for unflagged stars of S/N >= MIN_SNR.

    Each exposure's ratios are divided by their mean over the CCDs first (the aperture's loss depends
    on the seeing of the exposure, not on the CCD); the error is the spread of the exposures' values.
    """
    stars = pq.read_table(truth / "stars.parquet").to_pylist()
    true_flux = {(int(s["filefracday"]), s["ccdid"], s["qid"], s["source_id"]): s["flux"] for s in stars}
    by_exposure: dict[int, dict[int, float]] = {}
    for table in tables:
        rows = table.to_pylist()
        k = min(range(len([c for c in table.column_names if c.startswith("r_")])), key=lambda i: abs(rows[0][f"r_{i}"] - RADIUS_PX))
        ratios = [
            r[f"f_{k}"] / true_flux[(r["filefracday"], r["ccdid"], r["qid"], r["source_id"])]
            for r in rows
            if r[f"f_{k}_f"] == 0 and r[f"f_{k}"] >= MIN_SNR * r[f"f_{k}_e"]
        ]
        assert len(ratios) >= 30, (rows[0]["filefracday"], rows[0]["ccdid"], len(ratios))
        by_exposure.setdefault(rows[0]["filefracday"], {})[rows[0]["ccdid"]] = float(np.median(ratios))
    assert len(by_exposure) == EXPOSURES and all(set(v) == set(CCDS) for v in by_exposure.values())
    normalised = {e: {c: v / np.mean(list(values.values())) for c, v in values.items()} for e, values in by_exposure.items()}
    out = {}
    for ccdid in CCDS:
        values = np.array([normalised[e][ccdid] for e in normalised])
        out[ccdid] = (float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values))))
    return out


def test_every_job_is_done_with_one_focalplane_job(run: tuple[Path, dict[str, Any]]) -> None:
    config, copies = run
    report = status_json(config)
    assert report["jobs"]["exposure"] == {"done": EXPOSURES * len(CCDS)}
    assert report["jobs"]["focalplane"] == {"done": 1}
    assert report["jobs"]["master_flat"] == {"done": len(CCDS)}
    assert all(set(states) == {"done"} for states in report["jobs"].values()), report["jobs"]
    assert sorted(copies) == [f"masters/2020/0924/ztf_20200924_{FILTER}_focalplane.json"]
    store = store_of(config)
    assert all((store / relpath).is_file() for relpath in copies)  # kept by the "calibration" consumer
    with sqlite3.connect(f"file:{store / 'ledger.sqlite'}?mode=ro", uri=True) as conn:
        (kind, state) = conn.execute("SELECT kind, state FROM files WHERE relpath = ?", (next(iter(copies)),)).fetchone()
    assert (kind, state) == ("masters", "on_disk")
    with Ledger.open(store / "ledger.sqlite", readonly=True) as ledger:
        assert most_flats_per_focalplane_job(ledger) == len(CCDS)  # counted in the minimum budget


def test_each_catalogue_records_its_ccds_factor(run: tuple[Path, dict[str, Any]]) -> None:
    config, copies = run
    factors = _factors(copies)
    assert set(factors) == set(CCDS)
    tables = _tables(store_of(config))
    assert len(tables) == EXPOSURES * len(CCDS)
    for table in tables:
        ccdid = table["ccdid"][0].as_py()
        assert set(table["focalplane_factor"].to_pylist()) == {factors[ccdid]}
        assert json.loads(table.schema.metadata[b"streamer"])["focalplane_factor"] == factors[ccdid]


def test_one_run_gives_both_variants_against_the_truth(run: tuple[Path, dict[str, Any]], archive: Path) -> None:
    """The acceptance of issue 11: CCD-flatfielded fluxes show the injected levels, focal-plane-flatfielded ones do not."""
    config, copies = run
    factors = _factors(copies)
    truth = json.loads((archive / "truth" / "params.json").read_text())
    levels = {int(c): v for c, v in truth["nights"][NIGHT.isoformat()]["response"]["sky_levels"][FILTER].items()}
    mean_level = np.mean(list(levels.values()))
    injected = {c: levels[c] / mean_level for c in CCDS}
    assert max(injected.values()) - min(injected.values()) > 0.02, injected  # the levels to recover are there

    measured = per_ccd_ratios(_tables(store_of(config)), archive / "truth")
    for ccdid in CCDS:
        ratio, error = measured[ccdid]
        assert error < 0.001, (ccdid, error)
        assert ratio == pytest.approx(injected[ccdid], abs=0.002), (ccdid, measured, injected)

    focal_plane = {c: measured[c][0] / factors[c] for c in CCDS}
    mean_fp = np.mean(list(focal_plane.values()))
    spread = max(focal_plane.values()) / mean_fp - min(focal_plane.values()) / mean_fp
    assert spread < 0.002, focal_plane


@pytest.fixture(scope="module")
def in2p3_run(tmp_path_factory: pytest.TempPathFactory, archive: Path, base_url: str) -> Path:
    tmp = tmp_path_factory.mktemp("in2p3")
    config = config_for(tmp, archive, base_url, budget=UNLIMITED, name="in2p3.toml")
    add_lines(config, "photometry", 'layout = "in2p3"')
    assert "flat_normalisation" not in config.read_text()
    result = run_cli(config, *backfill_args(ccds=CCDS))
    assert result.returncode == 0, result.stdout + result.stderr
    return config


def test_the_in2p3_layout_holds_the_focal_plane_variant_by_default(
    in2p3_run: Path, run: tuple[Path, dict[str, Any]]
) -> None:
    config, copies = run
    factors = _factors(copies)
    ours = {}
    for table in _tables(store_of(config)):
        for row in table.to_pylist():
            ours[(row["filefracday"], row["ccdid"], row["qid"], row["source_id"])] = row
    raws = sorted({(row["filefracday"], row["ccdid"]) for row in ours.values()})
    n_radii = len([c for c in next(iter(ours.values())) if c.startswith("r_")])
    compared = 0
    for ffd, ccdid in raws:
        raw = f"ztf_{ffd}_000655_{FILTER}_c{ccdid:02d}_o.fits.fz"
        for qid in (1, 2, 3, 4):
            path = Path(apcat_path(str(store_of(in2p3_run)), raw, qid))
            record = json.loads(pq.read_schema(path).metadata[b"streamer"])
            assert record["detrend_config"]["flat_normalisation"] == "focalplane"
            assert record["focalplane_factor"] == factors[ccdid]
            read = pq.read_table(path, columns=in2p3_columns(n_radii)).to_pylist()
            for row in read:
                mine = ours[(ffd, ccdid, qid, row["source_id"])]
                for k in range(n_radii):
                    if not mine[f"f_{k}_f"] & FLAG_MASKED:
                        assert row[f"f_{k}"] == pytest.approx(mine[f"f_{k}"] / factors[ccdid], rel=1e-6)
                    assert row[f"f_{k}_e"] == pytest.approx(mine[f"f_{k}_e"] / factors[ccdid], rel=1e-6)
                compared += 1
    assert compared == len(ours)


def test_detrended_images_are_the_focal_plane_variant(run: tuple[Path, dict[str, Any]]) -> None:
    """Each kept image says its normalisation and factor; a plain sum over a disc of SCI minus the
    local median (a slow, obvious aperture) gives the catalogue's flux divided by the factor."""
    from astropy.io import fits

    config, copies = run
    factors = _factors(copies)
    store = store_of(config)
    images = sorted((store / "detrended").rglob("*_detrended.fits.fz"))
    assert len(images) == 4 * EXPOSURES * len(CCDS)
    rows = {}
    for table in _tables(store):
        for row in table.to_pylist():
            rows.setdefault((row["filefracday"], row["ccdid"], row["qid"]), []).append(row)
    ratios: dict[int, list[float]] = {c: [] for c in CCDS}
    for path in images:
        _, ffd, _field, _filt, ccd, _o, q, _ = path.name.split("_")
        ccdid, qid = int(ccd[1:]), int(q[1:])
        with fits.open(path) as hdus:
            assert hdus[0].header["FLATNORM"] == "focalplane"
            assert hdus[0].header["FPFACTOR"] == pytest.approx(factors[ccdid], rel=1e-9)
            sci = hdus["SCI"].data.astype(np.float64)
        yy, xx = np.mgrid[0 : sci.shape[0], 0 : sci.shape[1]]
        k = 9
        unflagged = [r for r in rows[(int(ffd), ccdid, qid)] if r[f"f_{k}_f"] == 0]
        for row in sorted(unflagged, key=lambda r: -r[f"f_{k}"])[:5]:
            distance = np.hypot(xx - row["x"], yy - row["y"])
            disc, annulus = distance <= row[f"r_{k}"], (distance > 20) & (distance < 30)
            background = float(np.nanmedian(sci[annulus]))
            ratios[ccdid].append(float((sci[disc] - background).sum()) / row[f"f_{k}"])
    # SCI / catalogue flux is 1 / factor on each CCD; this plain aperture has its own bias (a pixel-centre
    # disc, an annulus background), the same on every CCD, so the CCDs are compared with each other
    times_factor = {c: float(np.median(v)) * factors[c] for c, v in ratios.items()}
    mean = float(np.mean(list(times_factor.values())))
    assert all(v / mean == pytest.approx(1.0, abs=0.005) for v in times_factor.values()), (times_factor, factors)
    assert max(factors.values()) / min(factors.values()) > 1.03  # so that no division, or a product, would fail
