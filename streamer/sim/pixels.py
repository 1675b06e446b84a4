"""Pixel effects of one raw quadrant, in the physical order the camera applies them.

Pure numpy: arrays and parameters in, arrays out. Units are ADU unless a name says ``_e`` (electrons).
The order (see ``streamer.sim.generate`` for the full convention): linear signal -> Poisson noise ->
pocket effect (optional; serial register, whole rows in readout order into the overscan) ->
nonlinearity -> bias (level + row drift + fixed structure) -> read noise -> trailing charge in the
overscan -> saturation clip -> dead and hot columns -> rounding to uint16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from streamer.detrend import pocket as pocket_model
from streamer.detrend.readout import from_readout, to_readout

SATURATION_RAW_ADU: Final = 60000.0
FULL_WELL_ADU: Final = 150000.0
POISSON_EXACT_BELOW_E: Final = 20.0
TRAIL_FRACTION: Final = 0.01
TRAIL_SCALE_COLUMNS: Final = 2.0
UINT16_MAX: Final = 65535.0
BLOCK_ROWS: Final = 128

FloatImage = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Amplifier:
    """The static properties of one CCD quadrant's amplifier and pixels."""

    ccdid: int
    qid: int
    gain: float  # e-/ADU
    read_noise_e: float
    bias_level: float  # ADU
    dead_columns: tuple[int, ...]
    hot_columns: tuple[int, ...]
    hot_excess: tuple[float, ...]  # ADU added to each hot column, in every frame

    @property
    def read_noise_adu(self) -> float:
        return self.read_noise_e / self.gain


@dataclass(frozen=True)
class Drift:
    """Row-dependent bias drift shared by data and overscan, in readout row order, with zero mean over rows.

    ``drift(r) = amplitude * sin(2 pi cycles t + phase) + slope * (t - 0.5) - mean``, ``t = (r + 0.5) / rows``.
    """

    amplitude: float
    cycles: float
    phase: float
    slope: float

    def rows(self, n_rows: int) -> npt.NDArray[np.float64]:
        t = (np.arange(n_rows) + 0.5) / n_rows
        values = self.amplitude * np.sin(2 * np.pi * self.cycles * t + self.phase) + self.slope * (t - 0.5)
        return values - values.mean()


@dataclass(frozen=True)
class RawQuadrant:
    data: npt.NDArray[np.uint16]
    overscan: npt.NDArray[np.uint16]
    saturated: npt.NDArray[np.bool_]


def add_poisson_noise(signal: FloatImage, gain: float, rng: np.random.Generator) -> FloatImage:
    """Photon noise added to ``signal`` in place (electrons = ``signal * gain``): Gaussian of variance =
    mean above ``POISSON_EXACT_BELOW_E`` electrons, exact Poisson below. Negative means count as 0."""
    electrons = signal
    electrons *= np.float32(gain)
    np.maximum(electrons, np.float32(0.0), out=electrons)
    low = np.flatnonzero(electrons < POISSON_EXACT_BELOW_E)
    low_means = electrons.flat[low]
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noise *= np.sqrt(electrons)
    electrons += noise
    if low.size:
        electrons.flat[low] = rng.poisson(low_means).astype(np.float32)
    electrons /= np.float32(gain)
    return electrons


def apply_nonlinearity(linear: FloatImage, a: float, b: float) -> FloatImage:
    """``streamer.detrend.nonlinearity.uncorrect`` evaluated in float32, in place (the same formula:
    ``x = 2 y / ((1 - B y) + sqrt((1 - B y)^2 - 4 A y^2))``); it agrees with the float64 one to far
    below the rounding to integers (about 1e-3 ADU at 60000 ADU)."""
    y = linear
    c = np.float32(1.0) - np.float32(b) * y
    denominator = c * c
    denominator -= np.float32(4.0 * a) * (y * y)
    np.sqrt(denominator, out=denominator)
    denominator += c
    y *= np.float32(2.0)
    y /= denominator
    return y


def trailing_charge(last_column_read: npt.NDArray[np.float32], overscan_columns: int) -> FloatImage:
    """Charge in the overscan columns (readout order) trailing a row's last data pixel read."""
    decay = TRAIL_FRACTION * np.exp(-np.arange(overscan_columns) / TRAIL_SCALE_COLUMNS)
    return (last_column_read[:, None] * decay[None, :]).astype(np.float32)


def through_pocket(
    charge: FloatImage, p: pocket_model.Parameters, qid: int, overscan_columns: int
) -> tuple[FloatImage, FloatImage]:
    """Stored rows of charge (linear ADU) read out through the serial register's pocket (the v0.1
    forward model, :func:`streamer.detrend.pocket.forward`): each row in readout order, data columns
    then ``overscan_columns`` empty ones. Returns (data, overscan), both on the stored grid."""
    columns = charge.shape[1]
    empty = np.zeros((charge.shape[0], overscan_columns), dtype=np.float32)
    observed = pocket_model.forward(np.concatenate([to_readout(charge, qid), empty], axis=1), p)
    data = np.ascontiguousarray(from_readout(observed[:, :columns], qid))
    return data, np.ascontiguousarray(from_readout(observed[:, columns:], qid))


def raw_quadrant(
    signal: FloatImage | None,
    amp: Amplifier,
    nonlinearity: tuple[float, float],
    drift: Drift,
    bias_structure: FloatImage,
    overscan_columns: int,
    rng_poisson: np.random.Generator,
    rng_read: np.random.Generator,
    pocket: pocket_model.Parameters | None = None,
) -> RawQuadrant:
    """The stored (IPAC grid) uint16 data and overscan of a quadrant whose true linear signal is ``signal``.

    ``signal`` (float32, ADU) is None for a bias (zero signal, no photon noise). Computed in blocks of
    ``BLOCK_ROWS`` rows so that temporaries stay in cache; random numbers are drawn block by block.
    ``pocket``: the parameters of the amplifier's pocket, applied to the charge after photon noise;
    its trail in the overscan goes through the nonlinearity too. With a pocket the hot columns'
    excess is dark charge that goes through it (in biases too), as on the sky: added before it
    instead of after the clip.
    """
    rows, cols = bias_structure.shape
    drift_readout = drift.rows(rows)
    drift_stored = drift_readout[::-1] if amp.qid in (3, 4) else drift_readout
    bias_rows = (amp.bias_level + drift_stored).astype(np.float32)[:, None]
    last_column = 0 if amp.qid in (2, 3) else cols - 1  # the stored column read last in each row
    last_read = np.zeros(rows, dtype=np.float32)
    data = np.empty((rows, cols), dtype=np.uint16)
    saturated = np.empty((rows, cols), dtype=bool)
    read_noise = np.float32(amp.read_noise_adu)
    saturation = np.float32(SATURATION_RAW_ADU)
    pocket_overscan = np.zeros((rows, overscan_columns), dtype=np.float32)

    for start in range(0, rows, BLOCK_ROWS):
        stop = min(rows, start + BLOCK_ROWS)
        bias_part = rng_read.standard_normal((stop - start, cols), dtype=np.float32)
        bias_part *= read_noise
        bias_part += bias_rows[start:stop]
        bias_part += bias_structure[start:stop]
        if signal is None and pocket is None:
            total = bias_part.copy()
        else:
            if signal is None:
                measured = np.zeros((stop - start, cols), dtype=np.float32)
            else:
                measured = np.minimum(signal[start:stop], np.float32(FULL_WELL_ADU))
                add_poisson_noise(measured, amp.gain, rng_poisson)
            if pocket is not None:
                for column, excess in zip(amp.hot_columns, amp.hot_excess, strict=True):
                    measured[:, column] += np.float32(excess)
                measured, pocket_overscan[start:stop] = through_pocket(measured, pocket, amp.qid, overscan_columns)
            apply_nonlinearity(measured, *nonlinearity)
            last_read[start:stop] = measured[:, last_column]
            total = measured
            total += bias_part
        block_saturated = saturated[start:stop]
        np.greater_equal(total, saturation, out=block_saturated)
        np.minimum(total, saturation, out=total)
        for column in amp.dead_columns:
            total[:, column] = bias_part[:, column]
            block_saturated[:, column] = False
        if pocket is None:
            for column, excess in zip(amp.hot_columns, amp.hot_excess, strict=True):
                total[:, column] += np.float32(excess)
        data[start:stop] = _to_uint16(total)

    overscan = rng_read.standard_normal((rows, overscan_columns), dtype=np.float32)
    overscan *= read_noise
    overscan += bias_rows
    last_read_readout = last_read[::-1] if amp.qid in (3, 4) else last_read
    overscan += from_readout(trailing_charge(last_read_readout, overscan_columns), amp.qid)
    if pocket is not None:
        overscan += apply_nonlinearity(pocket_overscan, *nonlinearity)
    np.minimum(overscan, saturation, out=overscan)
    return RawQuadrant(data, _to_uint16(overscan), saturated)


def _to_uint16(values: FloatImage) -> npt.NDArray[np.uint16]:
    np.rint(values, out=values)
    np.clip(values, 0.0, UINT16_MAX, out=values)
    return values.astype(np.uint16)
