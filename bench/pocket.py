"""Cost of the pocket-effect correction on one full quadrant, against one numpy pass over the same array.

    python -m bench.pocket [--repeat N]

On one thread (NUMBA_NUM_THREADS=1, set here before numba loads), in CPU seconds of the process
(time.process_time): a simulated quadrant of 3080 rows x (3072 data + 30 overscan) columns in
readout order (Poisson sky of 150 ADU, 5 stars of 10^3 to 10^5.5 ADU per row, CCD 6 q1, the
strongest pocket), put through the compiled forward model, then:

- correct: ``streamer.detrend.pocket.correct`` on the whole quadrant at once (tables built once,
  before the timing, and the allocator set, as in a worker: ``keep_freed_memory``);
- correct in bands: the same on bands of ``BAND_ROWS`` rows, as the detrend pass calls it
  (``calibrate.detrend_science``), each band's output dropped before the next;
- forward: ``streamer.detrend.pocket.forward`` (the simulator's direction, exact powers);
- floor: one numpy pass over the same float32 array (``observed * 1.0001`` into a new array).

Prints the median of each over the repeats, correct / floor, and the residual of the correction
against the true rows (ADU rms over the data columns). Compilation is done (and cached) before.
"""

from __future__ import annotations

import os

os.environ["NUMBA_NUM_THREADS"] = "1"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402

import numpy as np  # noqa: E402

from bench import median_cpu_seconds  # noqa: E402
from streamer.detrend import pocket  # noqa: E402
from streamer.detrend.readout import OVERSCAN_COLUMNS, QUADRANT_SHAPE  # noqa: E402
from streamer.execution.local import keep_freed_memory  # noqa: E402

SKY = 150.0
BAND_ROWS = 128  # calibrate.detrend_science's block_rows


def true_quadrant(rng: np.random.Generator) -> np.ndarray:
    """True rows of a quadrant in readout order, float32 ADU: sky, 5 Gaussian stars a row, empty overscan."""
    rows, columns = QUADRANT_SHAPE
    true = np.zeros((rows, columns + OVERSCAN_COLUMNS), dtype=np.float32)
    true[:, :columns] = rng.poisson(SKY, (rows, columns))
    x = np.arange(columns)
    for i in range(rows):
        for centre, flux in zip(rng.uniform(0, columns, 5), 10 ** rng.uniform(3, 5.5, 5), strict=True):
            lo, hi = max(int(centre) - 12, 0), min(int(centre) + 13, columns)
            true[i, lo:hi] += flux / (np.sqrt(2 * np.pi) * 2.0) * np.exp(-0.5 * ((x[lo:hi] - centre) / 2.0) ** 2)
    return true


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    keep_freed_memory()
    p = pocket.pocket_parameters("v0.1", 6, 1, dt.date(2020, 9, 24))
    assert p is not None
    true = true_quadrant(np.random.default_rng(2020))
    pocket.correct(pocket.forward(true[:32], p), p)  # compile (or load the cache)
    observed = pocket.forward(true, p)

    corrected = pocket.correct(observed, p)
    residual = float(np.sqrt(np.mean((corrected - true)[:, : QUADRANT_SHAPE[1]].astype(np.float64) ** 2)))
    correct_s = median_cpu_seconds(lambda: pocket.correct(observed, p), args.repeat)

    def in_bands() -> None:
        for start in range(0, observed.shape[0], BAND_ROWS):
            pocket.correct(observed[start : start + BAND_ROWS], p)  # each band's output dropped, as the pass copies it out

    bands_s = median_cpu_seconds(in_bands, args.repeat)
    forward_s = median_cpu_seconds(lambda: pocket.forward(true, p), args.repeat)
    floor_s = median_cpu_seconds(lambda: observed * np.float32(1.0001), args.repeat)

    print(f"quadrant {observed.shape[0]} x {observed.shape[1]} float32, CCD 6 q1, sky {SKY:.0f} ADU, "
          f"median of {args.repeat}, CPU s, 1 thread")  # fmt: skip
    print(f"correct  {correct_s * 1e3:8.1f} ms   (residual {residual:.2e} ADU rms)")
    print(f"correct in bands of {BAND_ROWS} rows {bands_s * 1e3:8.1f} ms   (as the detrend pass calls it)")
    print(f"forward  {forward_s * 1e3:8.1f} ms")
    print(f"floor    {floor_s * 1e3:8.1f} ms   (one numpy pass)")
    print(f"correct / floor = {correct_s / floor_s:.1f}, in bands {bands_s / floor_s:.1f}")


if __name__ == "__main__":
    main()
