"""The detrending chain of one quadrant: overscan -> nonlinearity -> row corrections -> bias -> flat.

Every function takes arrays on the stored (raw HDU = IPAC sciimg) grid and returns new arrays
on that grid; orientation is handled by :mod:`.readout` only. Units are stated at each step.

    1. overscan model (ADU) from the overscan columns [start, end) in readout order; with
       ``nonlinearity = "before_overscan"`` the overscan is linearised first; with row corrections,
       refitted from the overscan they correct (the pocket's trail is not bias)
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

Step 1 and the row corrections are here; the per-pixel arithmetic of steps 2-3 and 5-8 is the
compiled :mod:`.fused` (one pass over the pixels), its numpy formulation :mod:`.reference`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from streamer.config import DetrendConfig
from streamer.detrend import fused, pocket
from streamer.detrend.overscan import OverscanModel, model_overscan, refit_with_corrected_overscan
from streamer.detrend.readout import from_readout, to_readout

RowCorrection = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
"""A correction on whole rows in readout order: (rows, data columns + 30 overscan columns) float32
ADU, overscan-subtracted and linearised, in; a new array of the same shape out, its overscan
columns corrected too. Rows are independent (a caller may pass any subset of rows, in any order),
and :func:`corrected_overscan` passes only the last columns of each row before its overscan."""

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
    finite: bool = False  # True: the pixel pass found every image and variance value finite


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
    return fused.linearised(measured, a, b)


def check_nonlinearity(order: str, coefficients: tuple[float, float] | None) -> None:
    """Refuse an unknown nonlinearity order, or one that needs coefficients without them."""
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
    data: npt.NDArray[np.number] | None = None,
    row_corrections: Sequence[RowCorrection] = (),
) -> OverscanModel:
    """Step 1: the overscan model (ADU per stored row) of a stored overscan array (rows, 30).

    With ``row_corrections`` and the quadrant's raw ``data``, the model is refitted from the
    overscan as the corrections leave it (:func:`corrected_overscan`): the pocket's trail in the
    overscan columns is then not taken for bias.
    """
    check_nonlinearity(config.nonlinearity, nonlinearity_coefficients)
    fitted = overscan
    if config.nonlinearity == "before_overscan":
        assert nonlinearity_coefficients is not None
        fitted = linearise(overscan, *nonlinearity_coefficients)
    columns, degree, outlier_nmad = config.overscan_columns, config.overscan_degree, config.overscan_outlier_nmad
    model = model_overscan(fitted, qid, columns=columns, degree=degree, outlier_nmad=outlier_nmad)
    if not row_corrections or data is None:
        return model
    corrected = corrected_overscan(
        data, overscan, model.level_stored, qid,
        nonlinearity=config.nonlinearity, nonlinearity_coefficients=nonlinearity_coefficients, row_corrections=row_corrections,
    )  # fmt: skip
    return refit_with_corrected_overscan(model, corrected, qid, columns=columns, degree=degree, outlier_nmad=outlier_nmad)


TRAIL_COLUMNS = 256  # data columns read last before the overscan that :func:`corrected_overscan` corrects


def corrected_overscan(
    data: npt.NDArray[np.number],
    overscan: npt.NDArray[np.number],
    level_stored: npt.NDArray[np.floating],
    qid: int,
    *,
    nonlinearity: str,
    nonlinearity_coefficients: tuple[float, float] | None,
    row_corrections: Sequence[RowCorrection],
) -> npt.NDArray[np.float32]:
    """The overscan (rows, 30, readout order) after steps 2-4 with ``level_stored`` subtracted.

    The corrections run on the last ``TRAIL_COLUMNS`` data columns read and the overscan of each
    row, not the whole row: the pocket forgets within a few tens of pixels what it held before
    (from an empty pocket at the first of 256 columns, the trail in the overscan equals the whole
    row's to 1e-4 ADU at skies of 5-400 ADU with bright stars near the row's end).
    """
    tail = min(TRAIL_COLUMNS, data.shape[1])
    level = np.ascontiguousarray(to_readout(np.asarray(level_stored, dtype=np.float32)[:, np.newaxis], qid)[:, 0])
    data_tail = np.ascontiguousarray(to_readout(data, qid)[:, -tail:])
    overscan_readout = np.ascontiguousarray(to_readout(overscan, qid))
    above = np.empty(data_tail.shape, dtype=np.float32)
    above_overscan = np.empty(overscan_readout.shape, dtype=np.float32)
    fused.above_pedestal(data_tail, level, nonlinearity, nonlinearity_coefficients, above)
    fused.above_pedestal(overscan_readout, level, nonlinearity, nonlinearity_coefficients, above_overscan)
    rows = np.concatenate([above, above_overscan], axis=1)
    for correction in row_corrections:
        rows = np.asarray(correction(rows), dtype=np.float32)
    return rows[:, tail:]


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
    check_nonlinearity(nonlinearity, nonlinearity_coefficients)
    rows = data_rows.shape[0]
    if data_rows.ndim != 2 or level_rows.shape != (rows,) or overscan_rows.shape[0] != rows:
        raise ValueError(
            f"data {data_rows.shape}, overscan {overscan_rows.shape}, levels {level_rows.shape}: expected the same rows"
        )
    if out is None:
        image = np.empty(data_rows.shape, dtype=np.float32)
    else:
        if out.shape != data_rows.shape or out.dtype != np.float32:
            raise ValueError(f"out {out.shape} {out.dtype}: expected float32 of shape {data_rows.shape}")
        image = out
    level = level_rows.astype(np.float32)
    fused.above_pedestal(data_rows, level, nonlinearity, nonlinearity_coefficients, image)
    if not row_corrections:
        return image
    overscan_image = np.empty(overscan_rows.shape, dtype=np.float32)
    fused.above_pedestal(overscan_rows, level, nonlinearity, nonlinearity_coefficients, overscan_image)
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
    model = fit_overscan(
        overscan, qid, config=config, nonlinearity_coefficients=nonlinearity_coefficients, data=data, row_corrections=row_corrections
    )
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
    None; ``flat_factor`` a scale of the flat: the image is divided by ``master_flat.data *
    flat_factor`` (the service keeps 1 and records the focal-plane factor with the catalogue
    instead, see ``streamer.formats.apcat``). Pixels whose flat is not positive become NaN.

    The pixel steps run compiled (:mod:`.fused`): one pass over the pixels without row corrections;
    with them, bands of ``block_rows`` rows (steps 2-3, the corrections, then 5-8 on each band) so that
    the corrections' temporaries stay in the CPU cache. The three outputs are the only full-size
    allocations.
    """
    if not gain > 0 or not read_noise >= 0 or not flat_factor > 0:
        raise ValueError(f"gain {gain}, read_noise {read_noise}, flat_factor {flat_factor}: expected > 0, >= 0, > 0")
    if data.ndim != 2 or overscan.ndim != 2 or data.shape[0] != overscan.shape[0]:
        raise ValueError(f"data {data.shape} and overscan {overscan.shape}: expected 2-D arrays with the same rows")
    for name, master in (("master_bias", master_bias), ("master_flat", master_flat)):
        for part in master:
            if part.shape != data.shape:
                raise ValueError(f"{name} of shape {part.shape}: expected the quadrant's {data.shape}")
    model = fit_overscan(
        overscan, qid, config=config, nonlinearity_coefficients=nonlinearity_coefficients, data=data, row_corrections=row_corrections
    )
    rows, columns = data.shape
    image = np.empty((rows, columns), dtype=np.float32)
    variance = np.empty((rows, columns), dtype=np.float32)
    mask = np.empty((rows, columns), dtype=np.uint16)
    constants = fused.pixel_constants(
        gain=gain,
        read_noise=read_noise,
        flat_factor=flat_factor,
        saturation=saturate * (1.0 - SATURATE_MARGIN) if saturate is not None else None,
        raw_ceiling=raw_ceiling,
        raw_dtype=data.dtype,
    )
    if not row_corrections:
        level = model.level_stored.astype(np.float32)
        suspect = fused.detrend(
            data, level, config.nonlinearity, nonlinearity_coefficients, master_bias, master_flat, constants,
            image, variance, mask,
        )  # fmt: skip
        return DetrendedQuadrant(image=image, variance=variance, mask=mask, overscan=model, finite=suspect == 0)
    suspect = 0
    for start in range(0, rows, block_rows):
        band = slice(start, min(start + block_rows, rows))
        correct_rows(
            data[band], overscan[band], model.level_stored[band], qid,
            nonlinearity=config.nonlinearity, nonlinearity_coefficients=nonlinearity_coefficients,
            row_corrections=row_corrections, out=image[band],
        )  # fmt: skip
        suspect += fused.finish(
            data[band], image[band],
            (master_bias.data[band], master_bias.variance[band], master_bias.mask[band]),
            (master_flat.data[band], master_flat.variance[band], master_flat.mask[band]),
            constants, variance[band], mask[band],
        )  # fmt: skip
    return DetrendedQuadrant(image=image, variance=variance, mask=mask, overscan=model, finite=suspect == 0)
