"""The Gaia-layout reference catalogue: parquet files partitioned by HEALPix pixel.

Layout of ``catalog_dir``: one file per HEALPix pixel (nside 64, NESTED ordering),
``gaiadr3_pix64_<ipix>.parquet``, with at least the columns ``REFCAT_COLUMNS``: positions
(ra, dec, degrees) at epoch 2016.0 (Gaia DR3), proper motions in mas/yr (``pmra`` includes
cos(dec)), G/BP/RP magnitudes. Only the pixels that touch a footprint are read, and only
those columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import astropy.units as u
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.wcs import WCS
from astropy_healpix import HEALPix

from streamer.photometry import sky_to_pixel, unit_vectors

NSIDE: Final = 64
REFCAT_EPOCH: Final = 2016.0
REFCAT_COLUMNS: Final = (
    "source_id", "ra", "dec", "pmra", "pmdec", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag",
)  # fmt: skip
MAG_COLUMNS: Final = ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag")
_HEALPIX: Final = HEALPix(nside=NSIDE, order="nested")
_MAS_TO_RAD: Final = np.pi / 180.0 / 3.6e6


class RefcatError(ValueError):
    """A catalogue file that cannot be read or lacks the expected columns."""


@dataclass(frozen=True)
class RefCatalogue:
    """Catalogue sources, positions carried to ``epoch`` (Julian years)."""

    source_id: npt.NDArray[np.int64]
    ra: npt.NDArray[np.float64]
    dec: npt.NDArray[np.float64]
    mags: dict[str, npt.NDArray[np.float32]]
    epoch: float
    pixels_read: tuple[int, ...]
    pixels_missing: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.source_id.size)


def refcat_filename(ipix: int) -> str:
    return f"gaiadr3_pix64_{int(ipix)}.parquet"


def julian_epoch(jd: float) -> float:
    """Julian epoch (years) of a Julian date: J2000.0 is JD 2451545.0."""
    return 2000.0 + (jd - 2451545.0) / 365.25


def pixels_touching(wcs: WCS, shape: tuple[int, int], margin_px: float = 0.0) -> npt.NDArray[np.int64]:
    """Sorted HEALPix pixels (nside 64, nested) touching the image footprint grown by ``margin_px``.

    Candidates come from a cone around the footprint; a candidate is kept when a point of a
    dense grid over the footprint falls in it or a point of its boundary falls in the footprint.
    """
    ny, nx = shape
    xs = np.linspace(-0.5 - margin_px, nx - 0.5 + margin_px, 41)
    ys = np.linspace(-0.5 - margin_px, ny - 0.5 + margin_px, 41)
    gx, gy = np.meshgrid(xs, ys)
    ra, dec = wcs.pixel_to_world_values(gx.ravel(), gy.ravel())
    inside = set(np.unique(_HEALPIX.lonlat_to_healpix(ra * u.deg, dec * u.deg)).tolist())

    vectors = unit_vectors(ra, dec)
    centre = vectors.mean(axis=0)
    centre /= np.linalg.norm(centre)
    radius = float(np.degrees(np.arccos(np.clip(vectors @ centre, -1.0, 1.0)).max()))
    centre_ra = float(np.degrees(np.arctan2(centre[1], centre[0])) % 360.0)
    centre_dec = float(np.degrees(np.arcsin(centre[2])))
    cone = _HEALPIX.cone_search_lonlat(centre_ra * u.deg, centre_dec * u.deg, radius * 1.01 * u.deg)
    for ipix in sorted(set(cone.tolist()) - inside):
        lon, lat = _HEALPIX.boundaries_lonlat([ipix], step=16)
        bx, by = sky_to_pixel(wcs, lon.to_value(u.deg).ravel(), lat.to_value(u.deg).ravel())
        with np.errstate(invalid="ignore"):
            hit = (bx >= xs[0]) & (bx <= xs[-1]) & (by >= ys[0]) & (by <= ys[-1])
        if hit.any():
            inside.add(ipix)
    return np.array(sorted(inside), dtype=np.int64)


def read_refcat(catalog_dir: Path | str, pixels: Iterable[int], epoch: float) -> RefCatalogue:
    """Read the given pixels' files (missing files are listed, not fatal) and carry positions to ``epoch``."""
    catalog_dir = Path(catalog_dir)
    tables: list[pa.Table] = []
    read: list[int] = []
    missing: list[int] = []
    for ipix in sorted({int(p) for p in pixels}):
        path = catalog_dir / refcat_filename(ipix)
        if not path.is_file():
            missing.append(ipix)
            continue
        try:
            table = pq.read_table(path, columns=list(REFCAT_COLUMNS))
        except (OSError, pa.ArrowException, KeyError) as err:
            raise RefcatError(f"{path}: cannot read columns {', '.join(REFCAT_COLUMNS)}: {err}") from err
        tables.append(table)
        read.append(ipix)
    if tables:
        table = pa.concat_tables(tables, promote_options="permissive")
        columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in REFCAT_COLUMNS}
    else:
        columns = {name: np.zeros(0) for name in REFCAT_COLUMNS}
    source_id = np.asarray(columns["source_id"], dtype=np.int64)
    order = np.argsort(source_id, kind="stable")
    ra, dec = propagate_proper_motion(
        np.asarray(columns["ra"], dtype=np.float64)[order],
        np.asarray(columns["dec"], dtype=np.float64)[order],
        np.asarray(columns["pmra"], dtype=np.float64)[order],
        np.asarray(columns["pmdec"], dtype=np.float64)[order],
        epoch - REFCAT_EPOCH,
    )
    mags = {name: np.asarray(columns[name], dtype=np.float32)[order] for name in MAG_COLUMNS}
    return RefCatalogue(source_id[order], ra, dec, mags, epoch, tuple(read), tuple(missing))


def propagate_proper_motion(
    ra: npt.NDArray[np.float64],
    dec: npt.NDArray[np.float64],
    pmra: npt.NDArray[np.float64],
    pmdec: npt.NDArray[np.float64],
    years: float,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Positions (deg) moved by proper motion (mas/yr, ``pmra`` including cos(dec)) over ``years``.

    Linear motion in the tangent plane, renormalised onto the sphere (valid at the poles);
    a missing (NaN) proper motion counts as zero.
    """
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    pm_east = np.nan_to_num(pmra) * _MAS_TO_RAD * years
    pm_north = np.nan_to_num(pmdec) * _MAS_TO_RAD * years
    sin_ra, cos_ra = np.sin(ra_r), np.cos(ra_r)
    sin_dec, cos_dec = np.sin(dec_r), np.cos(dec_r)
    px = cos_dec * cos_ra - pm_east * sin_ra - pm_north * sin_dec * cos_ra
    py = cos_dec * sin_ra + pm_east * cos_ra - pm_north * sin_dec * sin_ra
    pz = sin_dec + pm_north * cos_dec
    norm = np.sqrt(px * px + py * py + pz * pz)
    new_ra = np.degrees(np.arctan2(py, px)) % 360.0
    new_dec = np.degrees(np.arcsin(np.clip(pz / norm, -1.0, 1.0)))
    return new_ra, new_dec
