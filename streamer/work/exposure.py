"""Worker functions: read files, call the numerics, write products atomically.

Inputs and outputs are paths and small frozen records, so that they cross process
boundaries (local pool or dask) by pickle. Nothing here opens the ledger.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from streamer import geometry, photometry
from streamer.config import DetrendConfig, PhotometryConfig
from streamer.crashpoints import crash_point
from streamer.detrend import masks as maskbits
from streamer.detrend import nonlinearity
from streamer.detrend.calibrate import MasterQuadrant, detrend_science, pocket_step
from streamer.errors import StreamerError
from streamer.formats import masters as masterio
from streamer.formats import raw as rawio
from streamer.formats import refcat, rice_tiles
from streamer.formats.apcat import (
    ExposureInfo,
    QuadrantRows,
    apcat_table,
    in2p3_quadrant_table,
    write_apcat,
    write_detrended,
)
from streamer.storage.naming import RawName, night_of, parse_filename
from streamer.storage.paths import apcat_relpath, detrended_relpath, in2p3_apcat_relpath

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
        try:
            return fits.Header.fromstring(path.read_text(encoding="ascii", errors="strict"), sep="\n")
        except Exception as err:  # astropy fails on malformed text in many ways; UnicodeDecodeError too
            raise InputFileError(f"{path}: unreadable header text: {_one_line(err)}") from err
    try:
        with open(path, "rb") as handle:  # our own handle: closed even when astropy fails half-way
            primary = fits.Header.fromfile(handle)
            if "CTYPE1" in primary or not primary.get("EXTEND", False):
                return primary
            handle.seek(0)
            with fits.open(handle) as hdus:  # a tile-compressed sciimg keeps its WCS in HDU 1
                for hdu in hdus[1:]:
                    if "CTYPE1" in hdu.header:
                        return hdu.header.copy()
        return primary
    except Exception as err:  # astropy's parser fails on malformed input with KeyError, TypeError, VerifyError...
        raise InputFileError(f"{path}: unreadable FITS header: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def read_ipac_mask(path: Path | str, shape: tuple[int, int]) -> npt.NDArray[np.int16]:
    """An IPAC mskimg (int16 bits), plain or tile-compressed (``.fits`` or ``.fits.fz``)."""
    path = Path(path)
    try:
        decoded = rice_tiles.decode_image_file(path, 1)  # as the service stores masks; None: plain, or another layout
        if decoded is not None:
            return _checked_mask(path, decoded, shape)
        with fits.open(path) as hdus:
            data = next((hdu.data for hdu in hdus if hdu.is_image and hdu.data is not None), None)
            if data is None:
                raise InputFileError(f"{path}: no image HDU")
            return _checked_mask(path, data, shape)
    except InputFileError:
        raise
    except (OSError, ValueError, TypeError) as err:
        raise InputFileError(f"{path}: unreadable IPAC mask: {err}") from err


def _checked_mask(path: Path, data: npt.NDArray[Any], shape: tuple[int, int]) -> npt.NDArray[np.int16]:
    if data.shape != shape:
        raise InputFileError(f"{path}: mask of shape {data.shape}, expected {shape}")
    if not np.issubdtype(data.dtype, np.integer):
        raise InputFileError(f"{path}: mask of type {data.dtype}, expected integers")
    return data.astype(np.int16, copy=False)  # native int16 in memory; a file's big-endian map is copied once


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
    overwrite_image: bool = False,
    finite: bool = False,
) -> QuadrantRows:
    """Photometry of the catalogue sources that fall on one detrended quadrant.

    With ``overwrite_image`` the image buffer is reused for the background-subtracted image; with
    ``finite`` the detrend pass has found image and variance finite (``DetrendedQuadrant.finite``).
    """
    sources = catalogue.sources
    x, y = photometry.sky_to_pixel(wcs.wcs, sources.ra, sources.dec)
    keep = np.flatnonzero(photometry.on_image(x, y, image.shape))
    apertures = photometry.measure_apertures(
        image, variance, mask, reject_bits, x[keep], y[keep], radii,
        background_box=background_box, edge_margin_px=edge_margin_px, overwrite_image=overwrite_image, finite=finite,
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


MASTER_CACHE_QUADRANTS: Final = 8
"""Master quadrants a worker keeps (bias and flat of one CCD, about 0.75 GB): files of one CCD
and night share them, so a worker fed by CCD reads each master once."""


@functools.lru_cache(maxsize=MASTER_CACHE_QUADRANTS)
def _read_master_by_identity(path: str, qid: int, mtime_ns: int, size: int) -> MasterQuadrant:
    master = masterio.read_master(path, qid)
    for array in master:
        array.flags.writeable = False  # shared between calls: nobody may change it in place
    return master


def read_master_cached(path: Path | str, qid: int) -> MasterQuadrant:
    """Quadrant ``qid`` of a master file, from this process's cache while the file is unchanged."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise masterio.MasterReadError(f"{path}: no such master file ({err.strerror})") from err
    return _read_master_by_identity(os.path.realpath(path), qid, stat.st_mtime_ns, stat.st_size)


def master_cache_counts() -> tuple[int, int]:
    """(reads served from this process's master cache, reads from disk) since the process started."""
    info = _read_master_by_identity.cache_info()
    return info.hits, info.misses


def clear_master_cache() -> None:
    """Forget the cached masters (tests, benchmarks)."""
    _read_master_by_identity.cache_clear()


@dataclass(frozen=True)
class ExposureResult:
    """What ``process_exposure`` did with one raw science CCD file (small and picklable)."""

    raw_path: str
    apcat_path: str
    """The per-CCD catalogue (layout "streamer"), or "" (layout "in2p3": see ``in2p3_apcat_paths``)."""
    rows: tuple[tuple[int, int], ...]
    """(qid, number of catalogue sources measured) for each quadrant measured."""
    lost: tuple[tuple[int, str], ...]
    """(qid, reason) for each quadrant that could not be measured (one without its own IPAC header among them)."""
    without_ipac_mask: tuple[tuple[int, str], ...]
    """(qid, reason) for quadrants measured with our own mask alone."""
    detrended_paths: tuple[str, ...] = ()
    refcat_pixels_missing: tuple[int, ...] = ()
    in2p3_apcat_paths: tuple[str, ...] = ()
    """One catalogue per measured quadrant (layout "in2p3")."""
    masters_from_cache: int = 0
    """Master quadrants this exposure found in the worker's cache (8 when warm: bias and flat of 4 quadrants)."""
    masters_from_disk: int = 0
    """Master quadrants it read from disk (0 when warm)."""


def process_exposure(
    raw_path: Path | str,
    *,
    master_bias_path: Path | str,
    master_flat_path: Path | str,
    sciimg_header_paths: Mapping[int, Path | str | None],
    mask_paths: Mapping[int, Path | str | None],
    catalog_dir: Path | str,
    storage_root: Path | str,
    detrend_config: DetrendConfig,
    photometry_config: PhotometryConfig,
    provenance: Mapping[str, Any],
    focalplane_factor: float = float("nan"),
) -> ExposureResult:
    """Detrend the four quadrants of a raw science CCD file and write its aperture catalogue.

    Writes ``storage_root / storage.paths.apcat_relpath(raw)``, or with ``photometry_config.layout ==
    "in2p3"`` one ``in2p3_apcat_relpath(raw, qid)`` per measured quadrant (and, when
    ``detrend_config.write_detrended``, one detrended image per quadrant) atomically. A quadrant
    whose HDU, masters or pixels cannot be read is lost alone (``ExposureResult.lost``), and so is
    one without a usable IPAC sciimg header of its own (no sibling's WCS is borrowed: see
    :func:`photometry.quadrant_wcs`); one without an IPAC mask is measured with our own mask. Raises :class:`photometry.NoCcdWcsError` when no quadrant has an IPAC header (the
    file is blocked), :class:`rawio.RawFileError` when the raw file cannot be opened at all.
    ``provenance`` (e.g. the configuration hash) goes into the apcat metadata.

    The pixels are always CCD-flatfielded. ``focalplane_factor`` (NaN: none) is recorded with the
    catalogue (column and provenance), so that one run gives both variants; with
    ``flat_normalisation = "focalplane"`` the IN2P3 layout's fluxes and the detrended images are
    divided by it, and a missing factor is noted (``focalplane_factor_note``).
    """
    raw_path = Path(raw_path)
    crash_point("exposure", raw_path.name)
    name = parse_filename(raw_path.name)
    if not isinstance(name, RawName) or name.imgtypecode != "o":
        raise ValueError(f"{raw_path.name}: expected a raw science file name (..._o.fits.fz)")
    cache_before = master_cache_counts()
    header_notes: dict[int, str] = {}
    headers: dict[int, fits.Header | None] = {}
    for qid in QIDS:
        path = sciimg_header_paths.get(qid)
        headers[qid] = None
        if path is None:
            header_notes[qid] = "no IPAC sciimg header"
            continue
        try:
            headers[qid] = read_sciimg_header(path)
        except (InputFileError, OSError) as err:
            header_notes[qid] = str(err)

    with rawio.open_raw(raw_path) as raw:
        shape = _quadrant_shape(raw, headers)
        wcs, no_wcs = photometry.quadrant_wcs(headers)
        primary = raw.primary_header
        obsjd = _obsjd(primary, headers, raw_path)
        expid = _expid(primary, headers)
        catalogue = catalogue_for_ccd(
            catalog_dir, wcs, shape, refcat.julian_epoch(obsjd), photometry_config.isolation_arcsec
        )
        divisor = _focal_plane_divisor(detrend_config, focalplane_factor)
        quadrants: list[QuadrantRows] = []
        lost: list[tuple[int, str]] = []
        no_mask: list[tuple[int, str]] = []
        detrended: list[str] = []
        for qid in QIDS:
            if qid not in wcs:
                lost.append((qid, f"no WCS: {header_notes.get(qid, no_wcs[qid])}; a sibling's is not borrowed"))
                continue
            try:
                measured, mask_note, written = _process_quadrant(
                    raw, qid, name, headers, wcs[qid], catalogue,
                    master_bias_path=master_bias_path, master_flat_path=master_flat_path,
                    mask_path=mask_paths.get(qid), storage_root=Path(storage_root),
                    detrend_config=detrend_config, photometry_config=photometry_config,
                    focal_plane_divisor=divisor,
                )  # fmt: skip
            except (StreamerError, ValueError, OSError, KeyError) as err:
                lost.append((qid, f"{type(err).__name__}: {err}"))
                continue
            quadrants.append(measured)
            if mask_note is not None:
                no_mask.append((qid, mask_note))
            if written is not None:
                detrended.append(str(written))

    cache_after = master_cache_counts()
    exposure = ExposureInfo(name.filefracday, expid, name.field, name.filtercode, name.ccdid, obsjd, focalplane_factor)
    record = {
        **provenance,
        "raw": raw_path.name,
        "masters": {"bias": _master_record(master_bias_path), "flat": _master_record(master_flat_path)},
        "focalplane_factor": focalplane_factor if np.isfinite(focalplane_factor) else None,
        **_focalplane_note(detrend_config, divisor, name.ccdid),
        "detrend_config": _plain(detrend_config),
        **_pocket_record(detrend_config, name),
        "photometry_config": _plain(photometry_config),
        "refcat_pixels_read": list(catalogue.sources.pixels_read),
        "refcat_pixels_missing": list(catalogue.sources.pixels_missing),
        "quadrants_lost": {str(q): reason for q, reason in lost},
        "sciimg_header_notes": {str(q): note for q, note in header_notes.items()},
        "without_ipac_mask": {str(q): note for q, note in no_mask},
    }
    radii = photometry_config.radii
    apcat_path, in2p3_paths = "", []
    if photometry_config.layout == "in2p3":
        if "focalplane_factor_note" in record:  # the focal-plane variant without a factor: nothing of this CCD is written
            lost += [(q.qid, record["focalplane_factor_note"]) for q in quadrants]
            record["quadrants_lost"] = {str(q): reason for q, reason in sorted(lost)}
            quadrants = []
        for quadrant in quadrants:
            path = Path(storage_root) / in2p3_apcat_relpath(name, quadrant.qid)
            table = in2p3_quadrant_table(quadrant, radii, shape, flat_factor=divisor or 1.0)
            write_apcat(path, table, radii, {**record, "qid": quadrant.qid})
            in2p3_paths.append(str(path))
    else:
        apcat_path = str(Path(storage_root) / apcat_relpath(name))
        write_apcat(apcat_path, apcat_table(exposure, quadrants, radii), radii, record)
    return ExposureResult(
        raw_path=str(raw_path),
        apcat_path=apcat_path,
        rows=tuple((q.qid, len(q)) for q in quadrants),
        lost=tuple(lost),
        in2p3_apcat_paths=tuple(in2p3_paths),
        without_ipac_mask=tuple(no_mask),
        detrended_paths=tuple(detrended),
        refcat_pixels_missing=catalogue.sources.pixels_missing,
        masters_from_cache=cache_after[0] - cache_before[0],
        masters_from_disk=cache_after[1] - cache_before[1],
    )


def _process_quadrant(
    raw: rawio.RawFile,
    qid: int,
    name: RawName,
    headers: Mapping[int, fits.Header | None],
    wcs: photometry.QuadrantWcs,
    catalogue: CcdCatalogue,
    *,
    master_bias_path: Path | str,
    master_flat_path: Path | str,
    mask_path: Path | str | None,
    storage_root: Path,
    detrend_config: DetrendConfig,
    photometry_config: PhotometryConfig,
    focal_plane_divisor: float | None,
) -> tuple[QuadrantRows, str | None, Path | None]:
    """Detrend and measure one quadrant: (rows, why the IPAC mask was not used or None, detrended path or None)."""
    quadrant = raw.quadrant(qid)
    own_header = headers.get(qid)
    gain, read_noise = quadrant.gain, quadrant.read_noise
    if own_header is not None:
        gain = gain if gain is not None else _header_number(own_header, "GAIN")
        read_noise = read_noise if read_noise is not None else _header_number(own_header, "READNOI")
    if gain is None or read_noise is None:
        raise ValueError("no GAIN or READNOI in the raw extension header nor in the IPAC header")
    saturate = _header_number(own_header, "SATURATE") if own_header is not None else None
    night = night_of(name.filefracday)
    pocket = pocket_step(detrend_config, name.ccdid, qid, night)
    detrended = detrend_science(
        quadrant.data,
        quadrant.overscan,
        qid,
        config=detrend_config,
        nonlinearity_coefficients=nonlinearity.coefficients(night, name.ccdid, qid),
        master_bias=read_master_cached(master_bias_path, qid),
        master_flat=read_master_cached(master_flat_path, qid),
        gain=gain,
        read_noise=read_noise,
        saturate=saturate,
        row_corrections=pocket.row_corrections,
    )
    del quadrant
    mask_note: str | None = None
    mask = detrended.mask
    if mask_path is None:
        mask_note = "no IPAC mask"
    else:
        try:
            ipac = read_ipac_mask(mask_path, mask.shape).view(np.uint16)
            mask = np.bitwise_or(mask, ipac, out=mask if mask.flags.writeable else None)
        except (InputFileError, OSError) as err:
            mask_note = str(err)
    reject_bits = photometry_config.mask_reject_bits | maskbits.REJECT_OWN
    written = None
    if detrend_config.write_detrended:
        header = wcs.header.copy()  # the quadrant's own IPAC header
        header["WCSFROMQ"] = (wcs.from_qid, "quadrant whose IPAC header gave the WCS")
        image, variance = detrended.image, detrended.variance
        header["FLATNORM"] = ("ccd" if focal_plane_divisor is None else "focalplane", "flat normalisation of SCI and VAR")
        if focal_plane_divisor is not None:
            header["FPFACTOR"] = (focal_plane_divisor, "focal-plane factor: SCI = CCD-flatfielded / FPFACTOR")
            image = image / np.float32(focal_plane_divisor)
            variance = variance / np.float32(focal_plane_divisor**2)
        written = write_detrended(
            storage_root / detrended_relpath(name, qid), image, variance, mask,
            _primary_safe(header), detrend_config.detrended_quantize_step,
        )  # fmt: skip
    rows = measure_quadrant(
        qid, detrended.image, detrended.variance, mask, reject_bits, wcs, catalogue, photometry_config.radii,
        background_box=photometry_config.background_box, edge_margin_px=photometry_config.edge_margin_px,
        ipac_mask=mask_note is None, overwrite_image=True, finite=detrended.finite,
    )  # fmt: skip
    return rows, mask_note, written


def _focal_plane_divisor(detrend_config: DetrendConfig, focalplane_factor: float) -> float | None:
    """What the written images and IN2P3 fluxes are divided by: the factor with ``"focalplane"``,
    None with ``"ccd"`` or when there is no factor (they stay CCD-flatfielded)."""
    if detrend_config.flat_normalisation == "focalplane" and np.isfinite(focalplane_factor) and focalplane_factor > 0:
        return focalplane_factor
    return None


def _focalplane_note(detrend_config: DetrendConfig, divisor: float | None, ccdid: int) -> dict[str, str]:
    """Why the focal-plane variant has no factor, when it is asked for and has none."""
    if detrend_config.flat_normalisation != "focalplane" or divisor is not None:
        return {}
    return {"focalplane_factor_note": f"no focal-plane factor for CCD {ccdid}: its master flat's night made none for it"}


def _quadrant_shape(raw: rawio.RawFile, headers: Mapping[int, fits.Header | None]) -> tuple[int, int]:
    """(rows, columns) of a quadrant: from the first readable quadrant HDU header, else an IPAC header."""
    for qid in QIDS:
        try:
            return raw.data_shape(qid)
        except rawio.QuadrantReadError:
            continue
    for header in headers.values():
        if header is not None and "NAXIS1" in header and "NAXIS2" in header:
            return (int(header["NAXIS2"]), int(header["NAXIS1"]))
    return geometry.QUADRANT_SHAPE


def _obsjd(primary: fits.Header, headers: Mapping[int, fits.Header | None], raw_path: Path) -> float:
    """OBSJD from the raw primary header, else from an IPAC header (the same exposure)."""
    for header in (primary, *headers.values()):
        value = _header_number(header, "OBSJD")
        if value is not None:
            return value
    raise InputFileError(f"{raw_path}: no OBSJD in the raw primary header nor in any IPAC header")


def _expid(primary: fits.Header, headers: Mapping[int, fits.Header | None]) -> int:
    for header in (primary, *headers.values()):
        if header is not None and isinstance(header.get("EXPID"), int):
            return int(header["EXPID"])
    return -1


def _header_number(header: fits.Header | None, key: str) -> float | None:
    value = None if header is None else header.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _primary_safe(header: fits.Header) -> fits.Header:
    """The header without the cards that describe another HDU's data layout."""
    out = header.copy()
    for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE", "PCOUNT", "GCOUNT", "XTENSION"):
        out.remove(key, ignore_missing=True, remove_all=True)
    return out


def _master_record(path: Path | str) -> dict[str, Any]:
    """Which master file was used and the night it was built for."""
    record: dict[str, Any] = {"file": Path(path).name}
    try:
        header = masterio.read_master_header(path)
    except masterio.MasterReadError as err:
        record["error"] = str(err)
        return record
    for key in ("NIGHT", "MKIND", "FILTER", "LEDS", "NFRAMES", "CFGHASH", "POCKET"):
        if key in header:
            record[key.lower()] = header[key]
    return record


def _pocket_record(detrend_config: DetrendConfig, name: RawName) -> dict[str, Any]:
    """``{"pocket": {qid: record}}`` of the pocket-effect step of each quadrant, nothing when it is off."""
    if detrend_config.pocket == "off":
        return {}
    night = night_of(name.filefracday)
    return {"pocket": {str(qid): pocket_step(detrend_config, name.ccdid, qid, night).record() for qid in QIDS}}


def _plain(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
