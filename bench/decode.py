"""Decoding a raw science quadrant: astropy against the tile-by-tile RICE decoder, per quadrant.

    python -m bench.decode [--workdir DIR] [--repeat N]

On a full-size simulated raw CCD file (``streamer.sim``: 4 quadrants of 3080 x 3072 uint16 and
their 3080 x 30 overscans, RICE_1, one tile per row), in the same process and the same run:

- astropy: ``fits.open(...)[q].data`` for the quadrant's data HDU and its overscan HDU, what the
  reader did before;
- tiles: ``streamer.formats.raw`` (``RawFile.data`` + ``RawFile.overscan``), the tile decoder:
  one thread, then ``--threads`` threads;
- floor: ``imagecodecs.rcomp_decode`` over the data HDU's tiles from heap bytes already in
  memory (no file read, no header, no checks), one thread.

Each path opens the file once and reads the four quadrants, as a worker does. Prints CPU
milliseconds per quadrant (a file's / 4) of this process (all its threads) and wall milliseconds,
medians over ``--repeat`` rounds, and the ratios astropy / tiles and tiles /
floor. The single-thread paths run pinned to one core; the threaded path may use two.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
from astropy.io import fits

from streamer.formats import rice_tiles
from streamer.formats.raw import open_raw

NIGHT = dt.date(2020, 9, 24)
QIDS = (1, 2, 3, 4)


def prepare(workdir: Path) -> Path:
    """One full-size science raw file of CCD 13 in ``workdir`` (written on first use)."""
    from streamer.sim.generate import generate_night

    raws = sorted((workdir / "raw").rglob("*_o.fits.fz"))
    if not raws:
        generate_night(
            workdir, NIGHT, ccds=(13,), n_exposures=1, flats_per_led=0, n_biases=0, shape="full",
            filters=("zr",), fields=(655,), flat_filters=(), stars_per_quadrant=5000,
        )  # fmt: skip
        raws = sorted((workdir / "raw").rglob("*_o.fits.fz"))
    return raws[0]


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of the process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    function()
    return time.process_time() - cpu, time.perf_counter() - wall


def run_astropy(path: Path) -> None:
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdus:
        for qid in QIDS:
            np.asarray(hdus[qid].data)
            np.asarray(hdus[qid + 4].data)


def run_tiles(path: Path, threads: int) -> None:
    with open_raw(path, decode_threads=threads) as raw:
        for qid in QIDS:
            raw.data(qid)
            raw.overscan(qid)


def floor_inputs(path: Path, qid: int) -> tuple[bytes, list[int], list[int], np.ndarray, int, int]:
    """The data HDU's heap bytes, tile offsets and sizes, an output array, rows per tile, block size."""
    with fits.open(path, disable_image_compression=True) as hdus:
        header = hdus[qid].header
        start = hdus.fileinfo(qid)["datLoc"]
    layout = rice_tiles.rice_layout(header)
    assert layout is not None, "the simulated raw is in the layout of the tile decoder"
    with open(path, "rb") as handle:
        handle.seek(start)
        table = np.frombuffer(handle.read(layout.table_bytes), dtype=layout.descriptor).reshape(-1, 2)
        handle.seek(start + layout.heap_start)
        heap = handle.read(layout.heap_bytes)
    out = np.empty((layout.rows, layout.columns), dtype=layout.stored)
    return heap, table[:, 1].tolist(), table[:, 0].tolist(), out, layout.tile_rows, layout.blocksize


def run_floor(inputs: tuple[bytes, list[int], list[int], np.ndarray, int, int]) -> None:
    heap, offsets, sizes, out, tile_rows, blocksize = inputs
    view = memoryview(heap)
    for i, (offset, size) in enumerate(zip(offsets, sizes, strict=True)):
        imagecodecs.rcomp_decode(view[offset : offset + size], nblock=blocksize, out=out[i * tile_rows : (i + 1) * tile_rows])


def check_identical(path: Path) -> None:
    with fits.open(path) as hdus, open_raw(path) as raw:
        for qid in QIDS:
            assert np.array_equal(raw.data(qid), hdus[qid].data) and raw.data(qid).dtype == hdus[qid].data.dtype
            assert np.array_equal(raw.overscan(qid), hdus[qid + 4].data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the simulated raw file here (reused when present)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of the four quadrants (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the threaded tile decode")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-decode-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = prepare(workdir)
    check_identical(path)
    cores = sorted(os.sched_getaffinity(0))
    floors = {qid: floor_inputs(path, qid) for qid in QIDS}
    times: dict[str, list[tuple[float, float]]] = {"astropy": [], "tiles, 1 thread": [], f"tiles, {args.threads} threads": [], "floor": []}
    for _ in range(args.repeat):  # interleaved, so that the load of a shared machine weighs on each path alike
        os.sched_setaffinity(0, {cores[0]})
        times["astropy"].append(timed(lambda: run_astropy(path)))
        times["tiles, 1 thread"].append(timed(lambda: run_tiles(path, 1)))
        times["floor"].append(timed(lambda: [run_floor(floors[qid]) for qid in QIDS]))
        os.sched_setaffinity(0, set(cores))
        times[f"tiles, {args.threads} threads"].append(timed(lambda: run_tiles(path, args.threads)))
    print(f"file: {path.name} ({path.stat().st_size / 1e6:.1f} MB), {args.repeat} rounds, median, per quadrant = per file / 4")
    print("decoded: data 3080 x 3072 and overscan 3080 x 30 (the floor: data only); tiles == astropy, bit for bit")
    print(f"{'path':<24}{'CPU ms':>10}{'wall ms':>10}")
    median = {name: (statistics.median(c for c, _ in t) * 250, statistics.median(w for _, w in t) * 250) for name, t in times.items()}
    for name, (cpu, wall) in median.items():
        print(f"{name:<24}{cpu:>10.1f}{wall:>10.1f}")
    tiles = median["tiles, 1 thread"][0]
    print(f"astropy / tiles (CPU):  {median['astropy'][0] / tiles:.2f}x")
    print(f"tiles / floor (CPU):    {tiles / median['floor'][0]:.2f}x")
    threaded = median[f"tiles, {args.threads} threads"]
    print(f"{args.threads} threads: wall {median['tiles, 1 thread'][1] / threaded[1]:.2f}x shorter, CPU {threaded[0] / tiles:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
