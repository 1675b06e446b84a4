"""Worker functions: read files, call the numerics, write products atomically.

Inputs and outputs are paths and small frozen records, so that they cross process
boundaries (local pool or dask) by pickle. Nothing here opens the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from . import photometry, refcat
from .products import QuadrantRows

PIXEL_SCALE_ARCSEC: Final = 1.012
QIDS: Final = (1, 2, 3, 4)


class InputFileError(ValueError):
    """An input file (sciimg header, IPAC mask) that is not what it should be."""


def read_sciimg_header(path: Path | str) -> fits.Header:
    """The IPAC sciimg header stored by the downloader.

    Accepted: FITS (a primary header alone, or a whole sciimg; the first HDU with a celestial
    CTYPE1 wins), or text from ``Header.tostring()`` with or without one card per line.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        start = handle.read(2880)
    if not start.startswith((b"SIMPLE  =", b"XTENSION=")):
        raise InputFileError(f"{path}: not a FITS header (does not start with 'SIMPLE  =' or 'XTENSION=')")
    if b"\n" in start[:81]:
        text = path.read_text(encoding="ascii", errors="strict")
        try:
            return fits.Header.fromstring(text, sep="\n")
        except ValueError as err:
            raise InputFileError(f"{path}: unreadable header text: {err}") from err
    try:
        primary = fits.Header.fromfile(str(path))
        if "CTYPE1" in primary or not primary.get("EXTEND", False):
            return primary
        with fits.open(path) as hdus:  # a tile-compressed sciimg keeps its WCS in HDU 1
            for hdu in hdus[1:]:
                if "CTYPE1" in hdu.header:
                    return hdu.header.copy()
        return primary
    except (OSError, ValueError) as err:
        raise InputFileError(f"{path}: unreadable FITS header: {err}") from err


def read_ipac_mask(path: Path | str, shape: tuple[int, int]) -> npt.NDArray[np.int16]:
    """An IPAC mskimg (int16 bits), plain or tile-compressed (``.fits`` or ``.fits.fz``)."""
    path = Path(path)
    try:
        with fits.open(path) as hdus:
            data = next((hdu.data for hdu in hdus if hdu.is_image and hdu.data is not None), None)
            if data is None:
                raise InputFileError(f"{path}: no image HDU")
            mask = np.array(data)
    except (OSError, ValueError, TypeError) as err:
        raise InputFileError(f"{path}: unreadable IPAC mask: {err}") from err
    if mask.shape != shape:
        raise InputFileError(f"{path}: mask of shape {mask.shape}, expected {shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise InputFileError(f"{path}: mask of type {mask.dtype}, expected integers")
    return mask.astype(np.int16, copy=False)


@dataclass(frozen=True)
class CcdCatalogue:
    """The reference sources around one CCD, at the exposure epoch, with their isolation flag."""

    sources: refcat.RefCatalogue
    isolated: npt.NDArray[np.bool_]


def catalogue_for_ccd(
    catalog_dir: Path | str,
    wcs: Mapping[int, photometry.QuadrantWcs],
    shape: tuple[int, int],
    epoch: float,
    isolation_arcsec: float,
) -> CcdCatalogue:
    """Read the catalogue pixels touching any quadrant (grown by the isolation radius) and flag isolation."""
    margin_px = isolation_arcsec / PIXEL_SCALE_ARCSEC + 2.0
    pixels: set[int] = set()
    for quadrant in wcs.values():
        pixels.update(refcat.pixels_touching(quadrant.wcs, shape, margin_px).tolist())
    sources = refcat.read_refcat(catalog_dir, pixels, epoch)
    return CcdCatalogue(sources, photometry.isolated(sources.ra, sources.dec, isolation_arcsec))


def measure_quadrant(
    qid: int,
    image: npt.NDArray[np.floating],
    variance: npt.NDArray[np.floating],
    mask: npt.NDArray[np.integer],
    reject_bits: int,
    wcs: photometry.QuadrantWcs,
    catalogue: CcdCatalogue,
    radii: tuple[float, ...],
    *,
    background_box: tuple[int, int],
    edge_margin_px: float,
    ipac_mask: bool,
) -> QuadrantRows:
    """Photometry of the catalogue sources that fall on one detrended quadrant."""
    sources = catalogue.sources
    x, y = photometry.sky_to_pixel(wcs.wcs, sources.ra, sources.dec)
    keep = np.flatnonzero(photometry.on_image(x, y, image.shape))
    apertures = photometry.measure_apertures(
        image, variance, mask, reject_bits, x[keep], y[keep], radii,
        background_box=background_box, edge_margin_px=edge_margin_px,
    )  # fmt: skip
    return QuadrantRows(
        qid=qid,
        source_id=sources.source_id[keep],
        ra=sources.ra[keep],
        dec=sources.dec[keep],
        mags={name: values[keep] for name, values in sources.mags.items()},
        x=x[keep],
        y=y[keep],
        isolated=catalogue.isolated[keep],
        apertures=apertures,
        ipac_mask=ipac_mask,
        wcs_from_qid=wcs.from_qid,
    )
