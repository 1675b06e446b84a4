"""The pixel steps of the detrending chain in plain numpy, band by band: the reference that the
compiled kernels of :mod:`.fused` are tested and benchmarked against. The service does not use it.

Same arguments and results as :func:`.calibrate.correct_rows` and :func:`.calibrate.detrend_science`
(the overscan fit and the row corrections are theirs); the arithmetic is the formulation the
kernels replaced, float32 throughout, kept as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from streamer.config import DetrendConfig
from streamer.detrend import masks as maskbits
from streamer.detrend.calibrate import (
    SATURATE_MARGIN,
    DetrendedQuadrant,
    MasterQuadrant,
    RowCorrection,
    apply_row_corrections,
    check_nonlinearity,
    fit_overscan,
)


def linearise_in_place(values: npt.NDArray[np.float32], a: float, b: float) -> None:
    """IPAC's nonlinearity ``x / (A x^2 + B x + 1)`` on float32 values, in place."""
    denominator = values * np.float32(a)
    denominator += np.float32(b)
    denominator *= values
    denominator += np.float32(1.0)
    values /= denominator


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
    """Steps 2-4 on a band of stored rows (see :func:`.calibrate.correct_rows`)."""
    check_nonlinearity(nonlinearity, nonlinearity_coefficients)
    if out is None:
        image = np.array(data_rows, dtype=np.float32, copy=True)
    else:
        image = out
        np.copyto(image, data_rows, casting="unsafe")
    level = level_rows.astype(np.float32)[:, np.newaxis]
    overscan_image = np.array(overscan_rows, dtype=np.float32, copy=True) if row_corrections else None
    if nonlinearity == "before_overscan":
        assert nonlinearity_coefficients is not None
        linearise_in_place(image, *nonlinearity_coefficients)
        if overscan_image is not None:
            linearise_in_place(overscan_image, *nonlinearity_coefficients)
    image -= level
    if overscan_image is not None:
        overscan_image -= level
    if nonlinearity == "after_overscan":
        assert nonlinearity_coefficients is not None
        linearise_in_place(image, *nonlinearity_coefficients)
        if overscan_image is not None:
            linearise_in_place(overscan_image, *nonlinearity_coefficients)
    if overscan_image is not None:
        corrected = apply_row_corrections(image, overscan_image, qid, row_corrections)
        if out is None:
            return corrected
        np.copyto(image, corrected)
    return image


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
    """The whole chain on one raw science quadrant (see :func:`.calibrate.detrend_science`)."""
    model = fit_overscan(
        overscan, qid, config=config, nonlinearity_coefficients=nonlinearity_coefficients, data=data, row_corrections=row_corrections
    )
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
