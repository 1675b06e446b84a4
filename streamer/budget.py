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

from .config import Config, format_size
from .errors import UsageError
from .ledger import Ledger

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
MASTER_TO_RAW_FLAT: Final = 4.0
LEDGER_ALLOWANCE: Final = 16 * 10**6


def _max_actual(ledger: Ledger, kind: str, relpath_like: str = "%") -> int | None:
    value = ledger.scalar(
        "SELECT MAX(COALESCE(actual_size, expected_size)) FROM files WHERE kind = ? AND relpath LIKE ?",
        (kind, relpath_like),
    )
    return None if value is None else int(value)


def minimum_budget(config: Config, ledger: Ledger) -> int:
    """Bytes below which the service cannot make progress (see the module docstring)."""
    permanent = int(
        ledger.scalar(
            "SELECT COALESCE(SUM(disk_bytes), 0) FROM files WHERE state = 'on_disk' AND (kept = 1 OR kind = 'apcat')"
        )
        or 0
    )
    raw_flat = _max_actual(ledger, "raw", "%_f.fits.fz")
    master = _max_actual(ledger, "masters", "%flat.fits") or (
        int(raw_flat * MASTER_TO_RAW_FLAT) if raw_flat else TYPICAL_BYTES["master"]
    )
    masters_per_ccd = 1 + TYPICAL_LEDS_PER_FILTER + 3
    largest_job_inputs = int(
        ledger.scalar(
            "SELECT COALESCE(MAX(total), 0) FROM (SELECT SUM(COALESCE(f.expected_size, f.actual_size, 0)) AS total "
            "FROM pins p JOIN files f ON f.id = p.file_id WHERE f.url != '' GROUP BY p.job_id)"
        )
        or 0
    )
    if largest_job_inputs == 0:
        largest_job_inputs = TYPICAL_FLATS_PER_LED * TYPICAL_BYTES["raw_flat"]
    apcat = _max_actual(ledger, "apcat") or (TYPICAL_BYTES["apcat"] if raw_flat is None else raw_flat // 20)
    return permanent + masters_per_ccd * master + largest_job_inputs + apcat + LEDGER_ALLOWANCE


def check_budget(config: Config, ledger: Ledger) -> int:
    """Refuse to start when ``storage.budget`` is below the minimum; record the minimum for status."""
    minimum = minimum_budget(config, ledger)
    ledger.set_meta("minimum_budget_bytes", str(minimum))
    if config.storage.budget < minimum:
        raise UsageError(
            f"{config.source}: storage.budget = {format_size(config.storage.budget)} is below the minimum "
            f"workable budget of {format_size(minimum)} ({minimum} B): raise it to at least that"
        )
    return minimum
