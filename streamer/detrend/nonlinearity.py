"""IPAC's nonlinearity correction: ``DN_true = x / (A x^2 + B x + 1)`` per CCD and amplifier.

The tables (shipped as package data) hold A and B per CCD and AMP_ID (qid = AMP_ID + 1),
by epoch: 201803 before 2019-10-23, 201910 until 2020-04-27, 202004 from 2020-04-28.
Units: ADU in, ADU out.
"""

from __future__ import annotations

import datetime as dt
from functools import cache
from importlib import resources

import numpy as np
import numpy.typing as npt

EPOCHS: tuple[tuple[dt.date, str], ...] = (
    (dt.date(2019, 10, 23), "201910"),
    (dt.date(2020, 4, 28), "202004"),
)


def epoch_for(date: dt.date) -> str:
    """The table epoch that applies to an observation date."""
    chosen = "201803"
    for start, name in EPOCHS:
        if date >= start:
            chosen = name
    return chosen


@cache
def load_table(epoch: str) -> dict[tuple[int, int], tuple[float, float]]:
    """``{(ccdid, qid): (A, B)}`` for one epoch's table."""
    text = resources.files("streamer.detrend").joinpath(f"data/linearity_coeffs_{epoch}.txt").read_text()
    table: dict[tuple[int, int], tuple[float, float]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        ccdid, _amp_name, amp_id, a, b = parts
        table[(int(ccdid), int(amp_id) + 1)] = (float(a), float(b))
    if len(table) != 64:
        raise ValueError(f"linearity table {epoch}: {len(table)} amplifiers, expected 64")
    return table


def coefficients(date: dt.date, ccdid: int, qid: int) -> tuple[float, float]:
    """(A, B) for a CCD quadrant on a date."""
    return load_table(epoch_for(date))[(ccdid, qid)]


def correct(measured: npt.ArrayLike, a: float, b: float) -> npt.NDArray[np.float32]:
    """Linearised ADU from measured ADU: ``x / (A x^2 + B x + 1)``, computed in float64, returned float32."""
    x = np.asarray(measured, dtype=np.float64)
    return (x / ((a * x + b) * x + 1.0)).astype(np.float32)


def uncorrect(true: npt.ArrayLike, a: float, b: float) -> npt.NDArray[np.float64]:
    """Measured ADU that the camera records for linear ADU ``true``: the inverse of :func:`correct`.

    Solves ``A y x^2 + (B y - 1) x + y = 0`` for the root that tends to ``x = y`` as A, B -> 0,
    in the cancellation-free form ``x = 2 y / ((1 - B y) + sqrt((1 - B y)^2 - 4 A y^2))``.
    """
    y = np.asarray(true, dtype=np.float64)
    c = 1.0 - b * y
    disc = c * c - 4.0 * a * y * y
    if np.any(disc < 0):
        raise ValueError("value beyond the range where the nonlinearity model is invertible")
    return 2.0 * y / (c + np.sqrt(disc))
