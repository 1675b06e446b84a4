"""Budget arithmetic: the smallest workable disk budget, and the size of a product not yet made.

The minimum is what must sit on disk at once in the worst moment of the work graph,
plus what never leaves:

- kept and permanent bytes: files that a consumer keeps and the catalogues already on disk;
- the masters of the night-CCD being processed (bias, the LED flats of one filter, the
  master flats of every filter), which stay until the last frame that needs them is done;
- the largest single job's downloaded inputs (e.g. one LED's flats) and its output;
- with the focal-plane normalisation, the master flats of the other CCDs of a night and filter,
  which its factors job reads together before any exposure of that filter may start;
- the ledger.

Sizes are by file class (a kind, or ``raw_<imgtype>`` for raw files): known ones come from
the ledger; a master not yet made is estimated from the raw flats it comes from
(``MASTER_TO_RAW_FLAT``); before anything is planned, typical ZTF sizes stand in.

The filesystem can hold less than the budget (a budget set above the free space, other users'
files): :func:`budget_in_effect` caps the budget at what the filesystem can hold, and
:func:`disk_has_room` says whether a write may start now (see ``streamer.service.diskspace``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

TYPICAL_BYTES: Final = {
    "raw_object": 30 * 10**6,
    "raw_flat": 42 * 10**6,
    "raw_bias": 18 * 10**6,
    "sciimg_header": 24 * 1024,
    "mskimg": 2 * 10**6,
    "master": 160 * 10**6,
    "apcat": 2 * 10**6,
    "detrended": 20 * 10**6,
}
TYPICAL_FLATS_PER_LED: Final = 7
TYPICAL_LEDS_PER_FILTER: Final = 4
MASTER_TO_RAW_FLAT: Final = 2.0
#: A detrended quadrant (SCI and VAR quantised, MASK) against a raw CCD file (four quadrants of 16-bit counts).
DETRENDED_TO_RAW_FLAT: Final = 0.5
LEDGER_ALLOWANCE: Final = 2 * 10**6
#: Room kept above the largest product of a sort made so far.
PRODUCT_MARGIN: Final = 1.1
PRODUCT_SLACK_BYTES: Final = 64 * 1024


def class_size(file_class: str, known: Mapping[str, int]) -> int:
    """The size of a file of ``file_class``: known, else a raw flat's for a raw, else the typical ZTF size."""
    if file_class in known:
        return known[file_class]
    raw_flat = known.get("raw_flat")
    if raw_flat is not None and file_class.startswith("raw_"):
        return raw_flat
    return TYPICAL_BYTES.get(file_class, TYPICAL_BYTES["raw_object"])


def minimum_budget_bytes(
    *,
    permanent_bytes: int,
    known_sizes: Mapping[str, int],
    pinned_downloads: Mapping[int, Mapping[str, int]],
    ledger_bytes: int,
    flats_read_together: int = 1,
) -> int:
    """Bytes below which the service cannot make progress (see the module docstring).

    ``known_sizes``: largest size by file class; ``pinned_downloads``: per job, the number of
    downloaded files of each class it pins; ``ledger_bytes``: the ledger file's size now;
    ``flats_read_together``: the most master flats one focal-plane factors job reads (1 without one).
    """
    raw_flat = known_sizes.get("raw_flat")
    master = known_sizes.get("masters") or (int(raw_flat * MASTER_TO_RAW_FLAT) if raw_flat else TYPICAL_BYTES["master"])
    masters_per_ccd = 1 + TYPICAL_LEDS_PER_FILTER + 3
    per_job = [sum(n * class_size(c, known_sizes) for c, n in classes.items()) for classes in pinned_downloads.values()]
    largest_job_inputs = max(per_job, default=TYPICAL_FLATS_PER_LED * class_size("raw_flat", known_sizes))
    apcat = known_sizes.get("apcat") or max(class_size("raw_object", known_sizes) // 20, 64 * 1024)
    other_ccds_flats = max(flats_read_together - 1, 0) * master
    return (
        permanent_bytes + masters_per_ccd * master + other_ccds_flats + largest_job_inputs + apcat
        + 2 * ledger_bytes + LEDGER_ALLOWANCE
    )  # fmt: skip


def product_estimate_bytes(kind: str, *, largest_of_its_sort: int | None, largest_raw_flat: int | None) -> int:
    """Bytes to reserve for a product about to be made.

    The largest of its sort made so far with a margin; else, from the largest raw flat: twice
    it for a master, half of it for a detrended quadrant, a tenth of it (at least 256 KiB) for
    anything else; else typical ZTF sizes.
    """
    if largest_of_its_sort:
        return int(largest_of_its_sort * PRODUCT_MARGIN) + PRODUCT_SLACK_BYTES
    if kind == "masters":
        return int(largest_raw_flat * MASTER_TO_RAW_FLAT) if largest_raw_flat else TYPICAL_BYTES["master"]
    if kind == "detrended":
        return int(largest_raw_flat * DETRENDED_TO_RAW_FLAT) if largest_raw_flat else TYPICAL_BYTES["detrended"]
    return max(largest_raw_flat // 10, 256 * 1024) if largest_raw_flat else TYPICAL_BYTES["apcat"]


#: Seconds between two reads of the free space while work waits for the disk: doubling, capped.
DISK_POLL_FIRST_S: Final = 0.5
DISK_POLL_MAX_S: Final = 15.0


def disk_margin_bytes(filesystem_bytes: int) -> int:
    """Free space always left on the filesystem (metadata blocks, the ledger's journal, other writers):
    a fiftieth of its size, between 256 KiB and 64 MiB."""
    return min(64 * 2**20, max(256 * 1024, filesystem_bytes // 50))


def disk_has_room(free_bytes: int, need_bytes: int, filesystem_bytes: int) -> bool:
    """Whether ``need_bytes`` can be written now and still leave the margin free."""
    return free_bytes >= need_bytes + disk_margin_bytes(filesystem_bytes)


def disk_deficit_bytes(free_bytes: int, need_bytes: int, filesystem_bytes: int) -> int:
    """Bytes to free before ``need_bytes`` has room (0 when it has)."""
    return max(0, need_bytes + disk_margin_bytes(filesystem_bytes) - free_bytes)


def next_disk_poll_s(previous_s: float | None) -> float:
    """The wait before the next read of the free space: the first, then doubling up to the cap."""
    return DISK_POLL_FIRST_S if previous_s is None else min(previous_s * 2, DISK_POLL_MAX_S)


def budget_in_effect(budget: int, *, own_bytes: int, free_bytes: int, filesystem_bytes: int, minimum: int) -> int:
    """The budget the service works to: ``budget``, capped by what the filesystem can hold for it
    (``own_bytes`` of its files already there plus the free space, less the margin), but never below
    the minimum workable budget (below it, the disk pause waits for room instead)."""
    room = own_bytes + free_bytes - disk_margin_bytes(filesystem_bytes)
    return min(budget, max(room, minimum))
