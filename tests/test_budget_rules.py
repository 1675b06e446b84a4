"""The budget arithmetic with plain values (streamer.rules.budget): no ledger, no disk."""

from __future__ import annotations

import pytest

from streamer.rules.budget import (
    class_size,
    minimum_budget_bytes,
    product_estimate_bytes,
)

MB = 10**6


def test_class_size_prefers_known_then_a_raw_flat_then_typical() -> None:
    known = {"raw_flat": 40 * MB, "apcat": 3 * MB}
    assert class_size("apcat", known) == 3 * MB
    assert class_size("raw_bias", known) == 40 * MB  # an unknown raw is sized like a raw flat
    assert class_size("mskimg", known) == 2 * MB  # typical ZTF mask
    assert class_size("raw_object", {}) == 30 * MB


def test_minimum_before_anything_is_known_is_the_typical_night() -> None:
    # 8 masters of 160 MB, 7 flats of 42 MB, a 1.5 MB catalogue (30 MB / 20), 2 MB for the ledger
    expected = 8 * 160 * MB + 7 * 42 * MB + 1_500_000 + 2 * MB
    assert minimum_budget_bytes(permanent_bytes=0, known_sizes={}, pinned_downloads={}, ledger_bytes=0) == expected


def test_minimum_from_known_sizes_and_the_largest_job() -> None:
    known = {"raw_flat": 10 * MB, "raw_object": 8 * MB, "masters": 25 * MB, "apcat": MB}
    pinned = {
        1: {"raw_bias": 12},  # 12 biases sized like flats (no bias size known): 120 MB
        2: {"raw_flat": 5},  # 50 MB
        3: {"raw_object": 1, "mskimg": 4},  # 8 MB + 4 typical masks of 2 MB
    }
    got = minimum_budget_bytes(permanent_bytes=7 * MB, known_sizes=known, pinned_downloads=pinned, ledger_bytes=3 * MB)
    assert got == 7 * MB + 8 * 25 * MB + 120 * MB + 1 * MB + 2 * 3 * MB + 2 * MB


def test_the_focal_plane_factors_hold_the_other_ccds_flats_at_once() -> None:
    known = {"raw_flat": 10 * MB, "masters": 25 * MB}
    alone = minimum_budget_bytes(permanent_bytes=0, known_sizes=known, pinned_downloads={}, ledger_bytes=0)
    four = minimum_budget_bytes(permanent_bytes=0, known_sizes=known, pinned_downloads={}, ledger_bytes=0, flats_read_together=4)
    assert four - alone == 3 * 25 * MB  # the flats of the 3 other CCDs, read with this CCD's by the factors job


def test_a_master_not_yet_made_is_twice_a_raw_flat() -> None:
    known = {"raw_flat": 10 * MB}
    got = minimum_budget_bytes(permanent_bytes=0, known_sizes=known, pinned_downloads={}, ledger_bytes=0)
    # 8 masters of 20 MB, 7 flats of 10 MB, catalogue max(10 MB / 20, 64 KiB) = 0.5 MB (raw_object sized like a flat)
    assert got == 8 * 20 * MB + 7 * 10 * MB + 500_000 + 2 * MB


@pytest.mark.parametrize(
    ("kind", "largest", "raw_flat", "expected"),
    [
        ("masters", 1_000_000, 5 * MB, 1_100_000 + 65_536),  # the largest of its sort, 10 % and 64 KiB more
        ("apcat", 200_000, None, 220_000 + 65_536),
        ("masters", None, 5 * MB, 10 * MB),
        ("masters", None, None, 160 * MB),
        ("detrended", None, 5 * MB, 2_500_000),
        ("detrended", None, None, 20 * MB),
        ("apcat", None, 5 * MB, 500_000),
        ("apcat", None, 1 * MB, 262_144),  # at least 256 KiB
        ("apcat", None, None, 2 * MB),
    ],
)
def test_product_estimate(kind: str, largest: int | None, raw_flat: int | None, expected: int) -> None:
    assert product_estimate_bytes(kind, largest_of_its_sort=largest, largest_raw_flat=raw_flat) == expected
