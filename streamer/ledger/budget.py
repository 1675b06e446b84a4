"""Queries behind the disk budget: sizes by file class, permanent bytes, the inputs each job pins.

A file's class is its kind, except raw files, which are ``raw_<imgtype>`` (``raw_object``,
``raw_bias``, ``raw_flat``).
"""

from __future__ import annotations

from collections import defaultdict

from streamer.ledger.core import Ledger

_CLASS = "CASE WHEN f.kind = 'raw' THEN 'raw_' || COALESCE(e.imgtype, 'object') ELSE f.kind END"


def largest_size_by_class(ledger: Ledger) -> dict[str, int]:
    """The largest known size (actual, else expected) of a file of each class."""
    sizes: dict[str, int] = {}
    for row in ledger.rows(
        f"SELECT {_CLASS} AS class, MAX(COALESCE(f.actual_size, f.expected_size)) AS size "
        "FROM files f LEFT JOIN exposures e ON e.id = f.exposure_id GROUP BY class"
    ):
        if row["size"]:
            sizes[row["class"]] = int(row["size"])
    return sizes


def permanent_bytes(ledger: Ledger) -> int:
    """Bytes on disk that never leave: kept files and catalogues."""
    return int(
        ledger.scalar(
            "SELECT COALESCE(SUM(disk_bytes), 0) FROM files WHERE state = 'on_disk' AND (kept = 1 OR kind = 'apcat')"
        )
        or 0
    )


def pinned_downloads_by_job(ledger: Ledger) -> dict[int, dict[str, int]]:
    """Per job: how many downloaded (archive) files of each class it pins."""
    out: dict[int, dict[str, int]] = defaultdict(dict)
    for row in ledger.rows(
        f"SELECT p.job_id, {_CLASS} AS class, COUNT(*) AS n FROM pins p JOIN files f ON f.id = p.file_id "
        "LEFT JOIN exposures e ON e.id = f.exposure_id WHERE f.url != '' GROUP BY p.job_id, class"
    ):
        out[int(row["job_id"])][str(row["class"])] = int(row["n"])
    return dict(out)


def most_flats_per_focalplane_job(ledger: Ledger) -> int:
    """The most master flats one focal-plane factors job takes (those of one night and filter); 1 when none is planned."""
    row = ledger.rows(
        "SELECT MAX(n) AS n FROM (SELECT COUNT(*) AS n FROM jobs WHERE kind = 'master_flat' "
        "AND EXISTS (SELECT 1 FROM jobs f WHERE f.kind = 'focalplane' AND f.night = jobs.night "
        "AND f.filtercode = jobs.filtercode) GROUP BY night, filtercode)"
    )
    return int(row[0]["n"] or 1) if row else 1


def largest_product_size(ledger: Ledger, kind: str, relpath_suffix: str = "") -> int | None:
    """The largest actual size of a made file of ``kind`` whose relpath ends with ``relpath_suffix``."""
    escaped = relpath_suffix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    largest = ledger.scalar(
        "SELECT MAX(actual_size) FROM files WHERE kind = ? AND relpath LIKE ? ESCAPE '\\' AND actual_size IS NOT NULL",
        (kind, "%" + escaped),
    )
    return int(largest) if largest else None


def largest_raw_flat_size(ledger: Ledger) -> int | None:
    """The largest size (actual, else expected) of a raw flat."""
    largest = ledger.scalar(
        "SELECT MAX(COALESCE(f.actual_size, f.expected_size)) FROM files f JOIN exposures e ON e.id = f.exposure_id "
        "WHERE f.kind = 'raw' AND e.imgtype = 'flat'"
    )
    return int(largest) if largest else None
