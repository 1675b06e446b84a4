"""The simulated sky: field centres, a Gaia-like reference catalogue per (field, CCD), and star rendering.

Catalogue conventions (the IN2P3 Gaia layout): ``refcat/gaiadr3_pix64_<ipix>.parquet``, HEALPix
nside 64, NESTED ordering, columns ``source_id`` (int64), ``ra``, ``dec`` (deg, ICRS, epoch 2016.0),
``pmra`` (mas/yr, includes cos dec), ``pmdec`` (mas/yr), ``phot_g_mean_mag``, ``phot_bp_mean_mag``,
``phot_rp_mean_mag``. Positions at an exposure are carried linearly:
``dec = dec2016 + pmdec * dt / 3.6e6``, ``ra = ra2016 + pmra * dt / (3.6e6 cos dec2016)``,
``dt`` = Julian years from 2016.0 (``(obsjd - 2457389.0) / 365.25``).
The magnitude seen through each ZTF filter: zg = BP, zr = G, zi = RP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import astropy.units as u
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from astropy_healpix import HEALPix
from scipy.special import ndtr

from streamer.sim.geometry import Shape, ccd_origin, focal_plane_wcs

REFCAT_NSIDE: Final = 64
JD_2016: Final = 2457389.0
MAG_RANGE: Final = (12.0, 21.0)
LUMINOSITY_SLOPE: Final = 0.3  # d log10 N / dm
FILTER_MAG_COLUMN: Final = {"zg": "phot_bp_mean_mag", "zr": "phot_g_mean_mag", "zi": "phot_rp_mean_mag"}
STAMP_HALF_WIDTH: Final = 8

REFCAT_SCHEMA: Final = pa.schema(
    [
        ("source_id", pa.int64()),
        ("ra", pa.float64()),
        ("dec", pa.float64()),
        ("pmra", pa.float64()),
        ("pmdec", pa.float64()),
        ("phot_g_mean_mag", pa.float32()),
        ("phot_bp_mean_mag", pa.float32()),
        ("phot_rp_mean_mag", pa.float32()),
    ]
)

Catalogue = dict[str, npt.NDArray[np.generic]]


def field_center(field: int) -> tuple[float, float]:
    """A synthetic, deterministic field centre (deg): fields with neighbouring ids are far apart on the sky."""
    ra = (field * 23.7) % 360.0
    dec = -25.0 + (field % 11) * 7.5
    return ra, dec


def healpix() -> HEALPix:
    return HEALPix(nside=REFCAT_NSIDE, order="nested")


def make_catalogue(rng: np.random.Generator, shape: Shape, field: int, ccdid: int, n_stars: int) -> Catalogue:
    """Stars spread uniformly over the area a CCD covers when field ``field`` is pointed exactly.

    ``source_id = (field * 100 + ccdid) * 10**6 + index`` (unique, deterministic).
    """
    x0, y0 = ccd_origin(shape, ccdid)
    x = x0 - 0.5 + rng.uniform(0.0, 2 * shape.cols, n_stars)
    y = y0 - 0.5 + rng.uniform(0.0, 2 * shape.rows, n_stars)
    ra, dec = focal_plane_wcs(*field_center(field)).wcs_pix2world(x, y, 0)
    lo, hi = (10.0 ** (LUMINOSITY_SLOPE * m) for m in MAG_RANGE)
    g = np.log10(lo + rng.uniform(0.0, 1.0, n_stars) * (hi - lo)) / LUMINOSITY_SLOPE
    colour = np.clip(rng.normal(1.0, 0.4, n_stars), 0.2, 3.0)  # BP - RP
    return {
        "source_id": (field * 100 + ccdid) * 10**6 + np.arange(n_stars, dtype=np.int64),
        "ra": np.asarray(ra, dtype=np.float64) % 360.0,
        "dec": np.asarray(dec, dtype=np.float64),
        "pmra": rng.normal(0.0, 4.0, n_stars),
        "pmdec": rng.normal(0.0, 4.0, n_stars),
        "phot_g_mean_mag": g.astype(np.float32),
        "phot_bp_mean_mag": (g + 0.4 * colour).astype(np.float32),
        "phot_rp_mean_mag": (g + 0.4 * colour - colour).astype(np.float32),
    }


def positions_at(catalogue: Catalogue, obsjd: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``(ra, dec)`` in degrees carried from epoch 2016.0 to ``obsjd`` with the proper motions."""
    years = (obsjd - JD_2016) / 365.25
    dec2016 = np.asarray(catalogue["dec"], dtype=np.float64)
    dec = dec2016 + np.asarray(catalogue["pmdec"], dtype=np.float64) * years / 3.6e6
    pmra = np.asarray(catalogue["pmra"], dtype=np.float64)
    ra = np.asarray(catalogue["ra"], dtype=np.float64) + pmra * years / (3.6e6 * np.cos(np.radians(dec2016)))
    return ra, dec


def catalogue_pixels(catalogue: Catalogue, shape: Shape, field: int, ccdid: int) -> set[int]:
    """HEALPix pixels (nside 64, nested) of the stars and of a grid over the CCD's nominal footprint."""
    x0, y0 = ccd_origin(shape, ccdid)
    gx, gy = np.meshgrid(np.linspace(x0 - 0.5, x0 + 2 * shape.cols - 0.5, 17), np.linspace(y0 - 0.5, y0 + 2 * shape.rows - 0.5, 17))
    ra, dec = focal_plane_wcs(*field_center(field)).wcs_pix2world(gx.ravel(), gy.ravel(), 0)
    hp = healpix()
    grid = hp.lonlat_to_healpix(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg)
    stars = hp.lonlat_to_healpix(np.asarray(catalogue["ra"]) * u.deg, np.asarray(catalogue["dec"]) * u.deg)
    return {int(p) for p in np.concatenate([grid, stars])}


def write_refcat(directory: Path, catalogues: list[Catalogue], pixels: set[int]) -> list[Path]:
    """Write (or merge into) ``gaiadr3_pix64_<ipix>.parquet`` for every pixel in ``pixels``.

    Rows already present with the same ``source_id`` are replaced; pixels without stars get an empty file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    hp = healpix()
    merged = {name: np.concatenate([c[name] for c in catalogues]) for name in REFCAT_SCHEMA.names} if catalogues else None
    ipix = (
        hp.lonlat_to_healpix(np.asarray(merged["ra"]) * u.deg, np.asarray(merged["dec"]) * u.deg)
        if merged is not None
        else np.zeros(0, dtype=np.int64)
    )
    written = []
    for pixel in sorted(pixels | {int(p) for p in ipix}):
        path = directory / f"gaiadr3_pix64_{pixel}.parquet"
        new = pa.table({name: merged[name][ipix == pixel] for name in REFCAT_SCHEMA.names}, schema=REFCAT_SCHEMA) if merged is not None else REFCAT_SCHEMA.empty_table()
        if path.exists():
            old = pq.read_table(path).cast(REFCAT_SCHEMA)
            keep = ~np.isin(old["source_id"].to_numpy(), new["source_id"].to_numpy())
            new = pa.concat_tables([old.filter(pa.array(keep)), new])
        order = np.argsort(new["source_id"].to_numpy(), kind="stable")
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(new.take(pa.array(order)), tmp)
        os.replace(tmp, path)
        written.append(path)
    return written


def render_stars(
    image: npt.NDArray[np.float32],
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    flux: npt.NDArray[np.float64],
    sigma: float,
) -> None:
    """Add pixel-integrated circular Gaussians of total ``flux`` at ``(x, y)`` to ``image`` (in place).

    Postage stamps of ``2 * STAMP_HALF_WIDTH + 1`` pixels; the light falling outside the image is lost.
    """
    if x.size == 0:
        return
    rows, cols = image.shape
    offsets = np.arange(-STAMP_HALF_WIDTH, STAMP_HALF_WIDTH + 1)
    cx = np.floor(x + 0.5).astype(np.int64)
    cy = np.floor(y + 0.5).astype(np.int64)
    px = cx[:, None] + offsets[None, :]
    py = cy[:, None] + offsets[None, :]
    wx = ndtr((px - x[:, None] + 0.5) / sigma) - ndtr((px - x[:, None] - 0.5) / sigma)
    wy = ndtr((py - y[:, None] + 0.5) / sigma) - ndtr((py - y[:, None] - 0.5) / sigma)
    stamps = ((flux[:, None, None] * wy[:, :, None]) * wx[:, None, :]).astype(np.float32)
    size = 2 * STAMP_HALF_WIDTH + 1
    for stamp, x_low, y_low in zip(stamps, (cx - STAMP_HALF_WIDTH).tolist(), (cy - STAMP_HALF_WIDTH).tolist(), strict=True):
        x0, y0 = max(x_low, 0), max(y_low, 0)
        x1, y1 = min(x_low + size, cols), min(y_low + size, rows)
        if x0 < x1 and y0 < y1:
            image[y0:y1, x0:x1] += stamp[y0 - y_low:y1 - y_low, x0 - x_low:x1 - x_low]
