"""Per-quadrant cost of the science path: ours against a field user's baseline and against the floor.

    python -m bench.photometry [--workdir DIR] [--repeat N]

On one core (thread pools pinned to 1), with the allocator set as in the service's workers
(``streamer.execution.local.keep_freed_memory``), on a full-size simulated raw CCD file (4
quadrants of 3080 x 3072, about 5000 catalogue sources per quadrant, 10 radii):

- ours: ``streamer.work.exposure.process_exposure`` (decompress, detrend, masks, background,
  photometry, isolation, apcat write; the IPAC masks as the fetcher stores them, tile-compressed
  by ``compress_mask``), per quadrant = per file / 4; "cold" is the first file of a CCD in a
  worker that has already run a file (masters read from disk, in the page cache), "warm" a further
  file of the same CCD (masters from the worker's cache), "first file of the process" the cold
  file of a fresh process (also loading the compiled kernels and the lazy imports, once per worker);
- baseline: the same science written the way a user of the field would: astropy reading into
  float64, readout flips with copies, ccdproc arithmetic with uncertainties, photutils apertures
  radius by radius (exact overlap), astropy isolation, masters and IPAC mask read for each file;
  it computes no per-radius mask flags (which would cost it a second photutils pass), so its
  time is a lower bound for the same science;
- floor: the calls no implementation can avoid on the same data: decompressing the file (RICE
  tile by tile, imagecodecs), one ``sep.Background`` per quadrant, one ``sep.sum_circle`` of the
  same sources and radii;
- aperture sums alone: ``streamer.photometry_kernels.sum_circles`` (every radius of a source in one
  pass, with variance and the rejected pixels' overlap) against the floor's ``sep.sum_circle`` of
  the same positions and radii (with variance), on the same images.

Prints the times and the ratios (baseline / ours, ours / floor) measured in this run, in CPU
seconds of the (single-threaded, pinned) process by default, so that other processes on a shared
machine do not distort them; ``--clock wall`` for elapsed time.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import sep  # noqa: E402
from astropy.io import fits  # noqa: E402

from streamer import photometry_kernels  # noqa: E402
from streamer.archive.transfer import compress_mask  # noqa: E402
from streamer.config import DetrendConfig, PhotometryConfig  # noqa: E402
from streamer.detrend.calibrate import MasterQuadrant  # noqa: E402
from streamer.detrend.nonlinearity import coefficients  # noqa: E402
from streamer.detrend.readout import from_readout, to_readout  # noqa: E402
from streamer.execution.local import keep_freed_memory  # noqa: E402
from streamer.formats import masters as masterio  # noqa: E402
from streamer.formats import refcat  # noqa: E402
from streamer.formats.raw import open_raw  # noqa: E402
from streamer.storage.naming import RawName, parse_filename  # noqa: E402
from streamer.storage.paths import mask_relpath  # noqa: E402
from streamer.work import exposure as work  # noqa: E402

NIGHT = dt.date(2020, 9, 24)
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]
STARS_PER_QUADRANT = 5000
QIDS = (1, 2, 3, 4)


def prepare(workdir: Path) -> dict[str, Any]:
    """Two full-size science files of CCD 13 and masters (truth plus realistic noise) in ``workdir``."""
    from streamer.sim.generate import generate_night

    marker = workdir / "READY"
    if not marker.exists():
        generate_night(
            workdir, NIGHT, ccds=(13,), n_exposures=2, flats_per_led=0, n_biases=0, shape="full",
            filters=("zr",), fields=(655,), flat_filters=(), stars_per_quadrant=STARS_PER_QUADRANT,
        )  # fmt: skip
        rng = np.random.default_rng(7)
        for kind, truth_file, noise in (("bias", "bias_c13.fits", 0.5), ("flat", "flat_zr_c13.fits", 0.002)):
            quadrants = {}
            with fits.open(workdir / "truth" / truth_file) as hdus:
                for qid in QIDS:
                    data = np.asarray(hdus[qid].data, dtype=np.float32)
                    data = data + rng.normal(0.0, noise, data.shape).astype(np.float32)
                    variance = np.full(data.shape, noise**2, np.float32) * rng.uniform(0.8, 1.2, data.shape).astype(np.float32)
                    quadrants[qid] = MasterQuadrant(data, variance, np.zeros(data.shape, np.uint16))
            (workdir / "masters").mkdir(exist_ok=True)
            masterio.write_master(
                workdir / "masters" / f"{kind}.fits", quadrants,
                primary_cards={"MKIND": kind, "NIGHT": NIGHT.isoformat(), "CCD_ID": 13},
            )  # fmt: skip
        shutil.rmtree(workdir / "truth")  # the truth images are large and not needed here
        marker.touch()
    raws = sorted((workdir / "raw").rglob("*_o.fits.fz"))
    files = []
    for raw in raws:
        name = parse_filename(raw.name)
        assert isinstance(name, RawName)
        relpaths = {q: name.sci(q, "mskimg.fits").relpath for q in QIDS}
        masks = {q: workdir / relpaths[q] for q in QIDS}
        stored = {q: workdir / mask_relpath(relpaths[q]) for q in QIDS}
        for q in QIDS:
            if not stored[q].exists():
                compress_mask(masks[q], stored[q])  # as the fetcher stores it
        headers = {q: workdir / name.sci(q, "sciimg.fits").relpath for q in QIDS}
        files.append({"raw": raw, "name": name, "headers": headers, "masks": masks, "stored_masks": stored})
    return {"workdir": workdir, "files": files, "bias": workdir / "masters" / "bias.fits", "flat": workdir / "masters" / "flat.fits"}


def run_ours(data: dict[str, Any], file: dict[str, Any], root: Path) -> work.ExposureResult:
    return work.process_exposure(
        file["raw"],
        master_bias_path=data["bias"],
        master_flat_path=data["flat"],
        sciimg_header_paths=file["headers"],
        mask_paths=file["stored_masks"],
        catalog_dir=data["workdir"] / "refcat",
        storage_root=root,
        detrend_config=DetrendConfig(),
        photometry_config=PhotometryConfig(catalog_dir=data["workdir"] / "refcat"),
        provenance={"bench": True},
    )


def run_floor(file: dict[str, Any], positions: dict[int, tuple[np.ndarray, np.ndarray]], radii: tuple[float, ...]) -> float:
    """Seconds for the unavoidable calls of one file: decompress all HDUs (RICE by tile), per quadrant
    one background and one sum."""
    images = {}
    start = clock()
    with open_raw(file["raw"]) as raw:
        arrays = [raw.data(q) for q in QIDS] + [raw.overscan(q) for q in QIDS]
    elapsed = clock() - start
    for qid in QIDS:
        images[qid] = arrays[qid - 1].astype(np.float32) - np.float32(1000.0)
    variance = np.full(images[1].shape, 60.0, np.float32)
    rejected = np.zeros(images[1].shape, bool)
    radii_arr = np.asarray(radii)
    for qid in QIDS:
        x, y = positions[qid]
        start = clock()
        sep.Background(images[qid], mask=rejected, bw=192, bh=220)
        sep.sum_circle(images[qid], np.repeat(x, len(radii)), np.repeat(y, len(radii)), np.tile(radii_arr, x.size), var=variance, subpix=0)
        elapsed += clock() - start
    return elapsed


def run_apertures(file: dict[str, Any], positions: dict[int, tuple[np.ndarray, np.ndarray]], radii: tuple[float, ...]) -> tuple[float, float]:
    """Seconds per file of the aperture sums alone: (the one-pass kernel with variance and masked
    areas, ``sep.sum_circle`` of every source and radius with variance) on the same images."""
    with open_raw(file["raw"]) as raw:
        images = {q: raw.data(q).astype(np.float32) - np.float32(1000.0) for q in QIDS}
    variance = np.full(images[1].shape, 60.0, np.float32)
    rejected = np.random.default_rng(3).random(images[1].shape) < 1e-3
    radii_arr = np.asarray(radii)
    kernel = floor = 0.0
    for qid in QIDS:
        x, y = positions[qid]
        start = clock()
        photometry_kernels.sum_circles(images[qid], variance, rejected, x, y, radii_arr)
        middle = clock()
        sep.sum_circle(images[qid], np.repeat(x, len(radii)), np.repeat(y, len(radii)), np.tile(radii_arr, x.size), var=variance, subpix=0)
        kernel, floor = kernel + middle - start, floor + clock() - middle
    return kernel, floor


def run_baseline(data: dict[str, Any], file: dict[str, Any], root: Path, radii: tuple[float, ...]) -> float:
    """Seconds for the same science written with the field's usual tools (see the module docstring)."""
    import astropy.units as u
    import ccdproc
    from astropy.coordinates import SkyCoord
    from astropy.nddata import CCDData, StdDevUncertainty
    from astropy.stats import sigma_clip
    from astropy.wcs import WCS, FITSFixedWarning
    from photutils.aperture import CircularAperture, aperture_photometry

    start = clock()
    name: RawName = file["name"]
    rows_out = []
    with fits.open(file["raw"]) as hdus:
        obsjd = float(hdus[0].header["OBSJD"])
        for qid in QIDS:
            raw = hdus[qid].data.astype(np.float64)
            overscan = hdus[qid + 4].data.astype(np.float64)
            gain, read_noise = float(hdus[qid].header["GAIN"]), float(hdus[qid].header["READNOI"])
            readout = to_readout(raw, qid).copy()
            overscan_readout = to_readout(overscan, qid).copy()
            levels = np.median(overscan_readout[:, 5:25], axis=1)
            clipped = sigma_clip(levels, sigma=3)
            rows = np.arange(levels.size)
            fit = np.polynomial.polynomial.polyfit(rows[~clipped.mask], levels[~clipped.mask], 3)
            readout = readout - np.polynomial.polynomial.polyval(rows, fit)[:, None]
            a, b = coefficients(NIGHT, name.ccdid, qid)
            readout = readout / (a * readout**2 + b * readout + 1)
            image = from_readout(readout, qid).copy()
            master_bias, master_flat = masterio.read_master(data["bias"], qid), masterio.read_master(data["flat"], qid)
            bias = CCDData(
                master_bias.data.astype(np.float64), unit="adu",
                uncertainty=StdDevUncertainty(np.sqrt(master_bias.variance.astype(np.float64))),
            )  # fmt: skip
            flat = CCDData(
                master_flat.data.astype(np.float64), unit="adu",
                uncertainty=StdDevUncertainty(np.sqrt(master_flat.variance.astype(np.float64))),
            )  # fmt: skip
            ccd = CCDData(image, unit="adu", uncertainty=StdDevUncertainty(np.sqrt(np.maximum(image, 0) / gain + (read_noise / gain) ** 2)))
            ccd = ccdproc.subtract_bias(ccd, bias)
            ccd = ccdproc.flat_correct(ccd, flat, norm_value=1.0)
            ipac = fits.getdata(file["masks"][qid])
            rejected = (ipac & 6141) != 0
            header = fits.getheader(file["headers"][qid])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                wcs = WCS(header)
            pixels = refcat.pixels_touching(wcs, image.shape, 22.0)
            tables = [pq.read_table(data["workdir"] / "refcat" / refcat.refcat_filename(p)) for p in pixels if (data["workdir"] / "refcat" / refcat.refcat_filename(p)).exists()]
            joined = pa.concat_tables(tables)
            cat = {column: joined.column(column).to_numpy() for column in joined.column_names}
            years = (obsjd - 2457389.0) / 365.25
            dec = cat["dec"] + cat["pmdec"] * years / 3.6e6
            ra = cat["ra"] + cat["pmra"] * years / 3.6e6 / np.cos(np.radians(cat["dec"]))
            coords = SkyCoord(ra * u.deg, dec * u.deg)
            first, second, _, _ = coords.search_around_sky(coords, 20 * u.arcsec)
            counts = np.bincount(first[first != second], minlength=ra.size)
            x, y = wcs.all_world2pix(ra, dec, 0)
            on = (x > -0.5) & (x < image.shape[1] - 0.5) & (y > -0.5) & (y < image.shape[0] - 0.5)
            positions = np.column_stack([x[on], y[on]])
            science = np.ascontiguousarray(ccd.data, dtype=np.float32)
            source_mask = np.zeros(science.shape, bool)
            sep.mask_ellipse(source_mask, positions[:, 0], positions[:, 1], max(radii), max(radii), 0.0)
            background = sep.Background(science, mask=rejected | source_mask, bw=192, bh=220)
            subtracted = ccd.data - background.back()
            apertures = [CircularAperture(positions, r=r) for r in radii]
            phot = aperture_photometry(subtracted, apertures, error=ccd.uncertainty.array, method="exact")
            columns = {"source_id": cat["source_id"][on], "x": positions[:, 0], "y": positions[:, 1],
                       "isolated": counts[on] == 0, "qid": np.full(int(on.sum()), qid)}  # fmt: skip
            for k in range(len(radii)):
                columns[f"f_{k}"] = np.asarray(phot[f"aperture_sum_{k}"])
                columns[f"f_{k}_e"] = np.asarray(phot[f"aperture_sum_err_{k}"])
            rows_out.append(pa.table(columns))
    out = root / "baseline" / f"{file['raw'].name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(rows_out), out)
    return clock() - start


def compare_with_baseline(ours: pa.Table, baseline: pa.Table) -> float:
    """Median relative difference of the largest-radius sums of unflagged S/N > 100 sources found by both."""
    key = {(int(q), int(s)): i for i, (q, s) in enumerate(zip(baseline["qid"].to_numpy(), baseline["source_id"].to_numpy(), strict=True))}
    index = np.array([key.get((int(q), int(s)), -1) for q, s in zip(ours["qid"].to_numpy(), ours["source_id"].to_numpy(), strict=True)])
    last = len([c for c in ours.column_names if c.startswith("r_")]) - 1
    snr = ours[f"f_{last}"].to_numpy() / ours[f"f_{last}_e"].to_numpy()
    usable = (index >= 0) & (ours[f"f_{last}_f"].to_numpy() == 0) & (snr > 100)
    mine = ours[f"f_{last}"].to_numpy()[usable]
    theirs = baseline[f"f_{last}"].to_numpy()[index[usable]]
    return float(np.median(np.abs(mine / theirs - 1)))


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = clock()
    value = function()
    return clock() - start, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.photometry", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the simulated data here (reused when present)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of each path (median reported)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu",
        help="cpu: this process's CPU seconds (steady on a shared machine; the default); wall: elapsed seconds",
    )  # fmt: skip
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    keep_freed_memory()  # as the service's workers do (streamer.execution.local.worker_initializer)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-photometry-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"data: {workdir} (one core, {args.repeat} repetitions, median, {args.clock} seconds)")
    data = prepare(workdir)
    first, second = data["files"][:2]
    radii = PhotometryConfig(catalog_dir=workdir).radii
    with tempfile.TemporaryDirectory(prefix="bench-out-") as tmp:
        root = Path(tmp)
        work.clear_master_cache()
        first_of_process, result = timed(lambda: run_ours(data, first, root / "first"))
        table = pq.read_table(result.apcat_path)
        qid = table["qid"].to_numpy()
        positions = {q: (table["x"].to_numpy()[qid == q], table["y"].to_numpy()[qid == q]) for q in QIDS}
        # Interleaved, so that the load of a shared machine weighs on each path alike.
        warm_times, cold_times, floor_times, baseline_times, kernel_times, sum_circle_times = [], [], [], [], [], []
        for i in range(args.repeat):
            work.clear_master_cache()
            seconds, _ = timed(lambda: run_ours(data, second, root / f"cold{i}"))  # noqa: B023 (called at once)
            cold_times.append(seconds)
            seconds, result = timed(lambda: run_ours(data, second, root / f"warm{i}"))  # noqa: B023 (called at once)
            warm_times.append(seconds)
            floor_times.append(run_floor(second, positions, radii))
            kernel_seconds, sum_circle_seconds = run_apertures(second, positions, radii)
            kernel_times.append(kernel_seconds)
            sum_circle_times.append(sum_circle_seconds)
            if i < max(1, args.repeat // 2):
                baseline_times.append(run_baseline(data, second, root, radii))
        warm, cold, floor, baseline = (statistics.median(t) for t in (warm_times, cold_times, floor_times, baseline_times))
        agreement = compare_with_baseline(pq.read_table(result.apcat_path), pq.read_table(root / "baseline" / f"{second['raw'].name}.parquet"))
        floor_ratio = statistics.median(w / f for w, f in zip(warm_times, floor_times, strict=True))
        cold_ratio = statistics.median(c / w for c, w in zip(cold_times, warm_times, strict=True))
    sources = dict(result.rows)
    print(f"sources per quadrant: {', '.join(f'q{q} {n}' for q, n in sorted(sources.items()))}; radii: {len(radii)}")
    print(f"{'path':<34}{'s / quadrant':>14}")
    for label, seconds in (
        ("ours, warm (masters cached)", warm), ("ours, cold (masters read)", cold),
        ("ours, first file of the process", first_of_process), ("floor", floor), ("baseline", baseline),
    ):  # fmt: skip
        print(f"{label:<34}{seconds / 4:>14.3f}")
    print(f"same science: median |ours / baseline - 1| of f_9 = {agreement:.2e} (unflagged, S/N > 100)")
    print(f"baseline / ours (warm): {baseline / warm:.2f}x   (target >= 3)")
    print(f"baseline / ours (cold): {baseline / cold:.2f}x")
    print(f"ours (warm) / floor:    {floor_ratio:.2f}x   (target <= 1.1; median of interleaved pairs)")
    print(f"ours (cold) / warm:     {cold_ratio:.2f}x   (target <= 1.3; median of interleaved pairs)")
    print(f"ours (cold) / floor:    {cold / floor:.2f}x")
    kernel, sum_circle = statistics.median(kernel_times), statistics.median(sum_circle_times)
    print(f"aperture sums alone, s / quadrant: kernel {kernel / 4:.3f} (all radii in one pass, variance, masked areas), "
          f"sep.sum_circle {sum_circle / 4:.3f} (the floor's call, variance)")  # fmt: skip
    print(f"kernel / sep.sum_circle: {statistics.median(k / f for k, f in zip(kernel_times, sum_circle_times, strict=True)):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
