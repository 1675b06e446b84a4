"""Benchmark of reading the masters: CPU per quadrant, format 1 against format 2, and the floor.

    python -m bench.masters_read [--data DIR] [--repeat 5]

On first use it writes a full-size (3080 x 3072) simulated night of one CCD into DIR (8 biases,
3 flats for each of the 3 LEDs of zi) and builds its master bias and master flat with the work
functions, in format 2. It then writes the same quadrants in format 1 (Rice-compressed floats
with dither, as before) and in format 2 with every plane compressed, and measures, per quadrant
and in CPU seconds (``time.process_time``, median of ``--repeat``), with the files in the page
cache and nothing cached in the process:

- ``read_master`` of each file;
- the floor: ``np.copy`` of the three arrays a read returns (new memory for 95 MB), which any
  reader that hands out new arrays pays;
- the size of each file (one CCD: four quadrants) and the time to write it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import median_cpu_seconds

NIGHT = dt.date(2021, 3, 2)
CCD = 7
FILTER = "zi"  # 3 LEDs: the smallest complete flat sequence


def ensure_masters(data: Path) -> dict[str, Path]:
    """The master bias and flat of DIR's night (built on first use)."""
    masters = {"bias": data / "bias.fits", "flat": data / "flat.fits"}
    if all(path.exists() for path in masters.values()):
        return masters
    from astropy.io import fits

    from streamer.config import DetrendConfig
    from streamer.rules.bias import biases_to_use
    from streamer.sim.generate import generate_night
    from streamer.work.masters import build_led_flat, build_master_bias, combine_master_flat

    print(f"writing a full-size simulated night into {data} and building its masters (about 2 minutes)...", flush=True)
    config = DetrendConfig(bias_skip_first=2, min_bias_frames=5, min_flats_per_led=3)
    sim = data / "sim"
    if not (sim / "truth" / "params.json").exists():
        generate_night(sim, NIGHT, ccds=(CCD,), n_exposures=0, flats_per_led=3, n_biases=8, shape="full", seed=11,
                       filters=(FILTER,), flat_filters=(FILTER,))  # fmt: skip
    raws = sorted(str(p) for p in sim.glob("raw/**/*.fits.fz"))
    by_led: dict[int, list[str]] = defaultdict(list)
    for path in raws:
        if path.endswith("_f.fits.fz"):
            by_led[int(fits.getheader(path, 0)["ILUM_LED"])].append(path)
    biases = biases_to_use([p for p in raws if p.endswith("_b.fits.fz")], config.bias_skip_first, order=os.path.basename)
    bias = build_master_bias(biases, str(data / "bias.tmp.fits"), night=NIGHT, ccdid=CCD, detrend=config)
    leds = {
        led: build_led_flat(paths, bias.path, str(data / f"led{led}.fits"), led=led, night=NIGHT, ccdid=CCD, filtercode=FILTER,
                            detrend=config).path
        for led, paths in by_led.items()
    }  # fmt: skip
    combine_master_flat(leds, str(masters["flat"]), night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=config)
    os.replace(bias.path, masters["bias"])
    return masters


def write_format1(path: Path, quadrants: dict[int, Any]) -> int:
    """The quadrants as format 1 wrote them: Rice-compressed float32 with a fixed step and subtractive dither."""
    import numpy as np
    from astropy.io import fits

    from streamer.formats.masters import quantisation_steps

    hdus: list[Any] = [fits.PrimaryHDU()]
    hdus[0].header["FORMAT"] = 1
    for qid, (data, variance, mask) in sorted(quadrants.items()):
        data_step, variance_step = quantisation_steps(data, variance)
        for name, array, step in ((f"Q{qid}_DATA", data, data_step), (f"Q{qid}_VAR", variance, variance_step)):
            hdus.append(fits.CompImageHDU(array, name=name, compression_type="RICE_1", quantize_level=-step,
                                          quantize_method=1, dither_seed=8191))  # fmt: skip
        hdus.append(fits.CompImageHDU(mask.astype(np.int16), name=f"Q{qid}_MASK", compression_type="RICE_1"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path.stat().st_size


def cpu_ms(call: Callable[[], object], repeat: int) -> float:
    """Median CPU milliseconds of ``call()``."""
    return 1000.0 * median_cpu_seconds(call, repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.masters_read", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ztf-streamer-bench-masters-read")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        print(f"--repeat {args.repeat}: expected a positive number", file=sys.stderr)
        return 2
    args.data.mkdir(parents=True, exist_ok=True)
    masters = ensure_masters(args.data)

    import numpy as np

    from streamer.formats import masters as masterio

    rows = []
    for kind, path in masters.items():
        quadrants = {qid: masterio.read_master(path, qid) for qid in masterio.master_quadrants(path)}
        variants: dict[str, tuple[Path, float]] = {}
        started = time.process_time()
        old = args.data / f"{kind}.format1.fits"
        write_format1(old, quadrants)
        variants["format 1 (Rice floats, dither)"] = (old, time.process_time() - started)
        for label, ratio in (("format 2", masterio.MIN_COMPRESSION_RATIO), ("format 2, every plane compressed", 0.0)):
            target = args.data / f"{kind}.{'compressed' if ratio == 0.0 else 'default'}.fits"
            saved = masterio.MIN_COMPRESSION_RATIO
            masterio.MIN_COMPRESSION_RATIO = ratio
            try:
                started = time.process_time()
                masterio.write_master(target, quadrants, primary_cards={"MKIND": kind})
                variants[label] = (target, time.process_time() - started)
            finally:
                masterio.MIN_COMPRESSION_RATIO = saved
        qids = sorted(quadrants)
        floor = statistics.median(cpu_ms(lambda arrays=quadrants[q]: [np.copy(a) for a in arrays], args.repeat) for q in qids)
        for label, (file, write_s) in variants.items():
            read = statistics.median(cpu_ms(lambda q=q, file=file: masterio.read_master(file, q), args.repeat) for q in qids)
            rows.append((kind, label, read, floor, file.stat().st_size, write_s))

    print(f"## Reading masters (python -m bench.masters_read, full-size quadrants, CPU ms, median of {args.repeat})\n")
    print("| master | format | read ms / quadrant | floor ms (np.copy of the arrays) | read / floor | MB per CCD | write s per CCD |")
    print("|---|---|---|---|---|---|---|")
    for kind, label, read, floor, size, write_s in rows:
        print(f"| {kind} | {label} | {read:.1f} | {floor:.1f} | {read / floor:.2f} | {size / 1e6:.1f} | {write_s:.2f} |")
    by_label: dict[str, float] = defaultdict(float)
    floor_sum = 0.0
    for _, label, read, floor, _, _ in rows:
        by_label[label] += read
        floor_sum += floor if label.startswith("format 1") else 0.0
    print("\nBias + flat of one science quadrant (what a cold file reads):")
    for label, total in by_label.items():
        print(f"- {label}: {total:.1f} ms ({total / floor_sum:.2f} x the floor of {floor_sum:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
