"""The per-pixel arithmetic of the detrending chain, compiled (numba): one pass over the pixels.

:mod:`.calibrate` fits the overscan model (per row) and runs the row corrections; the pixel steps
are here, each rule written once as a scalar function and used by every kernel:

- :func:`_linearised`: IPAC's nonlinearity ``x / (A x^2 + B x + 1)`` (ADU), evaluated as
  ``x / (((x A) + B) x + 1)``;
- :func:`_above_pedestal`: raw ADU to linear ADU above the pedestal: minus the row's overscan model,
  with the nonlinearity after it, before it, or off;
- :func:`_finished`: minus the master bias, the mask (the masters' bits, SATURATED, NAN), the
  variance before the flat (Poisson with the gain, read noise, the master bias' variance), the flat
  division (NaN where the flat is not positive) and the flat's share of the variance.

Everything is float32, operation by operation, in the order of the numpy formulation this replaced
(``streamer.detrend.reference``), so both agree to float32 rounding, and the mask bit for bit.
Kernels are single-threaded (no ``prange``): a worker process runs one quadrant on one core.
numba, because it already compiles the pocket kernels (no build step, cached beside the module), and
without fast-math it neither reorders nor contracts float operations: the results are numpy's, bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numba
import numpy as np
import numpy.typing as npt

from streamer.detrend import masks as maskbits

NONLINEARITY_MODES = {"off": 0, "after_overscan": 1, "before_overscan": 2}

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_NAN = np.float32(np.nan)
_SATURATED = np.uint16(maskbits.SATURATED)
_NAN_BIT = np.uint16(maskbits.NAN)

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _linearised(x: np.float32, a: np.float32, b: np.float32) -> np.float32:
    denominator = x * a
    denominator = denominator + b
    denominator = denominator * x
    denominator = denominator + _ONE
    return x / denominator


@_jit
def _above_pedestal(raw: Any, level: np.float32, mode: int, a: np.float32, b: np.float32) -> np.float32:
    x = np.float32(raw)
    if mode == 2:
        x = _linearised(x, a, b)
    x = x - level
    if mode == 1:
        x = _linearised(x, a, b)
    return x


@_jit
def _finished(
    raw: Any,
    above: np.float32,
    bias: Any,
    bias_variance: Any,
    bias_mask: Any,
    flat: Any,
    flat_variance: Any,
    flat_mask: Any,
    poisson_per_adu: np.float32,
    read_variance: np.float32,
    inverse_factor: np.float32,
    factor_squared: np.float32,
    use_saturation: bool,
    saturation: np.float32,
    use_ceiling: bool,
    ceiling: float,
) -> tuple[np.float32, np.float32, np.uint16]:
    x = np.float32(above - bias)
    bits = np.uint16(bias_mask | flat_mask)
    if use_saturation and x >= saturation:
        bits |= _SATURATED
    if use_ceiling and raw >= ceiling:
        bits |= _SATURATED
    v = _ZERO if x < _ZERO else x  # NaN stays NaN, like np.maximum
    v = v * poisson_per_adu
    v = v + read_variance
    v = np.float32(v + bias_variance)
    t = np.float32(inverse_factor / flat) if flat > _ZERO else _NAN
    x = x * t
    t = t * t
    v = v * t
    t = t * factor_squared
    t = np.float32(t * flat_variance)
    t = t * x
    t = t * x
    v = v + t
    if not math.isfinite(x):
        bits |= _NAN_BIT
    return x, v, bits


@_jit
def _linearise_kernel(values: Any, a: np.float32, b: np.float32) -> None:
    for k in range(values.shape[0]):
        values[k] = _linearised(values[k], a, b)


@_jit
def _above_pedestal_kernel(raw: Any, level: Any, mode: int, a: np.float32, b: np.float32, out: Any) -> None:
    for i in range(raw.shape[0]):
        row_level = level[i]
        for j in range(raw.shape[1]):
            out[i, j] = _above_pedestal(raw[i, j], row_level, mode, a, b)


@_jit
def _finish_kernel(
    raw: Any, image: Any,
    bias: Any, bias_variance: Any, bias_mask: Any, flat: Any, flat_variance: Any, flat_mask: Any,
    poisson_per_adu: np.float32, read_variance: np.float32, inverse_factor: np.float32, factor_squared: np.float32,
    use_saturation: bool, saturation: np.float32, use_ceiling: bool, ceiling: float,
    variance: Any, mask: Any,
) -> int:  # fmt: skip
    suspect = 0
    for i in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            x, v, bits = _finished(
                raw[i, j], image[i, j],
                bias[i, j], bias_variance[i, j], bias_mask[i, j], flat[i, j], flat_variance[i, j], flat_mask[i, j],
                poisson_per_adu, read_variance, inverse_factor, factor_squared,
                use_saturation, saturation, use_ceiling, ceiling,
            )  # fmt: skip
            image[i, j], variance[i, j], mask[i, j] = x, v, bits
            suspect += not math.isfinite(x + v)
    return suspect


@_jit
def _detrend_kernel(
    raw: Any, level: Any, mode: int, a: np.float32, b: np.float32,
    bias: Any, bias_variance: Any, bias_mask: Any, flat: Any, flat_variance: Any, flat_mask: Any,
    poisson_per_adu: np.float32, read_variance: np.float32, inverse_factor: np.float32, factor_squared: np.float32,
    use_saturation: bool, saturation: np.float32, use_ceiling: bool, ceiling: float,
    image: Any, variance: Any, mask: Any,
) -> int:  # fmt: skip
    suspect = 0
    for i in range(raw.shape[0]):
        row_level = level[i]
        for j in range(raw.shape[1]):
            value = raw[i, j]
            x, v, bits = _finished(
                value, _above_pedestal(value, row_level, mode, a, b),
                bias[i, j], bias_variance[i, j], bias_mask[i, j], flat[i, j], flat_variance[i, j], flat_mask[i, j],
                poisson_per_adu, read_variance, inverse_factor, factor_squared,
                use_saturation, saturation, use_ceiling, ceiling,
            )  # fmt: skip
            image[i, j], variance[i, j], mask[i, j] = x, v, bits
            suspect += not math.isfinite(x + v)
    return suspect


# ---------------------------------------------------------------- callers' interface


class PixelConstants(NamedTuple):
    """The scalars of :func:`_finished`, float32 where the arithmetic is (see :func:`pixel_constants`)."""

    poisson_per_adu: np.float32  # 1 / gain: ADU^2 of Poisson variance per ADU of signal
    read_variance: np.float32  # (read noise / gain)^2, ADU^2
    inverse_factor: np.float32  # 1 / flat factor
    factor_squared: np.float32  # flat factor^2
    use_saturation: bool
    saturation: np.float32  # linear ADU above the bias, before the flat
    use_ceiling: bool
    ceiling: float  # raw ADU


def pixel_constants(
    *, gain: float, read_noise: float, flat_factor: float, saturation: float | None, raw_ceiling: float | None, raw_dtype: np.dtype[Any]
) -> PixelConstants:
    """The scalars of the pixel steps: ``gain`` e-/ADU, ``read_noise`` e-, the focal-plane ``flat_factor``,
    ``saturation`` the linear ADU above the bias at which a pixel is saturated (or None), ``raw_ceiling``
    the raw ADU at which it is (or None), compared as numpy compares ``raw >= raw_ceiling`` for raw
    pixels of ``raw_dtype`` (in the raw's float type for float pixels, in float64 for integers)."""
    ceiling = 0.0 if raw_ceiling is None else float(raw_ceiling)
    if raw_ceiling is not None and np.issubdtype(raw_dtype, np.floating):
        ceiling = float(np.asarray(raw_ceiling, dtype=raw_dtype))
    return PixelConstants(
        poisson_per_adu=np.float32(1.0 / gain),
        read_variance=np.float32((read_noise / gain) ** 2),
        inverse_factor=np.float32(1.0 / flat_factor),
        factor_squared=np.float32(flat_factor**2),
        use_saturation=saturation is not None,
        saturation=np.float32(saturation if saturation is not None else 0.0),
        use_ceiling=raw_ceiling is not None,
        ceiling=ceiling,
    )


def _kernel_input(array: npt.NDArray[Any], what: str) -> npt.NDArray[Any]:
    """``array`` as the kernels take it: native byte order, float16 widened to float32 (both exact)."""
    kind = array.dtype
    if kind == np.float16 or not kind.isnative:
        return array.astype(np.float32 if kind.kind == "f" else kind.newbyteorder("="))
    if kind.kind not in "uif":
        raise ValueError(f"{what} of data type {kind}: expected integers or floats")
    return array


def _coefficients(nonlinearity: str, coefficients: tuple[float, float] | None) -> tuple[int, np.float32, np.float32]:
    mode = NONLINEARITY_MODES[nonlinearity]
    a, b = coefficients if mode and coefficients is not None else (0.0, 0.0)
    return mode, np.float32(a), np.float32(b)


Master = tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]
"""A master's quadrant as the kernels take it: (data, variance, mask bits), the quadrant's shape."""


def _master(master: Master, name: str) -> Master:
    data, variance, mask = master
    if mask.dtype.kind not in "ui":
        raise ValueError(f"{name} mask of data type {mask.dtype}: expected integer mask bits")
    return (_kernel_input(data, name), _kernel_input(variance, f"{name} variance"), _kernel_input(mask, f"{name} mask"))


def linearised(values: npt.ArrayLike, a: float, b: float) -> npt.NDArray[np.float32]:
    """IPAC's nonlinearity of ``values`` (ADU), as a new float32 array of the same shape."""
    out = np.array(values, dtype=np.float32, copy=True, order="C")
    _linearise_kernel(out.reshape(-1), np.float32(a), np.float32(b))
    return out


def above_pedestal(
    raw: npt.NDArray[np.number],
    level: npt.NDArray[np.float32],
    nonlinearity: str,
    coefficients: tuple[float, float] | None,
    out: npt.NDArray[np.float32],
) -> None:
    """Linear ADU above the pedestal of raw rows (2-D) into ``out`` (float32, same shape): minus the
    row's ``level`` (float32 ADU, one per row), with the nonlinearity after, before, or "off"."""
    mode, a, b = _coefficients(nonlinearity, coefficients)
    _above_pedestal_kernel(_kernel_input(raw, "raw"), level, mode, a, b, out)


def finish(
    raw: npt.NDArray[np.number],
    image: npt.NDArray[np.float32],
    bias: Master,
    flat: Master,
    constants: PixelConstants,
    variance: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint16],
) -> int:
    """The steps after the row corrections: ``image`` (linear ADU above the pedestal) in place becomes
    the flat-fielded ADU, and ``variance`` (ADU^2) and ``mask`` are filled. ``bias`` and ``flat`` are
    (data, variance, mask) of the same shape as ``raw``. Returns how many pixels may have a
    non-finite image or variance (0: none has; the count errs only upwards, on sums that overflow)."""
    kernel: Any = _finish_kernel
    return int(kernel(_kernel_input(raw, "raw"), image, *_master(bias, "bias"), *_master(flat, "flat"), *constants, variance, mask))


def detrend(
    raw: npt.NDArray[np.number],
    level: npt.NDArray[np.float32],
    nonlinearity: str,
    coefficients: tuple[float, float] | None,
    bias: Master,
    flat: Master,
    constants: PixelConstants,
    image: npt.NDArray[np.float32],
    variance: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint16],
) -> int:
    """:func:`above_pedestal` and :func:`finish` in one pass (no row corrections between them); returns
    :func:`finish`'s count of pixels that may be non-finite."""
    mode, a, b = _coefficients(nonlinearity, coefficients)
    kernel: Any = _detrend_kernel
    return int(
        kernel(_kernel_input(raw, "raw"), level, mode, a, b, *_master(bias, "bias"), *_master(flat, "flat"), *constants, image, variance, mask)
    )
