"""The metadata rows of an IRSA-like directory: what a file name encodes, plus its primary header.

Any directory laid out like IRSA's ``/ibe/data/ztf/products/`` can be indexed, so real files can be
replayed. Fallbacks where a keyword is absent: obsjd from the filefracday, field from the name,
fid from the filter code, expid from the night and the day fraction (the generator's rule).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from astropy.io import fits

from streamer.storage.naming import CalName, NamingError, RawName, SciName, parse_relpath, rcid_of

log = logging.getLogger(__name__)

RAW_COLUMNS: Final = (
    "field", "ccdid", "fid", "filtercode", "nid", "expid", "imgtype", "imgtypecode", "filefracday",
    "obsdate", "obsjd", "exptime", "seeing", "airmass", "ipac_gid", "infobits",
)
SCI_COLUMNS: Final = (
    *RAW_COLUMNS[:8], "qid", "rcid", "pid", *RAW_COLUMNS[8:], "maglimit",
    "crpix1", "crpix2", "crval1", "crval2", "cd11", "cd12", "cd21", "cd22",
)
CAL_COLUMNS: Final = ("ccdid", "qid", "rcid", "fid", "filtercode", "caltype", "nightdate", "nframes", "startobsdate", "endobsdate")
COLUMNS: Final = {"raw": RAW_COLUMNS, "sci": SCI_COLUMNS, "cal": CAL_COLUMNS}
FIDS: Final = {"zg": 1, "zr": 2, "zi": 3, "bi": 0, "00": 0}
NID_ORIGIN: Final = dt.date(2016, 12, 27)


def _jd_of_night(night: str) -> float:
    return dt.datetime.strptime(night, "%Y%m%d").date().toordinal() + 1721424.5


def obsdate_of(obsjd: float) -> str:
    """IRSA's obsdate text for a Julian date: ``YYYY-MM-DD HH:MM:SS.sss+00``."""
    moment = dt.datetime(2000, 1, 1, 12) + dt.timedelta(days=obsjd - 2451545.0)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}+00"


def _header(path: Path) -> Mapping[str, Any]:
    try:
        return fits.getheader(path, 0)
    except (OSError, ValueError) as err:
        log.warning("index: cannot read the primary header of %s (%s); using the file name only", path, err)
        return {}


def _number(header: Mapping[str, Any], key: str) -> float | int | None:
    value = header.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _exposure_columns(name: RawName | SciName, header: Mapping[str, Any]) -> dict[str, Any]:
    ffd = name.filefracday
    fraction_digits = int(ffd[8:])
    obsjd = _number(header, "OBSJD")
    if obsjd is None:
        obsjd = _jd_of_night(ffd[:8]) + (fraction_digits + 0.5) / 1e6
    nid = _number(header, "DBNID")
    if nid is None:
        nid = (dt.datetime.strptime(ffd[:8], "%Y%m%d").date() - NID_ORIGIN).days
    expid = _number(header, "EXPID") or _number(header, "DBEXPID") or int(nid) * 100000 + fraction_digits // 10
    imgtypecode = name.imgtypecode if isinstance(name, RawName) else "o"
    fid = _number(header, "FILTERID")
    return {
        "field": int(field_id) if (field_id := _number(header, "FIELDID")) is not None else name.field,
        "ccdid": name.ccdid,
        "fid": int(fid) if fid is not None else FIDS.get(name.filtercode, 0),
        "filtercode": name.filtercode,
        "nid": int(nid),
        "expid": int(expid),
        "imgtype": str(header.get("IMGTYPE", {"o": "object", "b": "bias", "f": "flat", "d": "dark"}[imgtypecode])).strip(),
        "imgtypecode": imgtypecode,
        "filefracday": int(ffd),
        "obsdate": obsdate_of(float(obsjd)),
        "obsjd": float(obsjd),
        "exptime": _number(header, "EXPTIME"),
        "seeing": _number(header, "SEEING"),
        "airmass": _number(header, "AIRMASS"),
        "ipac_gid": 1,
        "infobits": int(_number(header, "INFOBITS") or 0),
    }


@dataclass
class ArchiveIndex:
    """Rows of the ``raw``, ``sci`` and ``cal`` tables, built once from the files under a root."""

    root: Path
    tables: dict[str, list[dict[str, Any]]]

    @classmethod
    def build(cls, root: Path) -> ArchiveIndex:
        tables: dict[str, list[dict[str, Any]]] = {"raw": [], "sci": [], "cal": []}
        sci_quadrants: dict[tuple[str, int, str, int, int], list[Path]] = {}
        for top in ("raw", "sci", "cal"):
            base = root / top
            if not base.is_dir():
                continue
            for directory, _dirs, files in os.walk(base):
                for filename in sorted(files):
                    path = Path(directory) / filename
                    if not path.resolve().is_relative_to(root.resolve()):
                        log.warning("index: %s leaves the root; not listed", path)
                        continue
                    relpath = path.relative_to(root).as_posix()
                    try:
                        name = parse_relpath(relpath)
                    except NamingError:
                        continue
                    if isinstance(name, RawName) and top == "raw":
                        row = _exposure_columns(name, _header(path))
                        tables["raw"].append(row)
                    elif isinstance(name, SciName) and top == "sci":
                        key = (name.filefracday, name.field, name.filtercode, name.ccdid, name.qid)
                        sci_quadrants.setdefault(key, []).append(path)
                    elif isinstance(name, CalName) and top == "cal":
                        tables["cal"].append(_cal_row(name, _header(path)))
        for paths in sci_quadrants.values():
            chosen = next((p for p in paths if p.name.endswith("_sciimg.fits")), paths[0])
            name = parse_relpath(chosen.relative_to(root).as_posix())
            assert isinstance(name, SciName)
            tables["sci"].append(_sci_row(name, _header(chosen)))
        tables["raw"].sort(key=lambda r: (r["filefracday"], r["ccdid"]))
        tables["sci"].sort(key=lambda r: (r["filefracday"], r["ccdid"], r["qid"]))
        tables["cal"].sort(key=lambda r: (r["nightdate"], r["caltype"], r["filtercode"], r["ccdid"], r["qid"]))
        return cls(root, tables)


def _sci_row(name: SciName, header: Mapping[str, Any]) -> dict[str, Any]:
    row = _exposure_columns(name, header)
    rcid = rcid_of(name.ccdid, name.qid)
    pid = _number(header, "DBPID") or row["expid"] * 10000 + rcid * 100 + 15
    row.update(
        qid=name.qid,
        rcid=rcid,
        pid=int(pid),
        maglimit=_number(header, "MAGLIM"),
        crpix1=_number(header, "CRPIX1"),
        crpix2=_number(header, "CRPIX2"),
        crval1=_number(header, "CRVAL1"),
        crval2=_number(header, "CRVAL2"),
        cd11=_number(header, "CD1_1"),
        cd12=_number(header, "CD1_2"),
        cd21=_number(header, "CD2_1"),
        cd22=_number(header, "CD2_2"),
    )
    return {column: row[column] for column in SCI_COLUMNS}


def _cal_row(name: CalName, header: Mapping[str, Any]) -> dict[str, Any]:
    night = f"{name.night[:4]}-{name.night[4:6]}-{name.night[6:]}"
    return {
        "ccdid": name.ccdid,
        "qid": name.qid,
        "rcid": rcid_of(name.ccdid, name.qid),
        "fid": FIDS.get(name.filtercode, 0),
        "filtercode": name.filtercode,
        "caltype": name.caltype,
        "nightdate": night,
        "nframes": _number(header, "NFRAMES"),
        "startobsdate": header.get("STARTOBS"),
        "endobsdate": header.get("ENDOBS"),
    }
