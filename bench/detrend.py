"""Cost of the detrending chain on one full quadrant: the compiled pass against numpy and two floors.

    python -m bench.detrend [--repeat N]

On one thread (NUMBA_NUM_THREADS=1 and one BLAS thread, set here before the libraries load), in
CPU seconds of the process (time.process_time), median of the repeats, compilation done (and
cached) before. One simulated raw quadrant, 3080 x 3072 uint16 read-only as the raw reader gives
it (sky of 300 ADU, a ramp of stars, 0.02 % of pixels at the ADC ceiling) with its overscan, and
float32 masters with NaN, zero flats and mask bits; default settings (nonlinearity after the
overscan, an overscan model of degree 8), SATURATE given. Rows:

- numpy: ``streamer.detrend.reference.detrend_science``, the numpy formulation the kernels replaced;
- fused: ``streamer.detrend.calibrate.detrend_science``, what the worker runs (overscan fit, the
  compiled pass, three new full-size outputs);
- pass alone: ``streamer.detrend.fused.detrend`` into existing outputs; its overscan-level and
  nonlinearity steps alone (``fused.above_pedestal``: the raw read, the image written); the
  overscan fit alone;
- with the pocket correction (v0.1, CCD 6 q1), numpy and fused: the pocket kernel runs on
  bands of rows between the two halves of the pixel steps in both;
- floors: one in-place numpy multiply-add over a float32 quadrant (``x *= c; x += d``), and one
  memcpy of a float32 quadrant into an existing one (``np.copyto``: 8 bytes a pixel; the pass reads
  18 and writes 10);
- for scale, numpy moving the bytes of the pass: each of its 7 inputs read once (a max) and its 3
  outputs written once (copies), no arithmetic.

Prints each in ms, each against the numpy path and the floors, and the largest relative difference
of the fused results from numpy's (image, variance) and whether the masks are identical.
"""

from __future__ import annotations

import os

os.environ["NUMBA_NUM_THREADS"] = "1"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from bench import median_cpu_seconds  # noqa: E402
from streamer.config import DetrendConfig  # noqa: E402
from streamer.detrend import calibrate, fused, masks, pocket, reference  # noqa: E402
from streamer.detrend import nonlinearity as nl  # noqa: E402
from streamer.detrend.calibrate import MasterQuadrant  # noqa: E402
from streamer.detrend.readout import QUADRANT_SHAPE  # noqa: E402

NIGHT = dt.date(2020, 9, 24)
CCD, QID = 6, 1
GAIN, READ_NOISE_E = 6.2, 9.5


def raw_quadrant(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A stored raw quadrant and its overscan (uint16, read-only)."""
    rows, columns = QUADRANT_SHAPE
    drift = (1000.0 + 4.0 * np.linspace(-1.0, 1.0, rows) ** 2)[:, np.newaxis]
    linear = rng.poisson(300.0, QUADRANT_SHAPE).astype(np.float64)
    linear[::7, ::53] += np.geomspace(1e2, 6e4, linear[::7, ::53].shape[1])  # a ramp of point-like stars
    data = nl.uncorrect(np.minimum(linear, 62_000.0), *nl.coefficients(NIGHT, CCD, QID)) + drift
    data += rng.normal(0.0, READ_NOISE_E / GAIN, QUADRANT_SHAPE)
    data[rng.random(QUADRANT_SHAPE) < 2e-4] = 65535.0
    overscan = drift + rng.normal(0.0, READ_NOISE_E / GAIN, (rows, 30))
    raw = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    overscan_raw = np.clip(np.rint(overscan), 0, 65535).astype(np.uint16)
    raw.flags.writeable = overscan_raw.flags.writeable = False
    return raw, overscan_raw


def masters(rng: np.random.Generator) -> tuple[MasterQuadrant, MasterQuadrant]:
    shape = QUADRANT_SHAPE
    flat = rng.normal(1.0, 0.02, shape).astype(np.float32)
    flat[rng.random(shape) < 1e-4] = 0.0
    flat[rng.random(shape) < 1e-4] = np.nan
    flat_mask = np.where(rng.random(shape) < 1e-3, masks.DEAD, 0).astype(np.uint16)
    bias_mask = np.where(rng.random(shape) < 1e-3, masks.HOT, 0).astype(np.uint16)
    bias = MasterQuadrant(rng.normal(0.0, 0.8, shape).astype(np.float32), np.full(shape, 2e-3, np.float32), bias_mask)
    return bias, MasterQuadrant(flat, np.full(shape, 5e-7, np.float32), flat_mask)


def cpu_seconds(action: Callable[[], object], repeat: int) -> float:
    action()  # compile or load the cache; first touch
    return median_cpu_seconds(action, repeat)


def largest_difference(got: calibrate.DetrendedQuadrant, want: calibrate.DetrendedQuadrant) -> tuple[float, bool]:
    """Largest relative difference of image and variance over pixels finite in numpy's, and masks equal."""
    worst = 0.0
    for name in ("image", "variance"):
        a, b = getattr(got, name), getattr(want, name)
        finite = np.isfinite(b) & (b != 0)
        worst = max(worst, float(np.max(np.abs(a[finite].astype(np.float64) / b[finite] - 1.0))))
    return worst, bool(np.array_equal(got.mask, want.mask))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(2024)
    data, overscan = raw_quadrant(rng)
    bias, flat = masters(rng)
    config = DetrendConfig()
    coefficients = nl.coefficients(NIGHT, CCD, QID)
    parameters = pocket.pocket_parameters("v0.1", CCD, QID, NIGHT)
    assert parameters is not None
    common: dict[str, Any] = dict(
        config=config, nonlinearity_coefficients=coefficients, master_bias=bias, master_flat=flat,
        gain=GAIN, read_noise=READ_NOISE_E, saturate=float(nl.correct(64_000.0 - 1000.0, *coefficients)),
    )  # fmt: skip
    with_pocket = dict(common, row_corrections=(pocket.row_correction(parameters),))

    def numpy_chain() -> calibrate.DetrendedQuadrant:
        return reference.detrend_science(data, overscan, QID, **common)

    def fused_chain() -> calibrate.DetrendedQuadrant:
        return calibrate.detrend_science(data, overscan, QID, **common)

    model = calibrate.fit_overscan(overscan, QID, config=config, nonlinearity_coefficients=coefficients)
    level = model.level_stored.astype(np.float32)
    constants = fused.pixel_constants(
        gain=GAIN, read_noise=READ_NOISE_E, flat_factor=1.0, saturation=common["saturate"] * (1.0 - calibrate.SATURATE_MARGIN),
        raw_ceiling=65535.0, raw_dtype=data.dtype,
    )  # fmt: skip
    image = np.empty(QUADRANT_SHAPE, np.float32)
    variance = np.empty(QUADRANT_SHAPE, np.float32)
    mask = np.empty(QUADRANT_SHAPE, np.uint16)
    inputs = (data, bias.data, bias.variance, bias.mask, flat.data, flat.variance, flat.mask)

    def bytes_floor() -> None:
        for array in inputs:
            array.max()
        np.copyto(image, bias.data)
        np.copyto(variance, flat.data)
        np.copyto(mask, bias.mask)

    scratch = np.ones(QUADRANT_SHAPE, np.float32)
    source = np.ones(QUADRANT_SHAPE, np.float32)

    def multiply_add() -> None:
        scratch.__imul__(np.float32(1.0001))
        scratch.__iadd__(np.float32(-0.0001))

    difference, same_mask = largest_difference(fused_chain(), numpy_chain())
    pocket_difference, pocket_same_mask = largest_difference(
        calibrate.detrend_science(data, overscan, QID, **with_pocket), reference.detrend_science(data, overscan, QID, **with_pocket)
    )
    figures = {
        "numpy (reference)": cpu_seconds(numpy_chain, args.repeat),
        "fused (detrend_science)": cpu_seconds(fused_chain, args.repeat),
        "  the compiled pass alone": cpu_seconds(
            lambda: fused.detrend(data, level, config.nonlinearity, coefficients, bias, flat, constants, image, variance, mask),
            args.repeat,
        ),
        "  steps 2-3 alone (raw to image)": cpu_seconds(
            lambda: fused.above_pedestal(data, level, config.nonlinearity, coefficients, image), args.repeat
        ),
        "  the overscan fit alone": cpu_seconds(
            lambda: calibrate.fit_overscan(overscan, QID, config=config, nonlinearity_coefficients=coefficients), args.repeat
        ),
        "numpy, with pocket": cpu_seconds(lambda: reference.detrend_science(data, overscan, QID, **with_pocket), args.repeat),
        "fused, with pocket": cpu_seconds(lambda: calibrate.detrend_science(data, overscan, QID, **with_pocket), args.repeat),
        "floor: in-place multiply-add": cpu_seconds(multiply_add, args.repeat),
        "numpy moving the pass's bytes": cpu_seconds(bytes_floor, args.repeat),
        "floor: memcpy": cpu_seconds(lambda: np.copyto(scratch, source), args.repeat),
    }
    numpy_s, madd_s, memcpy_s = figures["numpy (reference)"], figures["floor: in-place multiply-add"], figures["floor: memcpy"]
    print(f"quadrant {QUADRANT_SHAPE[0]} x {QUADRANT_SHAPE[1]} uint16, CCD {CCD} q{QID}, median of {args.repeat}, CPU ms, 1 thread")
    print(f"{'':32s} {'ms':>7s} {'/numpy':>7s} {'/madd':>7s} {'/memcpy':>7s}")
    for name, seconds in figures.items():
        print(f"{name:32s} {seconds * 1e3:7.1f} {seconds / numpy_s:7.2f} {seconds / madd_s:7.1f} {seconds / memcpy_s:7.1f}")
    print(f"fused vs numpy: largest relative difference {difference:.1e}, masks identical: {same_mask}; "
          f"with pocket {pocket_difference:.1e}, {pocket_same_mask}")  # fmt: skip


if __name__ == "__main__":
    main()
