"""The radix-select median against numpy's sort (the obvious reference)."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.detrend.selection import middle_values


def sorted_middle(arrays: list[np.ndarray], positive_only: bool) -> tuple[float, float] | None:
    values = np.concatenate([a.ravel() for a in arrays])
    values = np.sort(values[np.isfinite(values) & ((values > 0) | (not positive_only))])
    n = values.size
    return None if n == 0 else (float(values[(n - 1) // 2]), float(values[n // 2]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("positive_only", [False, True])
def test_middle_values_are_those_of_a_sort(seed: int, positive_only: bool) -> None:
    rng = np.random.default_rng(seed)
    arrays = [
        rng.normal(rng.uniform(-3, 3), 10.0 ** rng.uniform(-6, 6), size=int(rng.integers(1, 5000))).astype(np.float32)
        for _ in range(int(rng.integers(1, 4)))
    ]
    arrays[0][:3] = [np.nan, np.inf, -np.inf]
    arrays[-1][-2:] = [0.0, -0.0]
    arrays.append(rng.integers(-3, 4, size=(40, 25)).astype(np.float32))  # ties
    found = middle_values(arrays, positive_only=positive_only)
    assert found is not None
    assert (float(found[0]), float(found[1])) == sorted_middle(arrays, positive_only)


def test_extremes_and_empty_selections() -> None:
    tiny = np.array([1e-45, -1e-45, 3.4e38, -3.4e38, 1.0], dtype=np.float32)
    assert middle_values([tiny]) == (np.float32(1e-45), np.float32(1e-45))
    assert middle_values([tiny], positive_only=True) == (np.float32(1.0), np.float32(1.0))
    assert middle_values([np.array([np.nan, np.inf], dtype=np.float32)]) is None
    assert middle_values([np.array([-1.0, 0.0], dtype=np.float32)], positive_only=True) is None
    assert middle_values([np.zeros((0, 3), dtype=np.float32)]) is None
