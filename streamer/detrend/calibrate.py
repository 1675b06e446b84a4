"""The detrending chain of one quadrant: overscan -> nonlinearity -> row corrections -> bias -> flat.

Every function takes arrays on the stored (raw HDU = IPAC sciimg) grid and returns new arrays
on that grid; orientation is handled by :mod:`.readout` only. Units are stated at each step.

    1. overscan model (ADU) from the overscan columns [start, end) in readout order; with
       ``nonlinearity = "before_overscan"`` the overscan is linearised first
    2. data - model, per row (ADU above the bias pedestal)
    3. nonlinearity ``x / (A x^2 + B x + 1)`` (linear ADU), before step 2 if so configured,
       skipped if "off"
    4. row corrections (none by default): callables on whole rows in readout order, data columns
       then the 30 overscan columns, both overscan-subtracted and linearised; the place of the
       pocket effect (``[detrend] pocket``, chosen per quadrant and night by :func:`pocket_step`;
       first, since the serial register is the last thing the charge went through) and of
       brighter-fatter
    5. minus master bias (ADU)
    6. divided by master flat x flat factor (ADU, flat-fielded)
    7. variance (ADU^2): read noise, Poisson with the gain, the master bias' and flat's variance
    8. mask: saturation, NaN, the masters' bad pixels (bits in :mod:`.masks`)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from streamer.config import DetrendConfig
from streamer.detrend import masks as maskbits
from streamer.detrend import pocket
from streamer.detrend.overscan import OverscanModel, model_overscan
from streamer.detrend.readout import from_readout, to_readout

RowCorrection = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
"""A correction on whole rows in readout order: (rows, data columns + 30 overscan columns) float32
ADU, overscan-subtracted and linearised, in; a new array of the same shape out. Rows are
independent (a caller may pass any subset of rows, in any order)."""

NONLINEARITY_ORDERS = ("after_overscan", "before_overscan", "off")
SATURATE_MARGIN = 1e-3  # relative: pixels within 0.1 % of SATURATE count as saturated


class MasterQuadrant(NamedTuple):
    """One quadrant of a master, on the stored grid: data (bias ADU, or flat dimensionless),
    variance of the data (its units squared) and our mask bits (uint16)."""

    data: npt.NDArray[np.float32]
    variance: npt.NDArray[np.float32]
    mask: npt.NDArray[np.uint16]


@dataclass(frozen=True)
class CorrectedQuadrant:
    """A raw quadrant after steps 1-4: linear ADU above the bias pedestal, stored grid."""

    image: npt.NDArray[np.float32]
    overscan: OverscanModel


@dataclass(frozen=True)
class DetrendedQuadrant:
    """A science quadrant after the whole chain, on the stored (IPAC sciimg) grid."""

    image: npt.NDArray[np.float32]  # ADU, bias-subtracted and flat-fielded
    variance: npt.NDArray[np.float32]  # ADU^2
    mask: npt.NDArray[np.uint16]  # our bits (streamer.detrend.masks)
    overscan: OverscanModel


@dataclass(frozen=True)
class PocketStep:
    """The pocket-effect step of one quadrant on one night.

    ``model`` is the configured model ("off" or a version such as "v0.1"); ``parameters`` the
    amplifier's parameters when the correction is applied, else None with ``reason`` saying why
    (e.g. "not applied: no period covers 2017-05-01").
    """

    model: str
    parameters: pocket.Parameters | None = None
    period: int | None = None
    reason: str | None = None
    threshold: float = pocket.DEFAULT_THRESHOLD

    @property
    def row_corrections(self) -> tuple[RowCorrection, ...]:
        """The step as row corrections for the chain: one, or none when not applied."""
        if self.parameters is None:
            return ()
        return (pocket.row_correction(self.parameters, threshold=self.threshold),)

    def record(self) -> dict[str, Any]:
        """Provenance (plain values): the model, its version, and the parameter set or why none."""
        if self.model == "off":
            return {"model": "off"}
        record: dict[str, Any] = {"model": "ztfsensors pocket", "version": self.model}
        if self.parameters is None:
            return record | {"applied": False, "reason": self.reason}
        p = self.parameters
        parameters = {"alpha": p.alpha, "cmax": p.cmax, "beta": p.beta, "nmax": p.nmax}
        return record | {"applied": True, "period": self.period, "parameters": parameters, "threshold": self.threshold}

    def summary(self) -> str:
        """The record in one line (for a FITS card)."""
        if self.parameters is None:
            return self.reason or "off"
        p = self.parameters
        return f"{self.model} period {self.period}: alpha={p.alpha:.5g} cmax={p.cmax:.5g} beta={p.beta:.5g} nmax={p.nmax:.5g}"


def pocket_step(config: DetrendConfig, ccdid: int, qid: int, night: dt.date) -> PocketStep:
    """The pocket-effect step that ``config`` asks for on quadrant (``ccdid``, ``qid``) on ``night``."""
    if config.pocket == "off":
        return PocketStep("off", reason="off")
    period = pocket.period_of(night)
    if period is None:
        return PocketStep(config.pocket, reason=f"not applied: no period covers {night.isoformat()}")
    parameters = pocket.pocket_parameters(config.pocket, ccdid, qid, night)
    if parameters is None:
        return PocketStep(config.pocket, period=period, reason=f"not applied: no parameters for CCD {ccdid} q{qid} in period {period}")
    return PocketStep(config.pocket, parameters=parameters, period=period)


def linearise(measured: npt.NDArray[np.number], a: float, b: float) -> npt.NDArray[np.float32]:
    """IPAC's nonlinearity correction in float32 (a new array): ``x / (A x^2 + B x + 1)``, ADU.

    Same formula as :func:`streamer.detrend.nonlinearity.correct` (float64 reference); relative
    difference below 1e-6.
    """
    out = np.array(measured, dtype=np.float32, copy=True)
    _linearise_in_place(out, a, b)
    return out


def _linearise_in_place(values: npt.NDArray[np.float32], a: float, b: float) -> None:
    denominator = values * np.float32(a)
    denominator += np.float32(b)
    denominator *= values
    denominator += np.float32(1.0)
    values /= denominator


def _check_nonlinearity(order: str, coefficients: tuple[float, float] | None) -> None:
    if order not in NONLINEARITY_ORDERS:
        raise ValueError(f"nonlinearity = {order!r}: expected one of {', '.join(NONLINEARITY_ORDERS)}")
    if order != "off" and coefficients is None:
        raise ValueError(f"nonlinearity = {order!r} needs coefficients (A, B)")


def fit_overscan(
    overscan: npt.NDArray[np.number],
    qid: int,
    *,
    config: DetrendConfig,
    nonlinearity_coefficients: tuple[float, float] | None,
) -> OverscanModel:
    """Step 1: the overscan model (ADU per stored row) of a stored overscan array (rows, 30)."""
    _check_nonlinearity(config.nonlinearity, nonlinearity_coefficients)
    if config.nonlinearity == "before_overscan":
        assert nonlinearity_coefficients is not None
        overscan = linearise(overscan, *nonlinearity_coefficients)
    return model_overscan(
        overscan,
        qid,
        columns=config.overscan_columns,
        degree=config.overscan_degree,
        outlier_nmad=config.overscan_outlier_nmad,
    )


def correct_rows(
    data_rows: npt.NDArray[np.number],
    overscan_rows: npt.NDArray[np.number],
    level_rows: npt.NDArray[np.floating],
    qid: int,
    *,
    nonlinearity: str,
    nonlinearity_coefficients: tuple[float, float] | None,
    row_corrections: Sequence[RowCorrection] = (),
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Steps 2-4 on a band of stored rows: float32 linear ADU above the pedestal, in a new array
    (or in ``out``, a float32 array of the band's shape, which is returned).

    ``data_rows`` (rows, columns) and ``overscan_rows`` (rows, 30) are the same stored rows of the
    raw quadrant and its overscan; ``level_rows`` the overscan model of those rows (ADU).
    ``overscan_rows`` is only used when there are row corrections.
    """
    _check_nonlinearity(nonlinearity, nonlinearity_coefficients)
    rows = data_rows.shape[0]
    if data_rows.ndim != 2 or level_rows.shape != (rows,) or overscan_rows.shape[0] != rows:
        raise ValueError(
            f"data {data_rows.shape}, overscan {overscan_rows.shape}, levels {level_rows.shape}: expected the same rows"
        )
    if out is None:
        image = np.array(data_rows, dtype=np.float32, copy=True)
    else:
        if out.shape != data_rows.shape or out.dtype != np.float32:
            raise ValueError(f"out {out.shape} {out.dtype}: expected float32 of shape {data_rows.shape}")
        image = out
        np.copyto(image, data_rows, casting="unsafe")
    level = level_rows.astype(np.float32)[:, np.newaxis]
    overscan_image = np.array(overscan_rows, dtype=np.float32, copy=True) if row_corrections else None
    if nonlinearity == "before_overscan":
        assert nonlinearity_coefficients is not None
        _linearise_in_place(image, *nonlinearity_coefficients)
        if overscan_image is not None:
            _linearise_in_place(overscan_image, *nonlinearity_coefficients)
    image -= level
    if overscan_image is not None:
        overscan_image -= level
    if nonlinearity == "after_overscan":
        assert nonlinearity_coefficients is not None
        _linearise_in_place(image, *nonlinearity_coefficients)
        if overscan_image is not None:
            _linearise_in_place(overscan_image, *nonlinearity_coefficients)
    if overscan_image is not None:
        corrected = apply_row_corrections(image, overscan_image, qid, row_corrections)
        if out is None:
            return corrected
        np.copyto(image, corrected)
    return image


def apply_row_corrections(
    image: npt.NDArray[np.float32],
    overscan_image: npt.NDArray[np.float32],
    qid: int,
    row_corrections: Sequence[RowCorrection],
) -> npt.NDArray[np.float32]:
    """Step 4: run each correction on whole rows in readout order (data then overscan columns),
    and return the data columns on the stored grid (a new array)."""
    columns = image.shape[1]
    rows_readout = np.concatenate([to_readout(image, qid), to_readout(overscan_image, qid)], axis=1)
    for correction in row_corrections:
        corrected = correction(rows_readout)
        if corrected is rows_readout or corrected.shape != rows_readout.shape:
            raise ValueError(f"row correction {correction!r}: expected a new array of shape {rows_readout.shape}")
        rows_readout = np.asarray(corrected, dtype=np.float32)
    return np.ascontiguousarray(from_readout(rows_readout[:, :columns], qid))


def correct_raw(
    data: npt.NDArray[np.number],
    overscan: npt.NDArray[np.number],
    qid: int,
    *,
    config: DetrendConfig,
    nonlinearity_coefficients: tuple[float, float] | None,
    row_corrections: Sequence[RowCorrection] = (),
) -> CorrectedQuadrant:
    """Steps 1-4 on a whole raw quadrant (stored grid, any numeric dtype; not modified)."""
    if data.ndim != 2 or overscan.ndim != 2 or data.shape[0] != overscan.shape[0]:
        raise ValueError(f"data {data.shape} and overscan {overscan.shape}: expected 2-D arrays with the same rows")
    model = fit_overscan(overscan, qid, config=config, nonlinearity_coefficients=nonlinearity_coefficients)
    image = correct_rows(
        data,
        overscan,
        model.level_stored,
        qid,
        nonlinearity=config.nonlinearity,
        nonlinearity_coefficients=nonlinearity_coefficients,
        row_corrections=row_corrections,
    )
    return CorrectedQuadrant(image=image, overscan=model)


def detrend_science(
    data: npt.NDArray[np.number],
    overscan: npt.NDArray[np.number],
    qid: int,
    *,
    config: DetrendConfig,
    nonlinearity_coefficients: tuple[float, float] | None,
    master_bias: MasterQuadrant,
    master_flat: MasterQuadrant,
    gain: float,
    read_noise: float,
    saturate: float | None = None,
    flat_factor: float = 1.0,
    raw_ceiling: float | None = 65535.0,
    row_corrections: Sequence[RowCorrection] = (),
    block_rows: int = 128,
) -> DetrendedQuadrant:
    """The whole chain on one raw science quadrant.

    ``gain`` in e-/ADU and ``read_noise`` in e- (the raw extension header's GAIN and READNOI);
    ``saturate`` the sciimg header's SATURATE or None: compared with the linear ADU above the bias
    before the flat (what the raw ceiling becomes through overscan and nonlinearity), less a
    margin of ``SATURATE_MARGIN`` (the bias drift and structure move the ceiling by a few ADU);
    ``raw_ceiling`` the raw ADU at and above which a pixel is saturated (the ADC's ceiling) or
    None; ``flat_factor`` the focal-plane factor (1 for ``flat_normalisation = "ccd"``): the image
    is divided by ``master_flat.data * flat_factor``. Pixels whose flat is not positive become NaN.

    Works through bands of ``block_rows`` rows so that the temporaries stay in the CPU cache; the
    three outputs are the only full-size allocations.
    """
    if not gain > 0 or not read_noise >= 0 or not flat_factor > 0:
        raise ValueError(f"gain {gain}, read_noise {read_noise}, flat_factor {flat_factor}: expected > 0, >= 0, > 0")
    if data.ndim != 2 or overscan.ndim != 2 or data.shape[0] != overscan.shape[0]:
        raise ValueError(f"data {data.shape} and overscan {overscan.shape}: expected 2-D arrays with the same rows")
    for name, master in (("master_bias", master_bias), ("master_flat", master_flat)):
        for part in master:
            if part.shape != data.shape:
                raise ValueError(f"{name} of shape {part.shape}: expected the quadrant's {data.shape}")
    model = fit_overscan(overscan, qid, config=config, nonlinearity_coefficients=nonlinearity_coefficients)
    rows, columns = data.shape
    image = np.empty((rows, columns), dtype=np.float32)
    variance = np.empty((rows, columns), dtype=np.float32)
    mask = np.empty((rows, columns), dtype=np.uint16)
    scratch = np.empty((block_rows, columns), dtype=np.float32)
    bad = np.empty((block_rows, columns), dtype=bool)
    poisson_per_adu = np.float32(1.0 / gain)
    read_variance = np.float32((read_noise / gain) ** 2)
    inverse_factor = np.float32(1.0 / flat_factor)
    factor_squared = np.float32(flat_factor**2)
    saturation = np.float32(saturate * (1.0 - SATURATE_MARGIN)) if saturate is not None else None

    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        band = slice(start, stop)
        n = stop - start
        img, var, msk, tmp, flag = image[band], variance[band], mask[band], scratch[:n], bad[:n]
        flat, flat_variance = master_flat.data[band], master_flat.variance[band]

        # 1-4: linear ADU above the pedestal
        correct_rows(
            data[band], overscan[band], model.level_stored[band], qid,
            nonlinearity=config.nonlinearity, nonlinearity_coefficients=nonlinearity_coefficients,
            row_corrections=row_corrections, out=img,
        )  # fmt: skip
        # 5: ADU of signal, before the flat
        img -= master_bias.data[band]
        np.copyto(msk, master_bias.mask[band])
        msk |= master_flat.mask[band]
        with np.errstate(invalid="ignore"):
            if saturation is not None:
                np.greater_equal(img, saturation, out=flag)
                msk[flag] |= maskbits.SATURATED
            if raw_ceiling is not None:
                np.greater_equal(data[band], raw_ceiling, out=flag)
                msk[flag] |= maskbits.SATURATED
        # 7a: variance before the flat, ADU^2: Poisson (signal / gain) + read noise + master bias
        np.maximum(img, np.float32(0.0), out=var)
        var *= poisson_per_adu
        var += read_variance
        var += master_bias.variance[band]
        # 6: flat-fielded ADU; tmp = 1 / (flat * factor), NaN where the flat is not positive
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            np.divide(inverse_factor, flat, out=tmp)
            np.greater(flat, np.float32(0.0), out=flag)
            np.logical_not(flag, out=flag)
            if flag.any():
                tmp[flag] = np.nan
            img *= tmp
            # 7b: variance / (flat factor)^2 + image^2 var_flat / flat^2
            tmp *= tmp
            var *= tmp
            tmp *= factor_squared
            tmp *= flat_variance
            tmp *= img
            tmp *= img
            var += tmp
        # 8: NaN
        np.isfinite(img, out=flag)
        np.logical_not(flag, out=flag)
        if flag.any():
            msk[flag] |= maskbits.NAN
    return DetrendedQuadrant(image=image, variance=variance, mask=mask, overscan=model)
