"""Time the generation of one CCD file of each image type: ``python -m streamer.sim.benchmark [--shape full]``.

Prints wall-clock and CPU seconds per file, after one untimed file of each type has filled the caches
(pixel response and truth flat of the CCD and filter, the catalogue), as in a long ``generate`` run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

from streamer.sim.generate import LEDS, STARS_PER_QUADRANT, Instrument, NightSpec, plan_night, write_ccd_file
from streamer.sim.geometry import shape_named


def run(shape: str, repeats: int) -> dict[str, tuple[float, float]]:
    """``{imgtype: (median wall seconds, median CPU seconds)}`` per CCD file."""
    night = dt.date(2020, 9, 24)
    instrument = Instrument(shape_named(shape), 0, STARS_PER_QUADRANT[shape])
    exposures = plan_night(night, 0, n_exposures=1, flats_per_led=1, n_biases=1, filters=("zr",), flat_filters=("zr",))
    chosen = [next(e for e in exposures if e.imgtype == kind) for kind in ("bias", "flat", "object")]
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        medians = {(13, "zr"): {led: 1.0 for led in LEDS["zr"]}}
        spec = NightSpec(Path(directory), night, 0, instrument, medians)
        for exposure in chosen:
            write_ccd_file(spec, exposure, 13)
            walls, cpus = [], []
            for _ in range(repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                write_ccd_file(spec, exposure, 13)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            results[exposure.imgtype] = (statistics.median(walls), statistics.median(cpus))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("full", "small"), default="full")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for imgtype, (wall, cpu) in run(args.shape, args.repeats).items():
        print(f"{args.shape} {imgtype:6s} CCD file: {wall:.2f} s wall, {cpu:.2f} s CPU (median of {args.repeats})")


if __name__ == "__main__":
    main()
