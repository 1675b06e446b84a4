"""Overscan: the per-row bias level read from the overscan columns, as a smooth model along rows.

Steps (all in readout order, ADU): per row, the median of the overscan columns [start, end) of
the configured window; rows further than ``outlier_nmad`` x NMAD from the model are ignored
(iteratively); a polynomial of the configured degree in the readout row index models the level;
the model (not the noisy per-row medians) is what is subtracted from each row.

With a row correction that moves charge into the overscan (the pocket's trail), the medians are
those of the corrected overscan (:func:`refit_with_corrected_overscan`), so that the level is the
bias, not the bias plus the trail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numpy.polynomial import Legendre

from streamer.detrend.readout import OVERSCAN_COLUMNS, from_readout, to_readout

NMAD_SCALE = 1.482602218505602  # 1 / Phi^-1(3/4): NMAD of a unit Gaussian is 1


@dataclass(frozen=True)
class OverscanModel:
    """The overscan level of each row of one quadrant, in ADU."""

    level_stored: npt.NDArray[np.float64]  # model level of each stored row (the raw HDU's row order)
    row_median_readout: npt.NDArray[np.float64]  # measured per-row medians, readout row order
    outlier_rows_readout: npt.NDArray[np.bool_]  # rows left out of the fit, readout row order
    coefficients: tuple[float, ...]  # Legendre coefficients over readout rows mapped to [-1, 1]
    residual_nmad: float  # robust scatter of the per-row medians about the model, ADU
    trail_readout: npt.NDArray[np.float64] | None = None  # per row, raw median less corrected median (ADU); None uncorrected


def row_medians(overscan_readout: npt.NDArray[np.number], columns: tuple[int, int]) -> npt.NDArray[np.float64]:
    """Median of each row over overscan columns [start, end) (readout order), in float64 ADU."""
    start, end = columns
    if overscan_readout.ndim != 2 or overscan_readout.shape[1] != OVERSCAN_COLUMNS:
        raise ValueError(f"overscan of shape {overscan_readout.shape}: expected (rows, {OVERSCAN_COLUMNS})")
    if not 0 <= start < end <= OVERSCAN_COLUMNS:
        raise ValueError(f"overscan window [{start}, {end}): expected 0 <= start < end <= {OVERSCAN_COLUMNS}")
    window = np.asarray(overscan_readout[:, start:end], dtype=np.float64)
    return np.median(window, axis=1)


def nmad(values: npt.NDArray[np.floating]) -> float:
    """Normalised median absolute deviation (a robust standard deviation) of finite values."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan")
    return float(NMAD_SCALE * np.median(np.abs(finite - np.median(finite))))


def fit_row_levels(
    row_median: npt.NDArray[np.floating], *, degree: int, outlier_nmad: float, max_iterations: int = 10
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], tuple[float, ...], float]:
    """Fit a polynomial of ``degree`` along the rows, leaving out outlier rows iteratively.

    Returns (model per row, outlier rows, Legendre coefficients, NMAD of the residuals), all
    in the row order given (readout order) and ADU.
    """
    rows = row_median.size
    if degree < 0:
        raise ValueError(f"degree = {degree}: expected >= 0")
    if rows < degree + 2:
        raise ValueError(f"{rows} rows: too few for a polynomial of degree {degree}")
    x = np.linspace(-1.0, 1.0, rows)
    outlier = ~np.isfinite(row_median)
    model = np.zeros(rows)
    coefficients: tuple[float, ...] = ()
    scatter = float("nan")
    for _ in range(max_iterations):
        good = ~outlier
        if good.sum() < degree + 2:
            raise ValueError(f"only {int(good.sum())} usable overscan rows for a polynomial of degree {degree}")
        series = Legendre.fit(x[good], row_median[good], degree, domain=[-1.0, 1.0], window=[-1.0, 1.0])
        model = series(x)
        coefficients = tuple(float(c) for c in series.coef)
        residual = row_median - model
        scatter = nmad(residual[good])
        centre = float(np.median(residual[good]))
        if not scatter > 0:
            break
        new_outlier = ~np.isfinite(row_median) | (np.abs(residual - centre) > outlier_nmad * scatter)
        if np.array_equal(new_outlier, outlier):
            break
        outlier = new_outlier
    return model, outlier, coefficients, scatter


def model_overscan(
    overscan: npt.NDArray[np.number],
    qid: int,
    *,
    columns: tuple[int, int],
    degree: int,
    outlier_nmad: float,
) -> OverscanModel:
    """The overscan model of one quadrant from its stored overscan (rows, 30) in ADU.

    ``overscan`` is on the stored grid (as read from HDU qid + 4); it is not modified.
    """
    medians = row_medians(to_readout(overscan, qid), columns)
    return _fitted(medians, qid, degree=degree, outlier_nmad=outlier_nmad)


def _fitted(
    medians: npt.NDArray[np.float64],
    qid: int,
    *,
    degree: int,
    outlier_nmad: float,
    trail_readout: npt.NDArray[np.float64] | None = None,
) -> OverscanModel:
    """The model of per-row medians (readout order): :func:`fit_row_levels`, its level on the stored grid."""
    level, outlier, coefficients, scatter = fit_row_levels(medians, degree=degree, outlier_nmad=outlier_nmad)
    return OverscanModel(
        level_stored=np.ascontiguousarray(from_readout(level[:, np.newaxis], qid)[:, 0]),
        row_median_readout=medians,
        outlier_rows_readout=outlier,
        coefficients=coefficients,
        residual_nmad=scatter,
        trail_readout=trail_readout,
    )


def refit_with_corrected_overscan(
    model: OverscanModel,
    corrected_readout: npt.NDArray[np.floating],
    qid: int,
    *,
    columns: tuple[int, int],
    degree: int,
    outlier_nmad: float,
) -> OverscanModel:
    """The model refitted from the overscan after the row corrections.

    ``corrected_readout`` (rows, 30, readout order) is the overscan with ``model``'s level subtracted
    and then corrected: what is left in it is the error of that level. The new per-row medians are
    the old level plus the corrected medians; the fit is the same (degree, outlier rejection).
    """
    level_readout = to_readout(model.level_stored[:, np.newaxis], qid)[:, 0]
    medians = level_readout + row_medians(corrected_readout, columns)
    return _fitted(medians, qid, degree=degree, outlier_nmad=outlier_nmad, trail_readout=model.row_median_readout - medians)
