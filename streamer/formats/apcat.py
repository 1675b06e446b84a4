"""Product formats: the aperture catalogue (apcat) and optional detrended quadrant images.

One apcat per raw CCD file, one detrended image per quadrant (their paths are in
:mod:`streamer.storage.paths`). The apcat holds one row per catalogue source
measured on a quadrant, ordered by (qid, source_id); its columns are ``APCAT_BASE_COLUMNS``,
then ``f_k, f_k_e, f_k_f, r_k`` for each radius index k (0-based, in the order of the
configured radii), then ``EXPOSURE_COLUMNS``, ``MASK_COLUMNS`` and ``focalplane_factor``:

- ``x, y``: 0-based pixel position on the quadrant's IPAC grid (the raw HDU grid);
- ``f_k``, ``f_k_e``: background-subtracted sum and its error in ADU (detrended, no
  aperture correction); ``f_k_f``: flags (see :mod:`streamer.photometry`); ``r_k``: radius, px;
- ``isolated``: no other catalogue source within ``photometry.isolation_arcsec``;
- ``mask_bits``: OR of the rejected mask bits (IPAC's and ours) on the pixels that the largest
  aperture overlaps (non-zero exactly when ``f_<last>_f`` has ``FLAG_MASKED``);
- ``ipac_mask``: False when the quadrant's IPAC mask was missing and only our own mask was used;
- ``wcs_from_qid``: the quadrant whose IPAC header gave the WCS (differs from ``qid`` when
  the quadrant's own header was missing);
- ``focalplane_factor``: the CCD's focal-plane flat factor for the night and filter of the master
  flat used (one value per file). ``f_k`` and ``f_k_e`` are CCD-flatfielded; the
  focal-plane-flatfielded flux and error are ``f_k / focalplane_factor`` and
  ``f_k_e / focalplane_factor`` (the image divided by ``master_flat * factor``: every step after the
  flat is linear in the image, the background included). Null (NaN in pandas) where no factor
  was made (``flat_normalisation = "ccd"``) or where the CCD had none (see the ``focalplane_factor_note``
  of the provenance).

Provenance (masters and their nights, configuration hash, package versions, radii) is in
the parquet key-value metadata under ``b"streamer"`` (JSON) and the radii also under
``b"radii"``; the rows carry none of it, so two runs over the same data give identical rows.

With ``[photometry] layout = "in2p3"`` the catalogue is instead what the IN2P3 pipeline writes,
one parquet per quadrant (:func:`in2p3_quadrant_table`, path
:func:`streamer.storage.paths.in2p3_apcat_relpath`). Each point is taken from its source:

- columns and order: ``source_id, ra, dec, phot_g_mean_mag, phot_bp_mean_mag, phot_rp_mean_mag, x, y``
  (ztfin2p3/aperture.py, ``_MINIMAL_COLNAMES["gaia_dr3"]``; production uses ``cat="gaia_dr3"``,
  ``minimal_columns: True`` in ztfin2p3/scripts/config.yml), then ``isolated`` (joined by
  ``get_aperture_photometry``; ztfimg/catalog.py ``get_isolated`` names it and makes it bool), then
  ``f_0..f_n``, ``f_0_e..f_n_e``, ``f_0_f..f_n_f`` (ztfimg/base.py ``_get_aperture``, as_dataframe) and
  ``r_0..r_n`` appended last (ztfin2p3/aperture.py);
- dtypes: every float64 catalogue column cast to float32 (ra, dec, magnitudes, x, y), the aperture
  frame cast to float32, then ``f_k_f`` and ``r_k`` to uint8 (``radius.astype(np.uint8)``: whole
  pixels; the configuration refuses other radii with this layout); ``source_id`` int64, ``isolated`` bool
  (ztfin2p3/aperture.py, ``get_aperture_photometry``);
- orientation: ``x = cols - 1 - x_ipac``, ``y = rows - 1 - y_ipac`` (3071 - x, 3079 - y for ZTF):
  ``get_img_refcatalog`` (ztfin2p3/catalog.py) calls ztfimg's ``add_coord_to_catalog`` with
  ``reorder=True``, and ``radec_to_xy`` (ztfimg/utils/astrometry.py) then returns
  ``shape[1] - x - 1, shape[0] - y - 1`` of astropy's 0-based pixel; the apertures are measured on
  ``get_data()``, reordered the same way (ztfimg/base.py, ``data[::-1, ::-1]``);
- NaN: ``get_data(apply_mask=True)`` sets masked pixels to NaN (ztfimg/science.py, ``maskvalue=np.nan``)
  and ``ScienceQuadrant.get_aperture`` does not pass the mask on to ``sep.sum_circle`` (ztfimg/science.py),
  so an aperture that overlaps a masked pixel sums to NaN; the masked pixels are IPAC's bits but 1
  and 11 (ztfimg/science.py ``get_mask`` defaults), our ``mask_reject_bits`` default. Here: ``f_k`` is NaN
  exactly where our ``FLAG_MASKED`` is set (a rejected pixel overlaps the aperture, exact overlap as
  IN2P3's ``subpix=0``); ``f_k_e`` stays finite, as sep's error from the error map does;
- flags: sep's own flags only (no mask was given to sep there), i.e. the low byte of ours;
- no exposure columns: the file name carries filefracday, field, filter, CCD and quadrant;
- fluxes: focal-plane-flatfielded (``fp_flatfield: True`` in ztfin2p3/scripts/config.yml, the
  production setting) with ``flat_normalisation = "focalplane"``, CCD-flatfielded with ``"ccd"``; the
  factor is in the provenance (``focalplane_factor``). A quadrant whose CCD has no factor is not
  written in the focal-plane variant: it is recorded as lost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from streamer.photometry import FLAG_MASKED, Apertures
from streamer.storage.atomic import write_atomically
from streamer.storage.naming import rcid_of

APCAT_BASE_COLUMNS: Final = (
    "source_id", "ra", "dec", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "x", "y", "isolated",
)  # fmt: skip
EXPOSURE_COLUMNS: Final = ("filefracday", "expid", "field", "filtercode", "ccdid", "qid", "rcid", "obsjd")
MASK_COLUMNS: Final = ("mask_bits", "ipac_mask", "wcs_from_qid")
VERSIONED_PACKAGES: Final = ("ztf-streamer", "numpy", "astropy", "sep", "pyarrow", "astropy-healpix", "scipy")


@dataclass(frozen=True)
class ExposureInfo:
    """What the apcat rows say about the exposure they come from."""

    filefracday: str
    expid: int
    field: int
    filtercode: str
    ccdid: int
    obsjd: float
    focalplane_factor: float = float("nan")


@dataclass(frozen=True)
class QuadrantRows:
    """The measured catalogue sources of one quadrant."""

    qid: int
    source_id: npt.NDArray[np.int64]
    ra: npt.NDArray[np.float64]
    dec: npt.NDArray[np.float64]
    mags: Mapping[str, npt.NDArray[np.float32]]
    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    isolated: npt.NDArray[np.bool_]
    apertures: Apertures
    ipac_mask: bool
    wcs_from_qid: int

    def __len__(self) -> int:
        return int(self.source_id.size)


def apcat_schema(n_radii: int) -> pa.Schema:
    """The apcat columns and types for ``n_radii`` radii."""
    fields = [
        pa.field("source_id", pa.int64()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
        pa.field("phot_g_mean_mag", pa.float32()),
        pa.field("phot_bp_mean_mag", pa.float32()),
        pa.field("phot_rp_mean_mag", pa.float32()),
        pa.field("x", pa.float64()),
        pa.field("y", pa.float64()),
        pa.field("isolated", pa.bool_()),
    ]
    for k in range(n_radii):
        fields += [
            pa.field(f"f_{k}", pa.float64()),
            pa.field(f"f_{k}_e", pa.float64()),
            pa.field(f"f_{k}_f", pa.int32()),
            pa.field(f"r_{k}", pa.float32()),
        ]
    fields += [
        pa.field("filefracday", pa.int64()),
        pa.field("expid", pa.int64()),
        pa.field("field", pa.int32()),
        pa.field("filtercode", pa.string()),
        pa.field("ccdid", pa.int8()),
        pa.field("qid", pa.int8()),
        pa.field("rcid", pa.int16()),
        pa.field("obsjd", pa.float64()),
        pa.field("mask_bits", pa.int32()),
        pa.field("ipac_mask", pa.bool_()),
        pa.field("wcs_from_qid", pa.int8()),
        pa.field("focalplane_factor", pa.float64()),
    ]
    return pa.schema(fields)


def apcat_table(exposure: ExposureInfo, quadrants: Sequence[QuadrantRows], radii: Sequence[float]) -> pa.Table:
    """The apcat rows of one raw CCD file, ordered by (qid, source_id)."""
    n_radii = len(radii)
    schema = apcat_schema(n_radii)
    parts: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in schema.names}
    for quadrant in sorted(quadrants, key=lambda q: q.qid):
        n = len(quadrant)
        order = np.argsort(quadrant.source_id, kind="stable")
        ap = quadrant.apertures
        if ap.flux.shape != (n, n_radii):
            raise ValueError(f"q{quadrant.qid}: fluxes of shape {ap.flux.shape}, expected ({n}, {n_radii})")
        columns: dict[str, npt.NDArray[Any]] = {
            "source_id": quadrant.source_id,
            "ra": quadrant.ra,
            "dec": quadrant.dec,
            "phot_g_mean_mag": quadrant.mags["phot_g_mean_mag"],
            "phot_bp_mean_mag": quadrant.mags["phot_bp_mean_mag"],
            "phot_rp_mean_mag": quadrant.mags["phot_rp_mean_mag"],
            "x": quadrant.x,
            "y": quadrant.y,
            "isolated": quadrant.isolated,
            "mask_bits": ap.mask_bits,
        }
        for k, radius in enumerate(radii):
            columns[f"f_{k}"] = ap.flux[:, k]
            columns[f"f_{k}_e"] = ap.flux_err[:, k]
            columns[f"f_{k}_f"] = ap.flags[:, k]
            columns[f"r_{k}"] = np.full(n, radius)
        constant = {
            "filefracday": int(exposure.filefracday),
            "expid": exposure.expid,
            "field": exposure.field,
            "ccdid": exposure.ccdid,
            "qid": quadrant.qid,
            "rcid": rcid_of(exposure.ccdid, quadrant.qid),
            "obsjd": exposure.obsjd,
            "ipac_mask": quadrant.ipac_mask,
            "wcs_from_qid": quadrant.wcs_from_qid,
            "focalplane_factor": exposure.focalplane_factor,
        }
        for name, value in constant.items():
            columns[name] = np.full(n, value)
        columns["filtercode"] = np.full(n, exposure.filtercode, dtype=object)
        for name in schema.names:
            parts[name].append(np.asarray(columns[name])[order])
    arrays = [
        pa.array(
            np.concatenate(parts[f.name]) if parts[f.name] else np.zeros(0, dtype=object),
            type=f.type, from_pandas=f.name == "focalplane_factor",  # NaN -> null: no factor
        )
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


IN2P3_BASE_COLUMNS: Final = (
    "source_id", "ra", "dec", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "x", "y", "isolated",
)  # fmt: skip


def in2p3_schema(n_radii: int) -> pa.Schema:
    """The IN2P3 apcat columns, in their order and types, for ``n_radii`` radii (sources in the module docstring)."""
    fields = [pa.field("source_id", pa.int64())]
    fields += [pa.field(name, pa.float32()) for name in IN2P3_BASE_COLUMNS[1:-1]]
    fields.append(pa.field("isolated", pa.bool_()))
    for suffix, dtype in (("", pa.float32()), ("_e", pa.float32()), ("_f", pa.uint8())):
        fields += [pa.field(f"f_{k}{suffix}", dtype) for k in range(n_radii)]
    fields += [pa.field(f"r_{k}", pa.uint8()) for k in range(n_radii)]
    return pa.schema(fields)


def in2p3_quadrant_table(
    quadrant: QuadrantRows, radii: Sequence[float], shape: tuple[int, int], flat_factor: float = 1.0
) -> pa.Table:
    """One quadrant's rows in the IN2P3 layout, ordered by source_id; ``shape`` = (rows, columns) of the
    quadrant; fluxes and errors divided by ``flat_factor`` (the focal-plane factor for that variant)."""
    if not flat_factor > 0:
        raise ValueError(f"flat_factor {flat_factor}: expected > 0")
    n_radii = len(radii)
    ap = quadrant.apertures
    if ap.flux.shape != (len(quadrant), n_radii):
        raise ValueError(f"q{quadrant.qid}: fluxes of shape {ap.flux.shape}, expected ({len(quadrant)}, {n_radii})")
    if not all(float(r).is_integer() and 1 <= r <= 255 for r in radii):
        raise ValueError(f"radii {list(radii)}: the IN2P3 layout stores radii as uint8, expected whole pixels in 1..255")
    order = np.argsort(quadrant.source_id, kind="stable")
    rows, columns = shape
    masked = (ap.flags & FLAG_MASKED) != 0
    values: dict[str, npt.NDArray[Any]] = {
        "source_id": quadrant.source_id,
        "ra": quadrant.ra,
        "dec": quadrant.dec,
        **{name: quadrant.mags[name] for name in IN2P3_BASE_COLUMNS[3:6]},
        "x": (columns - 1) - quadrant.x,
        "y": (rows - 1) - quadrant.y,
        "isolated": quadrant.isolated,
    }
    for k, radius in enumerate(radii):
        values[f"f_{k}"] = np.where(masked[:, k], np.nan, ap.flux[:, k] / flat_factor)
        values[f"f_{k}_e"] = ap.flux_err[:, k] / flat_factor
        values[f"f_{k}_f"] = ap.flags[:, k] & 0xFF
        values[f"r_{k}"] = np.full(len(quadrant), int(radius))
    schema = in2p3_schema(n_radii)
    arrays = [pa.array(np.asarray(values[f.name])[order].astype(f.type.to_pandas_dtype()), type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_apcat(path: Path | str, table: pa.Table, radii: Sequence[float], provenance: Mapping[str, Any]) -> Path:
    """Write an apcat atomically (temporary name, fsync, rename, fsync of the directory)."""
    record = {"radii": [float(r) for r in radii], "packages": package_versions(), **provenance}
    metadata = {
        b"streamer": json.dumps(record, sort_keys=True, default=str).encode(),
        b"radii": json.dumps([float(r) for r in radii]).encode(),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    repeating = [field.name for field in table.schema if not pa.types.is_floating(field.type) and field.name != "source_id"]
    # Dictionary pages only where values repeat (flags, ids, codes): on the float and id columns
    # Parquet's default tries them, gives up for each, and the file ends 27 % larger and 2.8x slower to write.
    return write_atomically(
        Path(path), lambda handle: pq.write_table(table, handle, compression="zstd", use_dictionary=repeating)
    )


def write_detrended(
    path: Path | str,
    image: npt.NDArray[np.floating],
    variance: npt.NDArray[np.floating],
    mask: npt.NDArray[np.integer],
    header: fits.Header,
    quantize_step: float,
) -> Path:
    """A detrended quadrant: SCI and VAR Rice-compressed with the fixed quantisation step ``quantize_step``
    (ADU and ADU^2, subtractive dither with a fixed seed, so reruns give the same bytes), MASK lossless."""
    if quantize_step <= 0:
        raise ValueError(f"quantize_step {quantize_step}: expected > 0")
    options = {"compression_type": "RICE_1", "quantize_level": -quantize_step, "quantize_method": 1, "dither_seed": 1}
    hdus = fits.HDUList(
        [
            fits.PrimaryHDU(header=header),
            fits.CompImageHDU(np.asarray(image, dtype=np.float32), name="SCI", **options),
            fits.CompImageHDU(np.asarray(variance, dtype=np.float32), name="VAR", **options),
            fits.CompImageHDU(np.asarray(mask, dtype=np.int32), name="MASK", compression_type="RICE_1"),
        ]
    )
    return write_atomically(Path(path), lambda handle: hdus.writeto(handle))
