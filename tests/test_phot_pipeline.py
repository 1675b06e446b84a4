"""Catalogue -> WCS -> apertures on a small synthetic quadrant with known star fluxes."""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy_healpix import HEALPix

from streamer import photometry
from streamer.archive.transfer import MASK_TILE_ROWS, compress_mask
from streamer.formats import refcat, rice_tiles
from streamer.work import exposure as work

SHAPE = (700, 720)
GAIN = 6.0
READ_NOISE_E = 9.0
SKY = 180.0
SIGMA_PSF = 2.0 / 2.355 / 1.012 * 1.5  # a 3" FWHM PSF, in pixels
RADII = (3.0, 4.0, 6.0, 8.0, 10.0, 12.0)


def quadrant_header(ra0: float, dec0: float) -> fits.Header:
    s = 1.012 / 3600
    header = fits.Header()
    header.update(
        {
            "SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": SHAPE[1], "NAXIS2": SHAPE[0], "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
            "CRPIX1": SHAPE[1] / 2, "CRPIX2": SHAPE[0] / 2, "CRVAL1": ra0, "CRVAL2": dec0,
            "CD1_1": -s, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": -s, "RADESYS": "ICRS", "MJD-OBS": 59116.43,
        }
    )  # fmt: skip
    return header


def render(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian stars integrated over pixels (erf differences), so the sums are exact."""
    from scipy.special import erf

    image = np.zeros(shape)
    half = 20
    for xc, yc, f in zip(x, y, flux, strict=True):
        i0, i1 = max(int(yc) - half, 0), min(int(yc) + half, shape[0])
        j0, j1 = max(int(xc) - half, 0), min(int(xc) + half, shape[1])
        edges_x = np.arange(j0, j1 + 1) - 0.5 - xc
        edges_y = np.arange(i0, i1 + 1) - 0.5 - yc
        px = np.diff(erf(edges_x / (np.sqrt(2) * sigma))) / 2
        py = np.diff(erf(edges_y / (np.sqrt(2) * sigma))) / 2
        image[i0:i1, j0:j1] += f * py[:, None] * px[None, :]
    return image


@pytest.fixture
def scene(tmp_path: Path) -> dict[str, object]:
    rng = np.random.default_rng(20240611)
    ra0, dec0 = 57.99, 35.75
    header = quadrant_header(ra0, dec0)
    wcs = photometry.wcs_from_header(header)
    n = 260
    x_true = rng.uniform(-15, SHAPE[1] + 15, n)
    y_true = rng.uniform(-15, SHAPE[0] + 15, n)
    x_true[:3] = [1.5, 400.0, 300.3]  # one at the edge, one to be saturated, one on a dead column
    y_true[:3] = [350.0, 1.0e2, 500.7]
    flux = 10 ** rng.uniform(3.0, 5.3, n)
    ra, dec = wcs.pixel_to_world_values(x_true, y_true)
    # The catalogue is at epoch 2016.0 and moves to the exposure epoch.
    epoch = 2020.73
    pmra, pmdec = rng.normal(0, 30, n), rng.normal(0, 30, n)
    ra16, dec16 = refcat.propagate_proper_motion(ra, dec, pmra, pmdec, 2016.0 - epoch)
    hp = HEALPix(64, order="nested")
    ipix = hp.lonlat_to_healpix(ra16 * u.deg, dec16 * u.deg)
    catdir = tmp_path / "refcat"
    catdir.mkdir()
    for pixel in np.unique(ipix):
        sel = ipix == pixel
        pq.write_table(
            pa.table(
                {
                    "source_id": np.flatnonzero(sel).astype(np.int64) + 10**15,
                    "ra": ra16[sel], "dec": dec16[sel], "pmra": pmra[sel], "pmdec": pmdec[sel],
                    "phot_g_mean_mag": (25 - 2.5 * np.log10(flux[sel])).astype(np.float32),
                    "phot_bp_mean_mag": np.full(sel.sum(), 18.0, np.float32),
                    "phot_rp_mean_mag": np.full(sel.sum(), 17.0, np.float32),
                }
            ),
            catdir / refcat.refcat_filename(int(pixel)),
        )  # fmt: skip
    signal = SKY + render(SHAPE, x_true, y_true, flux, SIGMA_PSF)
    variance = signal / GAIN + (READ_NOISE_E / GAIN) ** 2
    image = (rng.poisson(signal * GAIN) / GAIN + rng.normal(0, READ_NOISE_E / GAIN, SHAPE)).astype(np.float32)
    mask = np.zeros(SHAPE, np.int16)
    mask[99:102, 399:402] |= 1 << 8  # saturated core of star 1
    mask[:, 300] |= 1 << 9  # a dead column under star 2
    mask[600:610, 100:110] |= 1 << 1  # a SExtractor detection: not a rejected bit
    return {
        "header": header, "catdir": catdir, "epoch": epoch, "image": image, "variance": variance.astype(np.float32),
        "mask": mask, "x": x_true, "y": y_true, "flux": flux,
    }  # fmt: skip


def test_photometry_recovers_injected_fluxes_within_the_noise(scene: dict[str, object]) -> None:
    header = scene["header"]
    assert isinstance(header, fits.Header)
    wcs = photometry.quadrant_wcs({1: header})[0][1]
    catalogue = work.catalogue_for_ccd(scene["catdir"], {1: wcs}, SHAPE, float(scene["epoch"]), 20.0)  # type: ignore[arg-type]
    rows = work.measure_quadrant(
        1, scene["image"], scene["variance"], scene["mask"], 6141, wcs, catalogue, RADII,  # type: ignore[arg-type]
        background_box=(128, 128), edge_margin_px=0.0, ipac_mask=True,
    )  # fmt: skip
    index = (rows.source_id - 10**15).astype(int)
    x_true, y_true, flux = (np.asarray(scene[k])[index] for k in ("x", "y", "flux"))
    on = (x_true >= -0.5) & (x_true < SHAPE[1] - 0.5) & (y_true >= -0.5) & (y_true < SHAPE[0] - 0.5)
    assert on.all() and on.size == int(
        np.sum((np.asarray(scene["x"]) >= -0.5) & (np.asarray(scene["x"]) < SHAPE[1] - 0.5)
               & (np.asarray(scene["y"]) >= -0.5) & (np.asarray(scene["y"]) < SHAPE[0] - 0.5))
    )  # fmt: skip
    np.testing.assert_allclose(rows.x, x_true, atol=2e-3)  # proper motion carried to the epoch
    np.testing.assert_allclose(rows.y, y_true, atol=2e-3)

    ap = rows.apertures
    big = len(RADII) - 1
    clean = rows.isolated & (ap.flags[:, big] == 0) & (ap.flux[:, big] / ap.flux_err[:, big] > 100)
    assert clean.sum() > 60
    ratio = ap.flux[clean, big] / flux[clean]
    assert np.median(np.abs(ratio - 1)) < 0.005
    pull = (ap.flux[clean, big] - flux[clean]) / ap.flux_err[clean, big]
    spread = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert 0.8 < spread < 1.25

    by_id = {int(s): i for i, s in enumerate(index)}
    edge, saturated, dead = by_id[0], by_id[1], by_id[2]
    assert np.all(ap.flags[edge] & photometry.FLAG_EDGE)
    assert np.all(ap.flags[saturated] & photometry.FLAG_MASKED) and ap.mask_bits[saturated] == 1 << 8
    assert np.all(ap.flags[dead] & photometry.FLAG_MASKED) and ap.mask_bits[dead] == 1 << 9
    assert not np.any(ap.mask_bits & (1 << 1))


def test_header_and_mask_readers_accept_every_stored_form(tmp_path: Path) -> None:
    header = quadrant_header(10.0, 20.0)
    as_lines = tmp_path / "h.txt"
    as_lines.write_text(header.tostring(sep="\n", endcard=True, padding=False))
    as_blocks = tmp_path / "h.fits"
    primary = fits.PrimaryHDU()
    primary.header.update({k: header[k] for k in header if k.startswith(("C", "RADESYS"))})
    primary.writeto(as_blocks)
    for path in (as_lines, as_blocks):
        got = work.read_sciimg_header(path)
        assert got["CRVAL2"] == 20.0 and got["CTYPE1"] == "RA---TAN"
    (tmp_path / "bad.txt").write_text("hello")
    with pytest.raises(work.InputFileError, match="SIMPLE"):
        work.read_sciimg_header(tmp_path / "bad.txt")

    rng = np.random.default_rng(1)
    mask = rng.integers(0, 2**13, SHAPE).astype(np.int16)
    fits.PrimaryHDU(mask).writeto(tmp_path / "m.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(mask, compression_type="RICE_1")]).writeto(tmp_path / "m.fits.fz")
    for name in ("m.fits", "m.fits.fz"):
        np.testing.assert_array_equal(work.read_ipac_mask(tmp_path / name, SHAPE), mask)
    with pytest.raises(work.InputFileError, match="shape"):
        work.read_ipac_mask(tmp_path / "m.fits", (10, 10))


def sparse_mask(seed: int) -> np.ndarray:
    """An int16 mask like IPAC's: mostly 0, a few per cent of pixels with bits set."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(SHAPE) < 0.03, rng.integers(1, 2**13, SHAPE), 0).astype(np.int16)


@pytest.mark.parametrize("tile_rows", [1, 64, SHAPE[0]])
def test_compressed_masks_are_decoded_tile_by_tile_as_astropy_reads_them(tmp_path: Path, tile_rows: int) -> None:
    """Masks stored one row a tile (before) or in tiles of many rows (now; the last one partial) go
    through the tile decoder, which gives astropy's array and the mask as written."""
    mask = sparse_mask(2)
    path = tmp_path / "m.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(mask, compression_type="RICE_1", tile_shape=(tile_rows, SHAPE[1]))]).writeto(path)
    decoded = rice_tiles.decode_image_file(path, 1)
    assert decoded is not None
    with fits.open(path) as hdus:
        np.testing.assert_array_equal(decoded, hdus[1].data)
    np.testing.assert_array_equal(work.read_ipac_mask(path, SHAPE), mask)


def test_a_mask_as_the_fetcher_stores_it_reads_back_exactly(tmp_path: Path) -> None:
    mask = sparse_mask(3)
    served, stored = tmp_path / "q1_mskimg.fits", tmp_path / "q1_mskimg.fits.fz"
    fits.PrimaryHDU(mask).writeto(served)
    compress_mask(served, stored)
    with fits.open(stored, disable_image_compression=True) as tables:
        assert (tables[1].header["ZTILE1"], tables[1].header["ZTILE2"]) == (SHAPE[1], MASK_TILE_ROWS)
    one_row_tiles = tmp_path / "rows.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(mask, compression_type="RICE_1", tile_shape=(1, SHAPE[1]))]).writeto(one_row_tiles)
    assert stored.stat().st_size <= one_row_tiles.stat().st_size < served.stat().st_size  # the budget pays no more than before
    np.testing.assert_array_equal(rice_tiles.decode_image_file(stored, 1), mask)
    np.testing.assert_array_equal(work.read_ipac_mask(stored, SHAPE), mask)


def test_a_corrupt_compressed_mask_gives_a_one_line_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    mask = rng.integers(0, 2**13, SHAPE).astype(np.int16)  # dense: every tile has bytes to spoil
    path = tmp_path / "m.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(mask, compression_type="RICE_1", tile_shape=(64, SHAPE[1]))]).writeto(path)
    with fits.open(path, disable_image_compression=True) as tables:
        start, table_bytes = tables.fileinfo(1)["datLoc"], tables[1].header["NAXIS1"] * tables[1].header["NAXIS2"]
    data = bytearray(path.read_bytes())
    count, offset = np.frombuffer(bytes(data[start : start + table_bytes]), ">i4").reshape(-1, 2)[3]
    data[start + table_bytes + offset + 2 : start + table_bytes + offset + count] = b"\xff" * (count - 2)
    path.write_bytes(bytes(data))
    with pytest.raises(work.InputFileError, match="unreadable IPAC mask: tile 3") as err:
        work.read_ipac_mask(path, SHAPE)
    assert "\n" not in str(err.value) and str(err.value).count(str(path)) == 1
