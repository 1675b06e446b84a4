"""Starflat comparison: the relative response of each quadrant, from stars measured on several quadrants.

Each catalogue measurement j of star s on exposure e and quadrant q (readout channel ``rcid``) is
modelled as ``m_j = M_s + Z_e + R_q`` in magnitudes (``m = -2.5 log10 f`` at one aperture): the
star's magnitude, the exposure's zero-point (transparency, airmass) and the quadrant's response. A
weighted least-squares fit (weights 1 / sigma_m^2) eliminates the star magnitudes analytically (the
Schur complement of their diagonal block), solves the exposure and quadrant terms with a pseudo-inverse,
which fixes the two free offsets by ``sum R = 0`` and ``sum Z = 0``, and clips measurements more than
``CLIP_SIGMA`` robust sigmas from the model, a few times. ``R_q`` is reported as the relative response
``10 ** (-0.4 R_q)`` against the geometric mean over the quadrants measured, with its error scaled by
sqrt(chi2 per degree of freedom). A star measured once carries no information and is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import scipy.sparse as sparse

from streamer.work.report import radius_count, robust_sigma

CLIP_SIGMA: Final = 5.0
CLIP_ROUNDS: Final = 3
MIN_SNR: Final = 20.0
MAG_PER_FLUX_FRACTION: Final = 2.5 / math.log(10.0)


@dataclass(frozen=True)
class Measurements:
    """One row per usable measurement: star, exposure, quadrant (rcid), magnitude and its error."""

    star: npt.NDArray[np.int64]
    exposure: npt.NDArray[np.int64]
    rcid: npt.NDArray[np.int64]
    mag: npt.NDArray[np.float64]
    error: npt.NDArray[np.float64]


@dataclass(frozen=True)
class QuadrantResponse:
    rcid: int
    response: float
    error: float
    measurements: int
    stars: int


@dataclass(frozen=True)
class StarflatSolution:
    quadrants: tuple[QuadrantResponse, ...]
    residual_scatter_mag: float
    chi2_per_dof: float
    measurements: int
    stars: int
    exposures: int
    rejected: int


#: The flat normalisations a catalogue gives: as measured, and divided by its focal-plane factor.
VARIANTS: Final = ("ccd", "focalplane")


def collect(
    tables: Sequence[Any], *, radius_px: float = 3.0, min_snr: float = MIN_SNR, variant: str = "ccd"
) -> Measurements:
    """Unflagged measurements with ``f / f_err >= min_snr`` at the aperture nearest ``radius_px``.

    ``variant``: "ccd" takes the fluxes as they are (CCD-flatfielded), "focalplane" divides them by
    the catalogue's ``focalplane_factor`` (rows without a factor are left out).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    parts: list[tuple[npt.NDArray[Any], ...]] = []
    for table in tables:
        n_radii = radius_count(table.column_names)
        if n_radii == 0 or table.num_rows == 0:
            continue
        columns = table.to_pydict()
        radii = np.asarray([columns[f"r_{k}"][0] for k in range(n_radii)], dtype=np.float64)
        k = int(np.argmin(np.abs(radii - radius_px)))
        flux = np.asarray(columns[f"f_{k}"], dtype=np.float64)
        error = np.asarray(columns[f"f_{k}_e"], dtype=np.float64)
        if variant == "focalplane":
            factor = np.asarray(columns.get("focalplane_factor", [np.nan] * table.num_rows), dtype=np.float64)
            flux, error = flux / factor, error / factor
        with np.errstate(divide="ignore", invalid="ignore"):
            usable = (np.asarray(columns[f"f_{k}_f"]) == 0) & np.isfinite(flux) & (flux > 0) & (flux >= min_snr * error)
        parts.append((
            np.asarray(columns["source_id"], dtype=np.int64)[usable], np.asarray(columns["expid"], dtype=np.int64)[usable],
            np.asarray(columns["rcid"], dtype=np.int64)[usable], -2.5 * np.log10(flux[usable]),
            MAG_PER_FLUX_FRACTION * error[usable] / flux[usable],
        ))  # fmt: skip
    if not parts:
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return Measurements(empty_i, empty_i, empty_i, empty_f, empty_f)
    star, exposure, rcid, mag, err = (np.concatenate([p[i] for p in parts]) for i in range(5))
    return Measurements(star, exposure, rcid, mag, err)


def _repeated(m: Measurements) -> Measurements:
    stars, counts = np.unique(m.star, return_counts=True)
    keep = np.isin(m.star, stars[counts >= 2])
    return Measurements(m.star[keep], m.exposure[keep], m.rcid[keep], m.mag[keep], m.error[keep])


def _fit(m: Measurements) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], Any]:
    """(exposure and quadrant terms, their covariance, residuals, index maps) for the measurements ``m``."""
    star_ids, star = np.unique(m.star, return_inverse=True)
    exp_ids, exposure = np.unique(m.exposure, return_inverse=True)
    rcids, quadrant = np.unique(m.rcid, return_inverse=True)
    n, n_exp = m.mag.size, exp_ids.size
    weight = 1.0 / m.error**2
    rows = np.arange(n)
    x_params = sparse.csr_matrix(
        (np.ones(2 * n), (np.concatenate([rows, rows]), np.concatenate([exposure, n_exp + quadrant]))),
        shape=(n, n_exp + rcids.size),
    )
    x_stars = sparse.csr_matrix((np.ones(n), (rows, star)), shape=(n, star_ids.size))
    weighted_params = x_params.multiply(weight[:, None]).tocsr()
    per_star = np.asarray(x_stars.T @ weight).ravel()
    cross = (weighted_params.T @ x_stars).toarray()  # params x stars
    normal = (weighted_params.T @ x_params).toarray() - (cross / per_star) @ cross.T
    star_rhs = np.asarray(x_stars.T @ (weight * m.mag)).ravel()
    rhs = np.asarray(weighted_params.T @ m.mag).ravel() - cross @ (star_rhs / per_star)
    covariance = np.linalg.pinv(normal, rcond=1e-10, hermitian=True)
    params = covariance @ rhs
    star_mag = (star_rhs - np.asarray(x_stars.T @ (weight * (x_params @ params))).ravel()) / per_star
    residual = m.mag - star_mag[star] - x_params @ params
    return params, covariance, residual, (rcids, n_exp, star_ids.size, exp_ids.size)


def solve(measurements: Measurements) -> StarflatSolution:
    """Fit the quadrant responses, clipping outliers; see the module docstring."""
    m = _repeated(measurements)
    rejected = 0
    for _ in range(CLIP_ROUNDS):
        if m.mag.size == 0:
            raise ValueError("no star was measured twice: a starflat needs repeated measurements")
        params, covariance, residual, shape = _fit(m)
        scale = robust_sigma(residual / m.error)
        outliers = np.abs(residual / m.error) > CLIP_SIGMA * max(scale, 1e-12)
        if not outliers.any():
            break
        rejected += int(outliers.sum())
        keep = ~outliers
        m = _repeated(Measurements(m.star[keep], m.exposure[keep], m.rcid[keep], m.mag[keep], m.error[keep]))
    else:
        params, covariance, residual, shape = _fit(m)
    rcids, n_exp, n_stars, n_exposures = shape
    dof = max(m.mag.size - n_stars - (params.size - 2), 1)
    chi2 = float(np.sum((residual / m.error) ** 2) / dof)
    errors = np.sqrt(np.clip(np.diag(covariance), 0.0, None) * max(chi2, 1.0))
    quadrants = []
    for i, rcid in enumerate(rcids):
        on = m.rcid == rcid
        response = 10.0 ** (-0.4 * params[n_exp + i])
        quadrants.append(QuadrantResponse(
            int(rcid), float(response), float(response * errors[n_exp + i] / MAG_PER_FLUX_FRACTION),
            int(on.sum()), int(np.unique(m.star[on]).size),
        ))  # fmt: skip
    return StarflatSolution(
        tuple(quadrants), robust_sigma(residual), chi2, int(m.mag.size), n_stars, n_exposures, rejected
    )
