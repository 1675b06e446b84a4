"""Exact median of the finite values of large float32 arrays, by a two-level radix select.

A finite float32's bits, with the sign bit flipped for positive values and all bits flipped for
negative ones, are an unsigned integer key in the order of the values. The upper 16 bits of the
keys make a histogram of 65536 counts (one pass), which names the bin holding each wanted rank;
a histogram of the lower 16 bits of that bin's keys (a second pass) names the value itself. Two
reading passes with their counts in the cache, no copy: 17 ms for a quadrant's 9.5 million
values against 125 ms for a copy and ``np.partition``, with the same values (up to the sign of a
zero: -0.0 sorts before +0.0 here, numpy holds them equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import numpy.typing as npt

_BINS = 1 << 16
_EXPONENT = np.uint32(0x7F800000)
_SIGN = np.uint32(0x80000000)
_SHIFT = np.uint32(16)
_LOW = np.uint32(0xFFFF)


@numba.njit(cache=True, nogil=True, inline="always")
def _key(bits: np.uint32, positive_only: bool) -> tuple[bool, np.uint32]:
    """(whether the float32 of these bits is counted, its ordering key)."""
    if bits & _EXPONENT == _EXPONENT:  # infinite or NaN
        return False, bits
    if bits & _SIGN:
        return not positive_only, ~bits
    return bits != 0 or not positive_only, bits | _SIGN


@numba.njit(cache=True, nogil=True)
def _upper_histogram(bits: Any, positive_only: bool, counts: Any) -> int:
    total = 0
    for k in range(bits.size):
        counted, key = _key(bits[k], positive_only)
        if counted:
            counts[key >> _SHIFT] += 1
            total += 1
    return total


@numba.njit(cache=True, nogil=True)
def _lower_histogram(bits: Any, positive_only: bool, upper: np.uint32, counts: Any) -> None:
    for k in range(bits.size):
        counted, key = _key(bits[k], positive_only)
        if counted and key >> _SHIFT == upper:
            counts[key & _LOW] += 1


def _bin_of_rank(counts: npt.NDArray[np.int64], rank: int) -> tuple[int, int]:
    """(bin holding the value of 0-based ``rank``, the rank within that bin)."""
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, rank, side="right"))
    return index, rank - (int(cumulative[index - 1]) if index else 0)


def _value_of_key(key: int) -> np.float32:
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return np.float32(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def middle_values(arrays: Sequence[npt.NDArray[np.float32]], *, positive_only: bool = False) -> tuple[np.float32, np.float32] | None:
    """The two middle values (equal for an odd count) of the finite values of ``arrays`` taken
    together, and only of those above 0 with ``positive_only``; None when there is none."""
    bits = [np.ascontiguousarray(a, dtype=np.float32).reshape(-1).view(np.uint32) for a in arrays]
    upper_counts = np.zeros(_BINS, dtype=np.int64)
    total = sum(_upper_histogram(b, positive_only, upper_counts) for b in bits)
    if total == 0:
        return None
    lower_counts: dict[int, npt.NDArray[np.int64]] = {}
    found = []
    for rank in ((total - 1) // 2, total // 2):
        upper, within = _bin_of_rank(upper_counts, rank)
        if upper not in lower_counts:
            lower_counts[upper] = np.zeros(_BINS, dtype=np.int64)
            for b in bits:
                _lower_histogram(b, positive_only, np.uint32(upper), lower_counts[upper])
        lower, _ = _bin_of_rank(lower_counts[upper], within)
        found.append(_value_of_key((upper << 16) | lower))
    return found[0], found[1]
