"""Every rule that turns facts into a path below the storage root, and the root check.

Archive products keep the archive's own relpath (``streamer.storage.naming``), except
the stored sciimg header (``..._sciimg.header.fits``) and the stored mask, kept
tile-compressed (``..._mskimg.fits.fz``). What the service makes:

    masters/YYYY/MMDD/ccdNN/ztf_<night>_cNN_bias.fits
    masters/YYYY/MMDD/ccdNN/ztf_<night>_cNN_<filter>_ledLL_flat.fits
    masters/YYYY/MMDD/ccdNN/ztf_<night>_cNN_<filter>_flat.fits
    masters/YYYY/MMDD/ztf_<night>_<filter>_focalplane.json
    apcat/YYYY/MMDD/ztf_<filefracday>_<field:06d>_<filter>_cNN_o_apcat.parquet
    ztfin2p3/sci/YYYY/MMDD/FFFFFF/ztfin2p3_<filefracday>_<field:06d>_<filter>_cNN_o_qQ_apcat.parquet
    detrended/YYYY/MMDD/ztf_<filefracday>_<field:06d>_<filter>_cNN_o_q<qid>_detrended.fits.fz
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Final

from streamer.storage.naming import NamingError, RawName, SciName, parse_relpath

#: Top directories that hold what the service makes (never archive products).
PRODUCT_DIRECTORIES: Final = ("masters", "apcat", "detrended", "ztfin2p3")


def _compact(night: str) -> str:
    return night.replace("-", "")


def master_bias_relpath(night: str, ccdid: int) -> str:
    n = _compact(night)
    return f"masters/{n[:4]}/{n[4:]}/ccd{ccdid:02d}/ztf_{n}_c{ccdid:02d}_bias.fits"


def led_flat_relpath(night: str, ccdid: int, filtercode: str, led: int) -> str:
    n = _compact(night)
    return f"masters/{n[:4]}/{n[4:]}/ccd{ccdid:02d}/ztf_{n}_c{ccdid:02d}_{filtercode}_led{led:02d}_flat.fits"


def master_flat_relpath(night: str, ccdid: int, filtercode: str) -> str:
    n = _compact(night)
    return f"masters/{n[:4]}/{n[4:]}/ccd{ccdid:02d}/ztf_{n}_c{ccdid:02d}_{filtercode}_flat.fits"


def focalplane_relpath(night: str, filtercode: str) -> str:
    n = _compact(night)
    return f"masters/{n[:4]}/{n[4:]}/ztf_{n}_{filtercode}_focalplane.json"


def apcat_relpath(raw: RawName) -> str:
    """Path of the aperture catalogue of a raw science CCD file."""
    ffd = raw.filefracday
    return f"apcat/{ffd[0:4]}/{ffd[4:8]}/ztf_{ffd}_{raw.field:06d}_{raw.filtercode}_c{raw.ccdid:02d}_o_apcat.parquet"


def in2p3_apcat_relpath(raw: RawName, qid: int) -> str:
    """Path of the IN2P3-layout aperture catalogue of one quadrant of a raw science CCD file.

    The IN2P3 code's own rule, with the storage root as ztfquery's ``$ZTFDATA``: ztfquery's local
    sciimg path (ztfquery/buildurl.py, ``science_path``: ``sci/YYYY/MMDD/FFFFFF/ztf_<ffd>_<field>_<filter>_cNN_o_qQ_sciimg.fits``)
    with ``/sci`` -> ``/ztfin2p3/sci``, ``/ztf_`` -> ``/ztfin2p3_``, the suffix after the last ``_``
    -> ``apcat`` and the extension -> ``.parquet`` (ztfin2p3/io.py, ``ipacfilename_to_ztfin2p3filepath``,
    called with ``new_suffix="apcat", new_extension="parquet"`` by ztfin2p3/scripts/detrend2aper.py).
    """
    if qid not in (1, 2, 3, 4):
        raise NamingError(f"qid {qid}: expected 1..4")
    ffd = raw.filefracday
    return (
        f"ztfin2p3/sci/{ffd[0:4]}/{ffd[4:8]}/{ffd[8:14]}/"
        f"ztfin2p3_{ffd}_{raw.field:06d}_{raw.filtercode}_c{raw.ccdid:02d}_o_q{qid}_apcat.parquet"
    )


def apcat_relpaths(raw: RawName, layout: str) -> tuple[str, ...]:
    """The catalogue paths of a raw science CCD file: one per CCD (layout "streamer") or one per quadrant ("in2p3")."""
    if layout == "in2p3":
        return tuple(in2p3_apcat_relpath(raw, qid) for qid in (1, 2, 3, 4))
    if layout == "streamer":
        return (apcat_relpath(raw),)
    raise NamingError(f"catalogue layout {layout!r}: expected 'streamer' or 'in2p3'")


def is_quadrant_product(relpath: str) -> bool:
    """A product made per quadrant (a detrended image, an IN2P3 catalogue): a lost quadrant leaves it unwritten."""
    return kind_of(relpath) in ("detrended", "apcat") and relpath.split("/", 1)[0] in ("detrended", "ztfin2p3")


def detrended_relpath(raw: RawName, qid: int) -> str:
    """Path of one detrended quadrant image of a raw science CCD file."""
    ffd = raw.filefracday
    return (
        f"detrended/{ffd[0:4]}/{ffd[4:8]}/"
        f"ztf_{ffd}_{raw.field:06d}_{raw.filtercode}_c{raw.ccdid:02d}_o_q{qid}_detrended.fits.fz"
    )


def header_relpath(sciimg_relpath: str) -> str:
    """Where the header of a sciimg is stored: ``..._sciimg.fits`` -> ``..._sciimg.header.fits``."""
    if not sciimg_relpath.endswith("_sciimg.fits"):
        raise NamingError(f"path {sciimg_relpath!r}: expected a ..._sciimg.fits path")
    return sciimg_relpath[: -len(".fits")] + ".header.fits"


def mask_relpath(mskimg_relpath: str) -> str:
    """Where a mask is stored (tile-compressed): ``..._mskimg.fits`` -> ``..._mskimg.fits.fz``."""
    if not mskimg_relpath.endswith("_mskimg.fits"):
        raise NamingError(f"path {mskimg_relpath!r}: expected a ..._mskimg.fits path")
    return mskimg_relpath + ".fz"


def archive_relpath_of(local_relpath: str) -> str:
    """The archive relpath of a stored archive product (inverse of :func:`header_relpath` and :func:`mask_relpath`)."""
    if local_relpath.endswith("_sciimg.header.fits"):
        return local_relpath.removesuffix("_sciimg.header.fits") + "_sciimg.fits"
    if local_relpath.endswith("_mskimg.fits.fz"):
        return local_relpath.removesuffix(".fz")
    return local_relpath


def kind_of(relpath: str) -> str | None:
    """The ledger kind of a file under the root, from its path; None for what is not ours."""
    top = relpath.split("/", 1)[0]
    if top in ("apcat", "ztfin2p3") and relpath.endswith("_apcat.parquet"):
        return "apcat"
    if top == "detrended" and relpath.endswith("_detrended.fits.fz"):
        return "detrended"
    if top == "masters" and relpath.endswith((".fits", ".json")):
        return "masters"
    try:
        name = parse_relpath(archive_relpath_of(relpath))
    except NamingError:
        return None
    if isinstance(name, RawName):
        return "raw"
    if isinstance(name, SciName) and name.suffix == "sciimg.fits":
        return "sciimg_header" if relpath.endswith("_sciimg.header.fits") else "sciimg"
    if isinstance(name, SciName) and name.suffix == "mskimg.fits":
        return "mskimg"
    return None


def check_archive_relpath(relpath: str) -> str:
    """Validate the local relpath of an archive product (also a stored header or mask); return it."""
    archive_path = relpath
    if relpath.endswith("_sciimg.header.fits"):
        archive_path = relpath[: -len(".header.fits")] + ".fits"
    parse_relpath(archive_path)  # rejects absolute paths, '..' and names that are not ZTF products
    return relpath


def local_path(root: Path, relpath: str) -> Path:
    """``<root>/<relpath>``; NamingError for a path that is absolute, has ``.``/``..`` parts or leaves the root."""
    parts = PurePosixPath(relpath).parts
    if not parts or relpath.startswith("/") or "\\" in relpath or any(p in ("..", ".", "") for p in parts):
        raise NamingError(f"path {relpath!r}: not a plain path below the storage root")
    path = root.joinpath(*parts)
    if os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) != os.path.abspath(root):
        raise NamingError(f"path {relpath!r}: outside the storage root")
    return path


def master_size_class(relpath: str) -> str:
    """Which masters share a typical size: ``_bias.fits``, ``_flat.fits`` (LED and master flats), else the extension."""
    for suffix in ("_bias.fits", "_flat.fits"):
        if relpath.endswith(suffix):
            return suffix
    return relpath[-5:]
