"""IRSA file names and URLs for ZTF raw, science and calibration products.

Pure functions and small frozen records: no I/O. The layouts are those below
``/ibe/data/ztf/products/`` on IRSA:

- raw: ``raw/YYYY/MMDD/FFFFFF/ztf_<ffd>_<field:06d>_<filt>_cNN_<code>.fits.fz``
- sci: ``sci/YYYY/MMDD/FFFFFF/ztf_<ffd>_<field:06d>_<filt>_cNN_o_qQ_<suffix>``
- cal: ``cal/YYYY/MMDD/<caltype>/<filt>/ccdNN/qQ/ztf_<YYYYMMDD>_<filt>_cNN_qQ_<caltype>.fits``

where ``YYYY``, ``MMDD`` and ``FFFFFF`` are ``filefracday[0:4]``, ``[4:8]`` and
``[8:14]``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

DATA_PATH: Final = "/ibe/data/ztf/products/"
SEARCH_PATH: Final = "/ibe/search/ztf/products/"

IMGTYPE_CODES: Final = {"o": "object", "b": "bias", "f": "flat", "d": "dark"}
FILTER_CODES: Final = ("zg", "zr", "zi", "bi")
SCI_SUFFIXES: Final = (
    "sciimg.fits",
    "mskimg.fits",
    "psfcat.fits",
    "sexcat.fits",
    "scimrefdiffimg.fits.fz",
    "diffimgpsf.fits",
)
CAL_TYPES: Final = ("bias", "hifreqflat", "lofreqflat")


class NamingError(ValueError):
    """A file name, path or URL that is not a ZTF product name."""


def _check_filefracday(filefracday: str) -> None:
    if not re.fullmatch(r"\d{14}", filefracday):
        raise NamingError(f"filefracday {filefracday!r}: expected 14 digits, YYYYMMDD then 6 digits of day fraction")
    _check_night(filefracday[:8])


def _check_night(night: str) -> None:
    try:
        dt.datetime.strptime(night, "%Y%m%d")
    except ValueError:
        raise NamingError(f"date {night!r}: expected a valid YYYYMMDD date") from None


def _check_common(field: int, ccdid: int) -> None:
    if not 0 <= field <= 999999:
        raise NamingError(f"field {field}: expected 0..999999")
    if not 1 <= ccdid <= 16:
        raise NamingError(f"ccdid {ccdid}: expected 1..16")


def _check_qid(qid: int) -> None:
    if not 1 <= qid <= 4:
        raise NamingError(f"qid {qid}: expected 1..4")


def _ffd_dirs(filefracday: str) -> str:
    return f"{filefracday[0:4]}/{filefracday[4:8]}/{filefracday[8:14]}"


def night_of(filefracday: str) -> dt.date:
    """The UT date that a ``filefracday`` starts with."""
    _check_filefracday(filefracday)
    return dt.datetime.strptime(filefracday[:8], "%Y%m%d").date()


@dataclass(frozen=True, order=True)
class RawName:
    """One raw CCD file: ``ztf_<ffd>_<field>_<filt>_cNN_<code>.fits.fz``."""

    filefracday: str
    field: int
    filtercode: str
    ccdid: int
    imgtypecode: str

    def __post_init__(self) -> None:
        _check_filefracday(self.filefracday)
        _check_common(self.field, self.ccdid)
        if self.imgtypecode not in IMGTYPE_CODES:
            raise NamingError(f"imgtypecode {self.imgtypecode!r}: expected one of {', '.join(IMGTYPE_CODES)}")
        if not re.fullmatch(r"z[gri]|bi", self.filtercode):
            raise NamingError(f"filtercode {self.filtercode!r}: expected one of {', '.join(FILTER_CODES)}")

    @property
    def imgtype(self) -> str:
        return IMGTYPE_CODES[self.imgtypecode]

    @property
    def filename(self) -> str:
        return (
            f"ztf_{self.filefracday}_{self.field:06d}_{self.filtercode}"
            f"_c{self.ccdid:02d}_{self.imgtypecode}.fits.fz"
        )

    @property
    def relpath(self) -> str:
        return f"raw/{_ffd_dirs(self.filefracday)}/{self.filename}"

    def url(self, base_url: str) -> str:
        return data_url(base_url, self.relpath)

    def sci(self, qid: int, suffix: str) -> SciName:
        """The IPAC science product of quadrant ``qid`` of this (science) raw file."""
        return SciName(self.filefracday, self.field, self.filtercode, self.ccdid, qid, suffix)


@dataclass(frozen=True, order=True)
class SciName:
    """One IPAC science product of a quadrant: ``ztf_<ffd>_<field>_<filt>_cNN_o_qQ_<suffix>``."""

    filefracday: str
    field: int
    filtercode: str
    ccdid: int
    qid: int
    suffix: str

    def __post_init__(self) -> None:
        _check_filefracday(self.filefracday)
        _check_common(self.field, self.ccdid)
        _check_qid(self.qid)
        if not re.fullmatch(r"z[gri]", self.filtercode):
            raise NamingError(f"filtercode {self.filtercode!r}: expected zg, zr or zi for a science product")
        if not re.fullmatch(r"[a-z][a-z0-9]*\.fits(\.fz)?", self.suffix):
            raise NamingError(f"suffix {self.suffix!r}: expected a product suffix such as 'sciimg.fits'")

    @property
    def rcid(self) -> int:
        return rcid_of(self.ccdid, self.qid)

    @property
    def filename(self) -> str:
        return (
            f"ztf_{self.filefracday}_{self.field:06d}_{self.filtercode}"
            f"_c{self.ccdid:02d}_o_q{self.qid}_{self.suffix}"
        )

    @property
    def relpath(self) -> str:
        return f"sci/{_ffd_dirs(self.filefracday)}/{self.filename}"

    def url(self, base_url: str) -> str:
        return data_url(base_url, self.relpath)

    @property
    def raw(self) -> RawName:
        return RawName(self.filefracday, self.field, self.filtercode, self.ccdid, "o")


@dataclass(frozen=True, order=True)
class CalName:
    """One IPAC calibration product: ``ztf_<YYYYMMDD>_<filt>_cNN_qQ_<caltype>.fits``."""

    night: str
    filtercode: str
    ccdid: int
    qid: int
    caltype: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d{8}", self.night):
            raise NamingError(f"night {self.night!r}: expected YYYYMMDD")
        _check_night(self.night)
        _check_common(0, self.ccdid)
        _check_qid(self.qid)
        if not re.fullmatch(r"z[gri]|00", self.filtercode):
            raise NamingError(f"filtercode {self.filtercode!r}: expected zg, zr, zi or 00 for a calibration")
        if self.caltype not in CAL_TYPES:
            raise NamingError(f"caltype {self.caltype!r}: expected one of {', '.join(CAL_TYPES)}")

    @property
    def filename(self) -> str:
        return f"ztf_{self.night}_{self.filtercode}_c{self.ccdid:02d}_q{self.qid}_{self.caltype}.fits"

    @property
    def relpath(self) -> str:
        return (
            f"cal/{self.night[0:4]}/{self.night[4:8]}/{self.caltype}/{self.filtercode}"
            f"/ccd{self.ccdid:02d}/q{self.qid}/{self.filename}"
        )

    def url(self, base_url: str) -> str:
        return data_url(base_url, self.relpath)


ProductName = RawName | SciName | CalName

_RAW_RE = re.compile(r"ztf_(\d{14})_(\d{6})_([a-z]{2})_c(\d{2})_([a-z])\.fits\.fz")
_SCI_RE = re.compile(r"ztf_(\d{14})_(\d{6})_([a-z]{2})_c(\d{2})_o_q(\d)_([a-z][a-z0-9]*\.fits(?:\.fz)?)")
_CAL_RE = re.compile(r"ztf_(\d{8})_([a-z0-9]{2})_c(\d{2})_q(\d)_([a-z]+)\.fits")


def parse_filename(filename: str) -> ProductName:
    """Parse a bare ZTF product file name; raise NamingError naming what is wrong."""
    if m := _RAW_RE.fullmatch(filename):
        return RawName(m[1], int(m[2]), m[3], int(m[4]), m[5])
    if m := _SCI_RE.fullmatch(filename):
        return SciName(m[1], int(m[2]), m[3], int(m[4]), int(m[5]), m[6])
    if m := _CAL_RE.fullmatch(filename):
        return CalName(m[1], m[2], int(m[3]), int(m[4]), m[5])
    raise NamingError(
        f"file name {filename!r}: expected a ZTF product name such as "
        "'ztf_20200924431759_000655_zr_c13_o.fits.fz' or 'ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits'"
    )


def parse_relpath(relpath: str) -> ProductName:
    """Parse a path relative to ``/ibe/data/ztf/products/`` and check its directories agree with its name."""
    parts = PurePosixPath(relpath).parts
    if not parts or ".." in parts or relpath.startswith("/"):
        raise NamingError(f"path {relpath!r}: expected a relative archive path such as 'raw/2020/0924/431759/<name>'")
    name = parse_filename(parts[-1])
    if name.relpath != relpath:
        raise NamingError(f"path {relpath!r}: directories do not match the file name (expected {name.relpath!r})")
    return name


def data_url(base_url: str, relpath: str) -> str:
    """URL of a product below IRSA's data root."""
    return base_url.rstrip("/") + DATA_PATH + relpath


def search_url(base_url: str, table: str) -> str:
    """URL of an IBE search table: ``raw``, ``sci`` or ``cal``."""
    if table not in ("raw", "sci", "cal"):
        raise NamingError(f"search table {table!r}: expected raw, sci or cal")
    return base_url.rstrip("/") + SEARCH_PATH + table


def relpath_from_url(url: str) -> str:
    """The archive-relative path of a data URL; raise NamingError for anything else."""
    marker = url.find(DATA_PATH)
    if marker < 0:
        raise NamingError(f"URL {url!r}: expected a path below {DATA_PATH}")
    return url[marker + len(DATA_PATH):].split("?", 1)[0]


def rcid_of(ccdid: int, qid: int) -> int:
    """Readout channel 0..63 of a CCD quadrant."""
    _check_common(0, ccdid)
    _check_qid(qid)
    return 4 * (ccdid - 1) + qid - 1


def ccd_quadrant_of(rcid: int) -> tuple[int, int]:
    """(ccdid, qid) of readout channel ``rcid`` 0..63: the inverse of :func:`rcid_of`."""
    if not 0 <= rcid <= 63:
        raise NamingError(f"rcid {rcid}: expected 0..63")
    return rcid // 4 + 1, rcid % 4 + 1
