"""The pocket effect of the ZTF CCDs: a charge trap on the serial register, its forward model and its correction.

The model is ztfsensors' v0.1 (four parameters per CCD and amplifier: alpha, cmax, beta, nmax;
see ``data/pocket_v0.1.txt`` for the source). Each row is read in readout order, data columns first
and then the overscan columns, through a pocket that is empty at the start of the row and never
carries to the next row. For pixel j of true value ``n`` (ADU above the bias pedestal) and pocket
content ``q`` before it is read, with ``x = q / cmax``:

    release   r = min(cmax * x**alpha, q)
    capture   c = min(cmax * (1 - x)**alpha * (n+ / nmax)**beta, n+)       n+ = max(n, 0)
    observed  o = n + r - c
    pocket    q' = q - r + c

so charge is conserved: ``sum(o) + q_end = sum(n)``. A constant row ``n`` settles where r = c,
``x* = s / (1 + s)`` with ``s = (n / nmax)**(beta / alpha)`` (while ``cmax x*^alpha <= n``; beyond it the
capture is the whole pixel and ``x* = (n / cmax)**(1 / alpha)``).

The correction solves the row's fixed point ``n = o - delta(n)`` (``delta = r - c`` from running the
pocket over ``n``): because the model is causal, that is done in one pass in readout order, each
pixel's equation solved given the pocket of the corrected pixels before it. With the deficit
``v = o - r(q)`` and ``C(q) = cmax (1 - x)**alpha``, the pixel's true value is the root of
``n - C(q) (n / nmax)**beta = v``. Writing ``n = lambda(q) z`` with ``lambda = (C / nmax**beta)**(1 /
(1 - beta))`` turns it into ``z - z**beta = v / lambda``, one equation per amplifier whatever the
pocket: its root (on the branch ``z >= 1``) is found once, by Newton to convergence, on a grid of
``w = v / lambda`` (:func:`tables`), so that a pixel costs table look-ups and no iteration:
``n = v + lambda(q) * z(w)**beta``. ``r(q)`` and ``lambda(q)`` are tabulated over 4097 pocket fills and
``z**beta`` over 8193 values of ``w**(1/4)`` (linear interpolation). The compiled kernel advances 32
rows together in float32 (two 16-lane vectors with AVX-512, four 8-lane ones with AVX2; int32 table
indices, whose conversion AVX2 has too), so that their independent pockets overlap in the
CPU); the numpy reference computes the same rule in float64. Against the exact forward model, rows
with bright stars over a faint sky come back within 2e-4 ADU rms (the tables' accuracy).
The overscan columns go through the same inversion: they hold no charge, so there the deficit is
below the threshold and the corrected value is the observed one less the release, the trail taken
out. What remains in them is the error of the overscan level that was subtracted (plus noise), from
which :func:`streamer.detrend.calibrate.fit_overscan` refits the level; since the model is causal they
play no part in the data columns.

Low signal: the register holds no negative charge, and the read noise that makes values negative
is added after it, so the capture sees ``n+ = max(n, 0)``, and the pixel values themselves are
never clipped (negative noise keeps its sign through both directions; ztfsensors evaluates
``(n / nmax)**beta`` on negative values, which gives NaN). Where the capture function exceeds the
pixel (``n < n_c(q)``, where ``cmax (1 - x)**alpha (n_c / nmax)**beta = n_c``: 69 ADU for CCD 6 q1 with
an empty pocket, 44 ADU in its equilibrium at a sky of 100 ADU) the model captures the whole
pixel and the observed value is the release alone: the deficit is 0 whatever the pixel held, the
inverse jumps from 0 to ``n_c`` as the deficit leaves 0, and applied to noise around 0 it would
turn every positive fluctuation into a pixel of ``n_c`` ADU (the "swallowed" positive noise,
returned). So the correction applies the capture only above a threshold: a pixel whose deficit
is at most ``threshold`` (default 8 ADU, 5 x the 1.6 ADU read noise of a ZTF amplifier: at 3 x,
0.07 % of the pixels of a bias jumped to about 70 ADU) is taken to have lost nothing to the pocket
(``n = v``: the release of earlier pixels is still removed). So biases and darks pass unchanged
but for their pixels above the threshold. The pixels read first in a row, while the pocket is
still nearly empty, have the largest ``n_c``: for CCD 6 q1 a first pixel below about 82 ADU shows a
deficit under 8 ADU and is left uncorrected (about 3 % of first pixels at a sky of 100 ADU, none at
150). Past the first pixels, a sky above about ``n_c`` is corrected exactly; at skies of roughly
8-50 ADU the model itself cannot be inverted pixel by pixel.

Rows are given in readout order (see :mod:`.readout`), float arrays of shape (rows, data columns +
overscan columns), in ADU after overscan subtraction and nonlinearity. Arrays in, new arrays out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numba
import numpy as np
import numpy.typing as npt

DEFAULT_THRESHOLD = 8.0  # ADU of deficit (observed - release) at or below which nothing is taken as captured
MODELS = ("v0.1",)

# Readout-electronics periods: [start, next start); the first starts with the survey, the last is open.
PERIOD_STARTS: tuple[dt.date, ...] = (
    dt.date(2018, 3, 1),
    dt.date(2018, 6, 26),
    dt.date(2019, 10, 22),
    dt.date(2020, 4, 29),
    dt.date(2022, 10, 4),
)

FloatArray = npt.NDArray[np.floating[Any]]


@dataclass(frozen=True)
class Parameters:
    """The v0.1 pocket parameters of one amplifier: ``alpha`` and ``beta`` (dimensionless exponents of
    release and capture), ``cmax`` (pocket capacity, ADU), ``nmax`` (pixel scale of the capture, ADU)."""

    alpha: float
    cmax: float
    beta: float
    nmax: float

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and self.cmax > 0 and self.beta > 0 and self.nmax > 0):
            raise ValueError(f"{self}: every pocket parameter must be > 0")


# ---------------------------------------------------------------- periods and the shipped table


def period_of(night: dt.date) -> int | None:
    """Index of the readout-electronics period of a night (0..4), None before the first."""
    index = None
    for i, start in enumerate(PERIOD_STARTS):
        if night >= start:
            index = i
    return index


def _period_set(text: str) -> set[int]:
    periods: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        periods.update(range(int(first), int(last or first) + 1))
    return periods


@cache
def load_table(model: str) -> dict[tuple[int, int, int], Parameters]:
    """``{(period, ccdid, qid): Parameters}`` of one model's shipped table."""
    if model not in MODELS:
        raise ValueError(f"pocket model {model!r}: expected one of {', '.join(MODELS)}")
    text = resources.files("streamer.detrend").joinpath(f"data/pocket_{model}.txt").read_text()
    table: dict[tuple[int, int, int], Parameters] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        ccdid, qid, alpha, cmax, beta, nmax, periods = parts
        parameters = Parameters(alpha=float(alpha), cmax=float(cmax), beta=float(beta), nmax=float(nmax))
        for period in _period_set(periods):
            table[(period, int(ccdid), int(qid))] = parameters
    return table


def pocket_parameters(model: str, ccdid: int, qid: int, night: dt.date) -> Parameters | None:
    """The parameters of a CCD quadrant on a night, None outside every period the model covers."""
    period = period_of(night)
    if period is None:
        return None
    return load_table(model).get((period, ccdid, qid))


# ---------------------------------------------------------------- reference implementation (numpy)


def release(pocket: FloatArray, p: Parameters) -> FloatArray:
    """Charge leaving a pocket holding ``pocket`` ADU as the next pixel is read (ADU)."""
    x = np.clip(pocket / p.cmax, 0.0, 1.0)
    return np.asarray(np.minimum(p.cmax * x**p.alpha, pocket))


def capture(pocket: FloatArray, pixel: FloatArray, p: Parameters) -> FloatArray:
    """Charge entering the pocket from a pixel of true value ``pixel`` ADU (its positive part only)."""
    x = np.clip(pocket / p.cmax, 0.0, 1.0)
    charge = np.maximum(pixel, 0.0)
    return np.asarray(np.minimum(p.cmax * (1.0 - x) ** p.alpha * (charge / p.nmax) ** p.beta, charge))


def forward_reference(rows: npt.ArrayLike, p: Parameters) -> tuple[FloatArray, FloatArray]:
    """The observed rows (float64) of true rows in readout order, and what each pocket holds at the row end."""
    true = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    observed = np.empty_like(true)
    pocket = np.zeros(true.shape[0])
    for j in range(true.shape[1]):
        delta = release(pocket, p) - capture(pocket, true[:, j], p)
        observed[:, j] = true[:, j] + delta
        pocket = pocket - delta
    return observed, pocket


@dataclass(frozen=True)
class Tables:
    """The correction's functions of one amplifier, tabulated for linear interpolation.

    Over ``FILL_CELLS + 1`` pocket fills ``q = k / per_fill`` in [0, cmax]: ``release`` r(q) and ``unit``
    ``lambda(q) = (C(q) / nmax**beta)**(1 / (1 - beta))`` (0 only for a full pocket). Over
    ``ROOT_CELLS + 1`` values ``s = k / per_root`` in [0, ROOT_TOP]: ``capture`` = ``z**beta`` for the
    root ``z >= 1`` of ``z - z**beta = s**4`` (flat beyond the last node).
    """

    release: npt.NDArray[np.float64]
    unit: npt.NDArray[np.float64]
    capture: npt.NDArray[np.float64]
    per_fill: float
    per_root: float


FILL_CELLS = 4096
ROOT_CELLS = 8192
ROOT_TOP = 64.0  # s = w**(1/4): w up to 1.7e7, beyond any pixel over the unit of a pocket under 99 % full
ROOT_NEWTON_STEPS = 60


@cache
def tables(p: Parameters) -> Tables:
    """The tables of ``p``, exact at the nodes (the root by Newton to convergence from above)."""
    fill = np.linspace(0.0, p.cmax, FILL_CELLS + 1)
    x = fill / p.cmax
    unit = (p.cmax * (1.0 - x) ** p.alpha / p.nmax**p.beta) ** (1.0 / (1.0 - p.beta))
    w = np.linspace(0.0, ROOT_TOP, ROOT_CELLS + 1) ** 4
    z = w + w**p.beta + 1.0  # above the root: z - z**beta < z - 1 <= w + w**beta
    for _ in range(ROOT_NEWTON_STEPS):
        z = z - (z - z**p.beta - w) / (1.0 - p.beta * z ** (p.beta - 1.0))
    return Tables(
        release=np.minimum(p.cmax * x**p.alpha, fill),
        unit=unit,
        capture=z**p.beta,
        per_fill=FILL_CELLS / p.cmax,
        per_root=ROOT_CELLS / ROOT_TOP,
    )


def _lookup(table: FloatArray, position: FloatArray) -> FloatArray:
    """Linear interpolation of ``table`` at fractional indices ``position`` >= 0 (the last cell extended)."""
    index = np.minimum(position.astype(np.int64), table.shape[0] - 2)
    weight = position - index
    return np.asarray(table[index] + weight * (table[index + 1] - table[index]))


def _invert_column_reference(observed: FloatArray, pocket: FloatArray, t: Tables, threshold: float) -> FloatArray:
    """True values of one column (vectorised over rows) given the pocket before it: the rule of :func:`correct`."""
    fill = pocket * t.per_fill
    deficit = observed - _lookup(t.release, fill)
    unit = _lookup(t.unit, fill)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(unit > 0.0, deficit / unit, 0.0)
    root = np.sqrt(np.sqrt(np.maximum(ratio, 0.0))) * t.per_root
    n = deficit + unit * _lookup(t.capture, np.minimum(root, float(t.capture.shape[0] - 1)))
    return np.asarray(np.where(deficit > threshold, n, deficit), dtype=np.float64)


def correct_reference(rows: npt.ArrayLike, p: Parameters, *, threshold: float = DEFAULT_THRESHOLD) -> FloatArray:
    """The true rows (float64) estimated from observed rows: :func:`correct` in numpy, column by column."""
    observed = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    t = tables(p)
    estimate = np.empty_like(observed)
    pocket = np.zeros(observed.shape[0])
    for j in range(observed.shape[1]):
        n = _invert_column_reference(observed[:, j], pocket, t, threshold)
        estimate[:, j] = n
        pocket = pocket - (observed[:, j] - n)
    return estimate


# ---------------------------------------------------------------- compiled kernels (numba)


def _forward_rows(true: FloatArray, alpha: float, cmax: float, beta: float, nmax: float, out: FloatArray) -> None:
    for i in numba.prange(true.shape[0]):
        q = 0.0
        for j in range(true.shape[1]):
            n = float(true[i, j])
            x = min(max(q / cmax, 0.0), 1.0)
            r = min(cmax * x**alpha, q)
            charge = max(n, 0.0)
            c = min(cmax * (1.0 - x) ** alpha * (charge / nmax) ** beta, charge)
            out[i, j] = n + r - c
            q = q - r + c


BLOCK_ROWS = 32  # rows advanced together, column by column, so that their independent pockets overlap in the CPU


def _correct_rows(
    observed: FloatArray,
    release: FloatArray,
    unit: FloatArray,
    capture: FloatArray,
    per_fill: float,
    per_root: float,
    threshold: float,
    out: FloatArray,
) -> None:
    rows = observed.shape[0]
    width = np.uint64(observed.shape[1])
    last_fill = release.shape[0] - 2
    last_root = capture.shape[0] - 2
    # float32 throughout (tables included): 16 lanes a vector instead of 8
    fill_scale = np.float32(per_fill)
    root_scale = np.float32(per_root)
    above = np.float32(threshold)
    top = np.float32(last_root + 1.0)
    zero = np.float32(0.0)
    # table indices in int32: float32 -> int32 conversions vectorise on AVX2 too (float -> int64
    # needs AVX-512), and the clamp of the fill keeps the conversion in range
    fill_cap = np.float32(2.0**30)
    first_cell = np.int32(0)
    last_fill_cell = np.int32(last_fill)
    last_root_cell = np.int32(last_root)
    lanes = np.uint64(BLOCK_ROWS)
    one = np.uint64(1)
    last_row = np.uint64(max(rows - 1, 0))
    pixels_in = observed.reshape(-1)
    pixels_out = out.reshape(-1)
    # Each column in stages over the block's lanes: the table reads (scalar loads, which LLVM
    # prefers to gathers on this kind of CPU) in loops of their own, with the arithmetic that
    # follows a read and needs no other, so that the loops between them vectorise. Every block
    # has all its lanes: those past the last row repeat it, so that no loop has a variable trip
    # count, and write the same values to it. Unsigned indices spare numba's negative-index
    # wraparound, which keeps a loop scalar (BENCHMARKS.md, "Pocket-effect correction").
    for block in range((rows + BLOCK_ROWS - 1) // BLOCK_ROWS):
        first = np.uint64(block * BLOCK_ROWS)
        start = np.zeros(BLOCK_ROWS, dtype=np.uint64)  # the flat index of each lane's row
        for b in range(lanes):
            start[b] = min(first + np.uint64(b), last_row) * width
        q = np.zeros(BLOCK_ROWS, dtype=np.float32)  # the pocket of each lane's row
        o = np.zeros(BLOCK_ROWS, dtype=np.float32)  # observed value
        index = np.zeros(BLOCK_ROWS, dtype=np.int32)
        weight = np.zeros(BLOCK_ROWS, dtype=np.float32)
        released = np.zeros(BLOCK_ROWS, dtype=np.float32)
        lam = np.zeros(BLOCK_ROWS, dtype=np.float32)
        for j in range(width):
            column = np.uint64(j)
            for b in range(lanes):
                o[b] = pixels_in[start[b] + column]
            for b in range(lanes):
                u = min(q[b] * fill_scale, fill_cap)
                i = max(min(np.int32(u), last_fill_cell), first_cell)
                index[b] = i
                weight[b] = u - np.float32(i)
            for b in range(lanes):
                cell = np.uint64(index[b])
                w = weight[b]
                r = release[cell]
                s = unit[cell]
                released[b] = r + w * (release[cell + one] - r)
                lam[b] = s + w * (unit[cell + one] - s)
            for b in range(lanes):
                d = o[b] - released[b]
                scale = lam[b]
                ratio = d / scale if scale > zero else zero
                u = min(np.sqrt(np.sqrt(max(ratio, zero))) * root_scale, top)
                k = max(min(np.int32(u), last_root_cell), first_cell)
                index[b] = k
                weight[b] = u - np.float32(k)
            for b in range(lanes):
                cell = np.uint64(index[b])
                c = capture[cell]
                d = o[b] - released[b]
                m = d + lam[b] * (c + weight[b] * (capture[cell + one] - c))
                m = m if d > above else d
                q[b] = q[b] - o[b] + m
                pixels_out[start[b] + column] = m


# the forward model parallel over rows (prange); the correction on one thread, as the pool's
# workers run it: numba's parallel form of the same loops took 43 against 38 ms a quadrant on one
# thread (BENCHMARKS.md, "Pocket-effect correction"). cache=True keeps the compiled code beside
# the module for the next process.
_forward_kernel = numba.njit(nogil=True, parallel=True, cache=True, error_model="numpy")(_forward_rows)
_correct_kernel = numba.njit(nogil=True, cache=True, error_model="numpy")(_correct_rows)


@cache
def _kernel_tables(p: Parameters) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The release, unit and capture tables of ``p`` in float32, as the compiled correction reads them."""
    t = tables(p)
    return t.release.astype(np.float32), t.unit.astype(np.float32), t.capture.astype(np.float32)


def _rows_2d(rows: npt.ArrayLike) -> npt.NDArray[np.float32]:
    array = np.asarray(rows)
    if array.ndim != 2:
        raise ValueError(f"rows of shape {array.shape}: expected (rows, columns)")
    return np.ascontiguousarray(array, dtype=np.float32)


def forward(rows: npt.ArrayLike, p: Parameters) -> npt.NDArray[np.float32]:
    """The observed rows (float32, a new array) of true rows in readout order: the compiled forward model."""
    true = _rows_2d(rows)
    out = np.empty_like(true)
    _forward_kernel(true, p.alpha, p.cmax, p.beta, p.nmax, out)
    return out


def correct(rows: npt.ArrayLike, p: Parameters, *, threshold: float = DEFAULT_THRESHOLD) -> npt.NDArray[np.float32]:
    """The true rows (float32, a new array) of observed rows in readout order, data then overscan
    columns: the compiled correction. The overscan columns come back with the trail taken out."""
    observed = _rows_2d(rows)
    if not threshold >= 0:
        raise ValueError(f"threshold {threshold}: expected >= 0")
    out = np.empty_like(observed)
    release, unit, capture = _kernel_tables(p)
    t = tables(p)
    _correct_kernel(observed, release, unit, capture, t.per_fill, t.per_root, threshold, out)
    return out


def row_correction(p: Parameters, *, threshold: float = DEFAULT_THRESHOLD) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]:
    """The correction as a ``calibrate.RowCorrection`` (rows in readout order, 30 overscan columns)."""

    def pocket_correction(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return correct(rows, p, threshold=threshold)

    return pocket_correction
