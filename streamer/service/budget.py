"""The smallest disk budget the service can work in, and the check at start.

The minimum is what must sit on disk at once in the worst moment of the work graph,
plus what never leaves:

- kept and permanent bytes: files that a consumer keeps and the catalogues already on disk;
- the masters of the night-CCD being processed (bias, the LED flats of one filter, the
  master flats of every filter), which stay until the last frame that needs them is done;
- the largest single job's downloaded inputs (e.g. one LED's flats) and its output;
- the ledger.

Sizes come from the ledger (expected sizes from planning, actual sizes of products
already made); a master not yet made is estimated from the raw flats it comes from
(``MASTER_TO_RAW_FLAT``); before anything is planned, typical ZTF sizes stand in.
"""

from __future__ import annotations

from typing import Final

from streamer.config import Config, format_size
from streamer.errors import UsageError
from streamer.ledger.core import Ledger

TYPICAL_BYTES: Final = {
    "raw_object": 30 * 10**6,
    "raw_flat": 42 * 10**6,
    "raw_bias": 18 * 10**6,
    "sciimg_header": 24 * 1024,
    "mskimg": 2 * 10**6,
    "master": 160 * 10**6,
    "apcat": 2 * 10**6,
}
TYPICAL_FLATS_PER_LED: Final = 7
TYPICAL_LEDS_PER_FILTER: Final = 4
MASTER_TO_RAW_FLAT: Final = 2.0
LEDGER_ALLOWANCE: Final = 2 * 10**6


def _class_sizes(ledger: Ledger) -> dict[str, int]:
    """The largest known size of a file of each class (raw by image type, then other kinds)."""
    sizes: dict[str, int] = {}
    for row in ledger.rows(
        "SELECT CASE WHEN f.kind = 'raw' THEN 'raw_' || COALESCE(e.imgtype, 'object') ELSE f.kind END AS class, "
        "MAX(COALESCE(f.actual_size, f.expected_size)) AS size "
        "FROM files f LEFT JOIN exposures e ON e.id = f.exposure_id GROUP BY class"
    ):
        if row["size"]:
            sizes[row["class"]] = int(row["size"])
    return sizes


def minimum_budget(config: Config, ledger: Ledger) -> int:
    """Bytes below which the service cannot make progress (see the module docstring)."""
    permanent = int(
        ledger.scalar(
            "SELECT COALESCE(SUM(disk_bytes), 0) FROM files WHERE state = 'on_disk' AND (kept = 1 OR kind = 'apcat')"
        )
        or 0
    )
    known = _class_sizes(ledger)
    raw_flat = known.get("raw_flat")

    def size_of(file_class: str) -> int:
        if file_class in known:
            return known[file_class]
        if raw_flat is not None and file_class.startswith("raw_"):
            return raw_flat
        return TYPICAL_BYTES.get(file_class, TYPICAL_BYTES["raw_object"])

    master = known.get("masters") or (int(raw_flat * MASTER_TO_RAW_FLAT) if raw_flat else TYPICAL_BYTES["master"])
    masters_per_ccd = 1 + TYPICAL_LEDS_PER_FILTER + 3
    per_job: dict[int, int] = {}
    for row in ledger.rows(
        "SELECT p.job_id, CASE WHEN f.kind = 'raw' THEN 'raw_' || COALESCE(e.imgtype, 'object') ELSE f.kind END AS class, "
        "COUNT(*) AS n FROM pins p JOIN files f ON f.id = p.file_id LEFT JOIN exposures e ON e.id = f.exposure_id "
        "WHERE f.url != '' GROUP BY p.job_id, class"
    ):
        per_job[row["job_id"]] = per_job.get(row["job_id"], 0) + row["n"] * size_of(row["class"])
    largest_job_inputs = max(per_job.values(), default=TYPICAL_FLATS_PER_LED * size_of("raw_flat"))
    apcat = known.get("apcat") or max(size_of("raw_object") // 20, 64 * 1024)
    ledger_bytes = ledger.path.stat().st_size if ledger.path is not None and ledger.path.exists() else 0
    return permanent + masters_per_ccd * master + largest_job_inputs + apcat + 2 * ledger_bytes + LEDGER_ALLOWANCE


def record_minimum(config: Config, ledger: Ledger) -> int:
    """Compute the minimum workable budget and record it for status."""
    minimum = minimum_budget(config, ledger)
    ledger.set_meta("minimum_budget_bytes", str(minimum))
    return minimum


def check_budget(config: Config, ledger: Ledger) -> int:
    """Refuse to start when ``storage.budget`` is below the minimum; record the minimum for status."""
    minimum = record_minimum(config, ledger)
    if config.storage.budget < minimum:
        raise UsageError(
            f"{config.source}: storage.budget = {format_size(config.storage.budget)} is below the minimum "
            f"workable budget of {format_size(minimum)} ({minimum} B): raise it to at least that"
        )
    return minimum


def estimate_product_bytes(ledger: Ledger, relpath: str, kind: str) -> int:
    """Bytes a product about to be made will take: the largest of its sort so far, with a margin."""
    if kind == "masters":
        suffix = "_bias.fits" if relpath.endswith("_bias.fits") else "_flat.fits" if relpath.endswith("_flat.fits") else relpath[-5:]
        pattern = "%" + suffix
    else:
        pattern = "%"
    largest = ledger.scalar(
        "SELECT MAX(actual_size) FROM files WHERE kind = ? AND relpath LIKE ? AND actual_size IS NOT NULL",
        (kind, pattern),
    )
    if largest:
        return int(largest * 1.1) + 64 * 1024
    raw_flat = ledger.scalar(
        "SELECT MAX(COALESCE(f.actual_size, f.expected_size)) FROM files f JOIN exposures e ON e.id = f.exposure_id "
        "WHERE f.kind = 'raw' AND e.imgtype = 'flat'"
    )
    if kind == "masters":
        return int(raw_flat * MASTER_TO_RAW_FLAT) if raw_flat else TYPICAL_BYTES["master"]
    return max(int(raw_flat) // 10, 256 * 1024) if raw_flat else TYPICAL_BYTES["apcat"]
