"""process_exposure end to end on the simulator's raw files, against its truth."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from streamer import photometry
from streamer.config import DetrendConfig, PhotometryConfig
from streamer.detrend.calibrate import MasterQuadrant
from streamer.formats import masters as masterio
from streamer.sim.generate import generate_night
from streamer.storage import paths
from streamer.storage.naming import RawName
from streamer.work import exposure as work

NIGHT = dt.date(2020, 9, 24)


def simulate(out: Path, shape: str, stars_per_quadrant: int, seed: int = 3) -> dict[str, Any]:
    """One science exposure of CCD 13 in zr, and masters made from the simulator's true bias and flat."""
    truth = generate_night(
        out, NIGHT, ccds=(13,), n_exposures=1, flats_per_led=0, n_biases=0, shape=shape,
        filters=("zr",), flat_filters=(), stars_per_quadrant=stars_per_quadrant, seed=seed,
    )  # fmt: skip
    raw_rel = next(p for p in truth.relpaths if p.startswith("raw/"))
    raw = out / raw_rel
    name = RawName(raw.name.split("_")[1], 655, "zr", 13, "o")
    masters = {}
    for kind, truth_file in (("bias", "bias_c13.fits"), ("flat", "flat_zr_c13.fits")):
        quadrants = {}
        with fits.open(out / "truth" / truth_file) as hdus:
            for qid in (1, 2, 3, 4):
                data = np.asarray(hdus[qid].data, dtype=np.float32)
                quadrants[qid] = MasterQuadrant(data, np.zeros_like(data), np.zeros(data.shape, np.uint16))
        path = out / "masters" / f"{kind}.fits"
        path.parent.mkdir(exist_ok=True)
        masterio.write_master(path, quadrants, primary_cards={"MKIND": kind, "NIGHT": NIGHT.isoformat(), "CCD_ID": 13})
        masters[kind] = path
    return {
        "out": out,
        "raw": raw,
        "name": name,
        "bias": masters["bias"],
        "flat": masters["flat"],
        "headers": {q: out / name.sci(q, "sciimg.fits").relpath for q in (1, 2, 3, 4)},
        "masks": {q: out / name.sci(q, "mskimg.fits").relpath for q in (1, 2, 3, 4)},
        "stars": truth.stars,
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return simulate(tmp_path_factory.mktemp("sim"), "small", 150)


def run(sim: dict[str, Any], root: Path, **changes: Any) -> work.ExposureResult:
    kwargs: dict[str, Any] = {
        "master_bias_path": sim["bias"],
        "master_flat_path": sim["flat"],
        "sciimg_header_paths": dict(sim["headers"]),
        "mask_paths": dict(sim["masks"]),
        "catalog_dir": sim["out"] / "refcat",
        "storage_root": root,
        "detrend_config": DetrendConfig(),
        "photometry_config": PhotometryConfig(catalog_dir=sim["out"] / "refcat"),
        "provenance": {"config_hash": "test"},
    }
    kwargs.update(changes)
    raw = kwargs.pop("raw_path", sim["raw"])
    return work.process_exposure(raw, **kwargs)


def joined(sim: dict[str, Any], apcat: Path) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The apcat and, row by row, the simulator's truth for the same star on the same quadrant."""
    table = pq.read_table(apcat)
    stars = sim["stars"]
    key = {(int(q), int(s)): i for i, (q, s) in enumerate(zip(stars["qid"].to_numpy(), stars["source_id"].to_numpy(), strict=True))}
    index = np.array([key.get((int(q), int(s)), -1) for q, s in zip(table["qid"].to_numpy(), table["source_id"].to_numpy(), strict=True)])
    assert np.all(index >= 0), "every measured star is a true star of that quadrant"
    truth = {name: stars[name].to_numpy()[index] for name in ("x", "y", "flux")}
    return table, truth


def check_fluxes(table: pa.Table, truth: dict[str, np.ndarray], n_radii: int, min_stars: int) -> None:
    """The acceptance: isolated, unflagged stars of S/N > 100 at the largest radius have median
    |flux / true - 1| < 0.5 % and a spread (1.4826 MAD) of (flux - true) / error in [0.8, 1.25].

    No aperture correction: the largest radius (12 px) holds all the flux of the simulated PSF
    (FWHM about 2.3 px) to far better than 1e-4.
    """
    big = n_radii - 1
    flux = table[f"f_{big}"].to_numpy()
    err = table[f"f_{big}_e"].to_numpy()
    good = table["isolated"].to_numpy() & (table[f"f_{big}_f"].to_numpy() == 0) & (flux / err > 100)
    assert good.sum() >= min_stars
    ratio = flux[good] / truth["flux"][good]
    assert np.median(np.abs(ratio - 1)) < 0.005
    pull = (flux[good] - truth["flux"][good]) / err[good]
    spread = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert 0.8 < spread < 1.25, spread


def check_fluxes_small(table: pa.Table, truth: dict[str, np.ndarray], min_stars: int = 5) -> None:
    """On a small frame few stars reach S/N 100: check the unflagged S/N > 10 stars without a
    significant true neighbour within 16 px agree with the truth within their errors.

    The small frame is five times as crowded as a real one (150 stars on 260 x 256 px), and the
    faint neighbours left in the apertures push the pulls up by up to about one sigma.
    """
    flux, err, flags = table["f_9"].to_numpy(), table["f_9_e"].to_numpy(), table["f_9_f"].to_numpy()
    qid, x, y, true_flux = table["qid"].to_numpy(), truth["x"], truth["y"], truth["flux"]
    crowded = np.array(
        [
            np.any((qid == qid[i]) & (np.hypot(x - x[i], y - y[i]) < 16) & (np.arange(len(x)) != i) & (true_flux > err[i] / 2))
            for i in range(len(x))
        ]
    )
    good = ~crowded & (flags == 0) & (flux / err > 10)
    assert good.sum() >= min_stars
    pull = (flux[good] - true_flux[good]) / err[good]
    assert -0.5 < np.median(pull) < 1.5
    assert 0.5 < 1.4826 * np.median(np.abs(pull - np.median(pull))) < 1.6


def test_small_exposure_recovers_the_simulated_fluxes(small: dict[str, Any], tmp_path: Path) -> None:
    result = run(small, tmp_path)
    assert result.lost == () and result.without_ipac_mask == ()
    assert Path(result.apcat_path) == tmp_path / paths.apcat_relpath(small["name"])
    table, truth = joined(small, Path(result.apcat_path))
    stars = small["stars"]
    assert table.num_rows == stars.num_rows  # every star whose centre is on a quadrant
    assert dict(result.rows) == {q: int(np.sum(stars["qid"].to_numpy() == q)) for q in (1, 2, 3, 4)}
    np.testing.assert_allclose(table["x"].to_numpy(), truth["x"], atol=1e-3)
    np.testing.assert_allclose(table["y"].to_numpy(), truth["y"], atol=1e-3)
    check_fluxes_small(table, truth)
    assert set(table["wcs_from_qid"].to_numpy()) == {1, 2, 3, 4}
    assert np.all(table["ipac_mask"].to_numpy())
    assert pickle.loads(pickle.dumps(result)) == result


def test_two_runs_give_identical_rows(small: dict[str, Any], tmp_path: Path) -> None:
    first = run(small, tmp_path / "a")
    second = run(small, tmp_path / "b", provenance={"config_hash": "other"})
    assert pq.read_table(first.apcat_path).equals(pq.read_table(second.apcat_path))


def rewrite_raw(source: Path, target: Path, qid: int, how: str) -> Path:
    """A copy of a raw file whose quadrant ``qid`` HDU is missing (empty) or has corrupt compressed bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if how == "missing":
        with fits.open(source) as hdus:
            copied = [hdus[0].copy()] + [hdu.copy() for hdu in hdus[1:]]
            copied[qid] = fits.ImageHDU(header=fits.Header({"AMP_ID": qid - 1}), name=str(qid))
            fits.HDUList(copied).writeto(target)
        return target
    shutil.copyfile(source, target)
    with fits.open(source) as hdus:
        info = hdus.fileinfo(qid)
        start, size = info["datLoc"], info["datSpan"]
    with open(target, "r+b") as handle:
        handle.seek(start + 64)
        handle.write(np.random.default_rng(0).integers(0, 256, max(size - 128, 16), dtype=np.uint8).tobytes())
    return target


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_a_bad_quadrant_hdu_loses_that_quadrant_only(small: dict[str, Any], tmp_path: Path, how: str) -> None:
    raw = rewrite_raw(small["raw"], tmp_path / "raw" / small["raw"].name, 2, how)
    result = run(small, tmp_path / "store", raw_path=raw)
    assert [q for q, _ in result.lost] == [2]
    assert sorted(q for q, _ in result.rows) == [1, 3, 4]
    table = pq.read_table(result.apcat_path)
    assert set(table["qid"].to_numpy()) == {1, 3, 4}
    intact = pq.read_table(run(small, tmp_path / "intact").apcat_path)
    others = pa.compute.not_equal(intact["qid"], 2)
    assert table.equals(intact.filter(others)), "the other quadrants' rows are those of the intact file"


def test_missing_header_loses_that_quadrant_with_its_reason(small: dict[str, Any], tmp_path: Path) -> None:
    """No sibling's WCS is borrowed (tests/test_camera_layout.py shows it is arcseconds off on real data)."""
    headers = dict(small["headers"])
    headers[1] = None
    result = run(small, tmp_path / "store", sciimg_header_paths=headers)
    assert [q for q, _ in result.lost] == [1] and "no IPAC sciimg header" in result.lost[0][1]
    assert sorted(q for q, _ in result.rows) == [2, 3, 4]
    table = pq.read_table(result.apcat_path)
    assert set(table["qid"].to_numpy()) == {2, 3, 4}
    assert set(table["wcs_from_qid"].to_numpy()) == {2, 3, 4}
    record = json.loads(pq.read_schema(result.apcat_path).metadata[b"streamer"])
    assert list(record["quadrants_lost"]) == ["1"]
    intact = pq.read_table(run(small, tmp_path / "intact").apcat_path)
    assert table.equals(intact.filter(pa.compute.not_equal(intact["qid"], 1))), "nothing is measured on q1, the rest unchanged"


def test_no_header_on_the_ccd_blocks_the_file(small: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(photometry.NoCcdWcsError):
        run(small, tmp_path, sciimg_header_paths={q: None for q in (1, 2, 3, 4)})
    assert not (tmp_path / "apcat").exists()


def test_missing_ipac_mask_uses_our_mask_and_says_so(small: dict[str, Any], tmp_path: Path) -> None:
    masks = dict(small["masks"])
    masks[3] = None
    masks[4] = tmp_path / "no-such-mask.fits"
    result = run(small, tmp_path / "store", mask_paths=masks)
    assert [q for q, _ in result.without_ipac_mask] == [3, 4]
    table = pq.read_table(result.apcat_path)
    qid = table["qid"].to_numpy()
    np.testing.assert_array_equal(table["ipac_mask"].to_numpy(), (qid != 3) & (qid != 4))


def test_header_stored_as_text_gives_the_same_rows(small: dict[str, Any], tmp_path: Path) -> None:
    headers = {}
    for qid, path in small["headers"].items():
        text = tmp_path / f"q{qid}_sciimg.header.txt"
        text.write_text(work.read_sciimg_header(path).tostring(sep="\n", endcard=True, padding=False))
        headers[qid] = text
    assert pq.read_table(run(small, tmp_path / "a", sciimg_header_paths=headers).apcat_path).equals(
        pq.read_table(run(small, tmp_path / "b").apcat_path)
    )


def test_detrended_images_only_when_configured(small: dict[str, Any], tmp_path: Path) -> None:
    assert run(small, tmp_path / "off").detrended_paths == ()
    assert not (tmp_path / "off" / "detrended").exists()
    config = replace(DetrendConfig(), write_detrended=True, detrended_quantize_step=0.5)
    headers = dict(small["headers"])
    headers[1] = None
    result = run(small, tmp_path / "on", detrend_config=config, sciimg_header_paths=headers)
    assert len(result.detrended_paths) == 3  # q1, without its header, is lost: no image either
    with fits.open(result.detrended_paths[0]) as hdus:
        assert hdus["SCI"].data.shape == (260, 256)
        assert hdus[0].header["WCSFROMQ"] == 2
        written = photometry.wcs_from_header(hdus[0].header)
    own = photometry.wcs_from_header(work.read_sciimg_header(small["headers"][2]))
    corners = (np.array([0.0, 255.0]), np.array([0.0, 259.0]))
    np.testing.assert_allclose(written.pixel_to_world_values(*corners), own.pixel_to_world_values(*corners), atol=1e-9)


@pytest.mark.slow
def test_full_size_exposure_meets_the_photometry_acceptance(tmp_path: Path) -> None:
    sim = simulate(tmp_path / "sim", "full", 4500)
    result = run(sim, tmp_path / "store")
    assert result.lost == ()
    table, truth = joined(sim, Path(result.apcat_path))
    check_fluxes(table, truth, 10, min_stars=200)
    flags = table["f_9_f"].to_numpy()
    bits = table["mask_bits"].to_numpy()
    np.testing.assert_array_equal((flags & photometry.FLAG_MASKED) != 0, bits != 0)
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    near_edge = (x < 11.5) | (y < 11.5) | (x > 3072 - 12.5) | (y > 3080 - 12.5)
    assert np.all(flags[near_edge] & photometry.FLAG_EDGE)
    on_dead = np.asarray((bits & (1 << 9)) != 0)
    assert on_dead.any() and np.all(flags[on_dead] & photometry.FLAG_MASKED)


def test_master_cache_rereads_a_changed_file_and_shares_read_only_arrays(small: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "bias.fits"
    shutil.copyfile(small["bias"], path)
    work.clear_master_cache()
    first = work.read_master_cached(path, 1)
    assert work.read_master_cached(path, 1) is first
    with pytest.raises(ValueError, match="read-only"):
        first.data[0, 0] = 1.0
    data = {q: masterio.read_master(small["bias"], q) for q in (1, 2, 3, 4)}
    shifted = {q: MasterQuadrant(m.data + np.float32(5.0), m.variance, m.mask) for q, m in data.items()}
    masterio.write_master(path, shifted, primary_cards={"MKIND": "bias", "NIGHT": NIGHT.isoformat(), "CCD_ID": 13})
    second = work.read_master_cached(path, 1)
    assert second is not first
    np.testing.assert_allclose(second.data - first.data, 5.0, atol=0.01)


def test_process_exposure_runs_in_another_process(small: dict[str, Any], tmp_path: Path) -> None:
    """Inputs and result cross a process boundary by pickle, as with the local pool or dask."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    kwargs = {
        "master_bias_path": str(small["bias"]),
        "master_flat_path": str(small["flat"]),
        "sciimg_header_paths": {q: str(p) for q, p in small["headers"].items()},
        "mask_paths": {q: str(p) for q, p in small["masks"].items()},
        "catalog_dir": str(small["out"] / "refcat"),
        "storage_root": str(tmp_path / "remote"),
        "detrend_config": DetrendConfig(),
        "photometry_config": PhotometryConfig(catalog_dir=small["out"] / "refcat"),
        "provenance": {"config_hash": "test"},
    }
    assert pickle.loads(pickle.dumps(kwargs)) == kwargs
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        remote = pool.submit(work.process_exposure, str(small["raw"]), **kwargs).result(timeout=120)
    local = run(small, tmp_path / "local")
    assert remote.rows == local.rows and remote.lost == local.lost
    assert pq.read_table(remote.apcat_path).equals(pq.read_table(local.apcat_path))
