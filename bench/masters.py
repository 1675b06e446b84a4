"""Benchmark of the masters: time and peak memory of a master bias and of a filter's master flat.

    python -m bench.masters [--data DIR] [--biases 20] [--flats-per-led 7] [--filter zr]

Uses a full-size simulated night in DIR (written by the simulator on first use: one CCD, the
biases and the LED flats of one filter). Each measured build runs in a fresh process, so that its
peak resident memory (``ru_maxrss``) is its own. In the same run it measures the floor of the
masters: decompressing every quadrant and overscan of the same files, once. It prints:

- wall time and peak RSS of ``build_master_bias`` and of the whole filter (``build_led_flat``
  per LED, then ``combine_master_flat``);
- the workers' own split of their time: reading (decompression, row bands), correcting (overscan,
  nonlinearity, bias), combining (sorting network and clipping), masks, writing;
- the ratio combine time / decompression time, from the same run;
- each build's CPU seconds against those of decoding its input frames once with the service's own
  decoder (RICE tile by tile, imagecodecs, one thread), with the targets (1.5x, 1.5 GB);
- the science chain's time per quadrant with these masters (when the night has a science frame);
- the CPU time of the integer range and of the quantisation of one full-size plane, as `write_master`
  runs them for each data and variance plane.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

NIGHT = dt.date(2020, 9, 24)
CCD = 13


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _idle(_: Any) -> dict[str, float]:
    import numpy  # noqa: F401
    from astropy.io import fits  # noqa: F401

    import streamer.work.masters  # noqa: F401

    return {"rss_mb": _peak_rss_mb()}


def _bias_job(args: tuple[list[str], str]) -> dict[str, Any]:
    from streamer.config import DetrendConfig
    from streamer.work.masters import build_master_bias

    paths, out = args
    started, cpu = time.perf_counter(), time.process_time()
    result = build_master_bias(paths, out, night=NIGHT, ccdid=CCD, detrend=DetrendConfig())
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu, "rss_mb": _peak_rss_mb(), "timing": dict(result.timing),
            "n_frames": len(result.frames_used), "bytes": result.n_bytes}


def _flat_job(args: tuple[dict[int, list[str]], str, str, str]) -> dict[str, Any]:
    from streamer.config import DetrendConfig
    from streamer.work.masters import build_led_flat, combine_master_flat

    by_led, bias_path, filtercode, workdir = args
    config = DetrendConfig()
    started, cpu = time.perf_counter(), time.process_time()
    timing: dict[str, float] = defaultdict(float)
    led_paths = {}
    for led, paths in sorted(by_led.items()):
        result = build_led_flat(
            paths, bias_path, os.path.join(workdir, f"led{led}.fits"), led=led, night=NIGHT, ccdid=CCD, filtercode=filtercode, detrend=config
        )
        led_paths[led] = result.path
        for step, seconds in result.timing:
            timing[step] += seconds
    master = combine_master_flat(led_paths, os.path.join(workdir, "flat.fits"), night=NIGHT, ccdid=CCD, filtercode=filtercode, detrend=config)
    for step, seconds in master.timing:
        timing[f"final {step}"] += seconds
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu, "rss_mb": _peak_rss_mb(), "timing": dict(timing),
            "n_frames": sum(len(p) for p in by_led.values()), "bytes": master.n_bytes}


def _science_job(args: tuple[str, str, str]) -> dict[str, Any]:
    """The science chain (detrend_science) on each quadrant of one raw file, 5 times; decoding apart."""
    import statistics

    from streamer.config import DetrendConfig
    from streamer.detrend.calibrate import detrend_science
    from streamer.detrend.nonlinearity import coefficients
    from streamer.formats.masters import read_master
    from streamer.formats.raw import open_raw

    raw_path, bias_path, flat_path = args
    seconds = []
    with open_raw(raw_path) as raw:
        for qid in (1, 2, 3, 4):
            quadrant = raw.quadrant(qid)
            bias, flat = read_master(bias_path, qid), read_master(flat_path, qid)
            for _ in range(5):
                started = time.perf_counter()
                detrend_science(
                    quadrant.data, quadrant.overscan, qid, config=DetrendConfig(),
                    nonlinearity_coefficients=coefficients(NIGHT, CCD, qid), master_bias=bias, master_flat=flat,
                    gain=quadrant.gain or 6.0, read_noise=quadrant.read_noise or 9.0, saturate=58000.0,
                )
                seconds.append(time.perf_counter() - started)
    return {"seconds": statistics.median(seconds), "rss_mb": _peak_rss_mb()}


def _decompress_job(paths: list[str]) -> dict[str, Any]:
    import numpy as np
    from astropy.io import fits

    started = time.perf_counter()
    total = 0.0
    for path in paths:
        with fits.open(path, memmap=False) as hdul:
            for index in range(1, 9):
                total += float(np.asarray(hdul[index].data)[0, 0])
    return {"seconds": time.perf_counter() - started, "rss_mb": _peak_rss_mb()}


def _fast_decompress_job(paths: list[str]) -> dict[str, Any]:
    """CPU seconds to decode every quadrant and overscan of ``paths`` once with the service's own
    decoder (RICE tile by tile, imagecodecs, one thread): the floor of Deliver 4."""
    from streamer.formats.raw import open_raw

    cpu = time.process_time()
    total = 0.0
    for path in paths:
        with open_raw(path) as raw:
            for qid in (1, 2, 3, 4):
                total += float(raw.data(qid)[0, 0]) + float(raw.overscan(qid)[0, 0])
    return {"cpu": time.process_time() - cpu, "rss_mb": _peak_rss_mb()}


def _block_comparison() -> tuple[float, float, float]:
    """Median seconds (of 5) for one block of 10 x 128 x 3072 float32: np.median(axis=0), np.sort,
    and the clipped median (sort included)."""
    import statistics

    import numpy as np

    from streamer.detrend.combine import clipped_median

    block = np.random.default_rng(0).normal(1000.0, 5.0, (10, 128, 3072)).astype(np.float32)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(5):
        for name, call in (("median", lambda: np.median(block, axis=0)), ("sort", lambda: np.sort(block, axis=0)),
                           ("clipped", lambda: clipped_median(block, clip_sigma=3.0))):
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["median"]), statistics.median(times["sort"]), statistics.median(times["clipped"])


def _plane_job(_: None) -> dict[str, Any]:
    """Median CPU seconds (of 7) of the integer range and of the quantisation of one full-size
    flat-like plane (3080 x 3072 float32, NaN and outliers included), as ``write_master`` runs
    them for each data and variance plane (in a process set up as a worker)."""
    import statistics

    import numpy as np

    from streamer.formats import masters

    rng = np.random.default_rng(1)
    plane = rng.normal(1.0, 0.02, (3080, 3072)).astype(np.float32)
    plane[rng.integers(0, 3080, 300), rng.integers(0, 3072, 300)] = rng.normal(0.0, 1e4, 300)
    plane[5] = np.nan
    step, _ = masters.quantisation_steps(plane, np.full_like(plane, 4e-4))
    type_name, base = masters._integer_range(plane, step)
    integers = np.empty(plane.size, dtype=masters._INTEGER_TYPES[type_name])
    found = np.empty(plane.size, dtype=np.int64)
    top = int(np.iinfo(integers.dtype).max)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(7):
        for name, call in (("range", lambda: masters._integer_range(plane, step)),
                           ("quantise", lambda: masters._quantise(plane.reshape(-1), step, base, top, integers, found))):
            started = time.process_time()
            call()
            times[name].append(time.process_time() - started)
    return {"range": statistics.median(times["range"]), "quantise": statistics.median(times["quantise"])}


def _in_fresh_process(function: Any, argument: Any) -> dict[str, Any]:
    from streamer.execution.local import worker_initializer

    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1, initializer=worker_initializer) as pool:  # set up as the service's workers
        result: dict[str, Any] = pool.apply(function, (argument,))
    return result


def ensure_data(data: Path, n_biases: int, flats_per_led: int, filtercode: str) -> None:
    if (data / "truth" / "params.json").exists():
        return
    from streamer.sim.generate import generate_night

    print(f"writing a full-size simulated night into {data} (a few minutes)...", flush=True)
    generate_night(
        data, NIGHT, ccds=(CCD,), n_exposures=1, flats_per_led=flats_per_led, n_biases=n_biases, shape="full", seed=1,
        filters=(filtercode,), flat_filters=(filtercode,), jobs=max(1, min(2, os.cpu_count() or 1)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.masters", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ztf-streamer-bench-masters")
    parser.add_argument("--biases", type=int, default=20)
    parser.add_argument("--flats-per-led", type=int, default=7)
    parser.add_argument("--filter", default="zr", choices=("zg", "zr", "zi"))
    args = parser.parse_args(argv)
    ensure_data(args.data, args.biases, args.flats_per_led, args.filter)

    from astropy.io import fits

    raws = sorted(str(p) for p in args.data.glob("raw/**/*.fits.fz"))
    biases = [p for p in raws if p.endswith("_b.fits.fz")]
    by_led: dict[int, list[str]] = defaultdict(list)
    for path in raws:
        if path.endswith("_f.fits.fz") and f"_{args.filter}_" in os.path.basename(path):
            by_led[int(fits.getheader(path, 0)["ILUM_LED"])].append(path)
    if not biases or not by_led:
        print(f"{args.data}: no biases or no {args.filter} flats", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="bench-masters-") as workdir:
        from streamer.config import DetrendConfig

        # the service leaves out the first biases of a night when it plans the master (service.graph)
        skip = DetrendConfig().bias_skip_first
        used_biases = sorted(biases, key=os.path.basename)[skip:]
        if not used_biases:
            print(f"{args.data}: {len(biases)} biases, and the service leaves out the first {skip}: "
                  f"expected more than {skip} (--biases, on a new --data)", file=sys.stderr)  # fmt: skip
            return 2
        idle = _in_fresh_process(_idle, None)
        bias = _in_fresh_process(_bias_job, (used_biases, os.path.join(workdir, "bias.fits")))
        flat = _in_fresh_process(_flat_job, (dict(by_led), os.path.join(workdir, "bias.fits"), args.filter, workdir))
        floor_bias = _in_fresh_process(_decompress_job, used_biases)
        flat_inputs = [p for paths in by_led.values() for p in paths]
        floor_flat = _in_fresh_process(_decompress_job, flat_inputs)
        fast_bias = _in_fresh_process(_fast_decompress_job, used_biases)
        fast_flat = _in_fresh_process(_fast_decompress_job, flat_inputs)
        science = [p for p in raws if p.endswith("_o.fits.fz") and f"_{args.filter}_" in os.path.basename(p)]
        chain = (
            _in_fresh_process(_science_job, (science[0], os.path.join(workdir, "bias.fits"), os.path.join(workdir, "flat.fits")))
            if science
            else None
        )

    print(f"## Masters (python -m bench.masters, {os.cpu_count()} cores, one process per build)\n")
    print(f"Idle worker process (imports only): {idle['rss_mb']:.0f} MB peak RSS.\n")
    print("| build | frames | wall s | peak RSS MB | decompress floor s | combine s | combine / decompress | file MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run, floor in (("master bias", bias, floor_bias), (f"master flat {args.filter} ({len(by_led)} LEDs)", flat, floor_flat)):
        combine = run["timing"].get("combine", 0.0)
        print(
            f"| {name} | {run['n_frames']} | {run['seconds']:.1f} | {run['rss_mb']:.0f} | {floor['seconds']:.1f} | "
            f"{combine:.1f} | {combine / floor['seconds']:.2f} | {run['bytes'] / 1e6:.1f} |"
        )
    print()
    print("\nAgainst the fast decoder (CPU seconds; targets: build / decode <= 1.5, peak RSS <= 1500 MB):\n")
    print("| build | frames | build CPU s | fast decode CPU s | build / decode | per frame: build s, decode s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name, run, fast in (("master bias", bias, fast_bias), (f"master flat {args.filter} ({len(by_led)} LEDs)", flat, fast_flat)):
        n = run["n_frames"]
        print(
            f"| {name} | {n} | {run['cpu']:.1f} | {fast['cpu']:.1f} | {run['cpu'] / fast['cpu']:.2f} | "
            f"{run['cpu'] / n:.2f}, {fast['cpu'] / n:.2f} | {run['rss_mb']:.0f} |"
        )
    print()
    for name, run in (("master bias", bias), ("master flat", flat)):
        split = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in sorted(run["timing"].items()))
        print(f"- {name}, the worker's own split: {split}")
    median_s, sort_s, clipped_s = _block_comparison()
    planes = _in_fresh_process(_plane_job, None)
    print(
        f"- one block of 10 x 128 x 3072 float32: np.median(axis=0) {1000 * median_s:.0f} ms, np.sort(axis=0) "
        f"{1000 * sort_s:.0f} ms, clipped median with variance {1000 * clipped_s:.0f} ms"
    )
    print(f"- one plane of 3080 x 3072 float32, as each master plane is written: the integer range {1000 * planes['range']:.1f} ms, "
          f"the quantisation {1000 * planes['quantise']:.1f} ms (CPU)")  # fmt: skip
    if chain is not None:
        print(f"- science chain (detrend_science: overscan to mask, decoding apart), median per full quadrant: {1000 * chain['seconds']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
