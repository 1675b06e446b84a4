"""The pocket effect on a simulated night: flux / true against magnitude at r = 3 px, correction off and on.

    python -m bench.pocket_night [--exposures N] [--stars N] [--out DIR] [--png PATH]

Writes two nights of CCD 6 (the strongest pocket of the v0.1 table, cmax about 1700 ADU) with the
same seed, small frames (260 x 256 quadrants): one without the pocket (the twin) and one with the
v0.1 pocket injected. Builds the masters (bias, zg flat) and the catalogues with the work functions
themselves (no service), with ``[detrend] pocket = "off"`` and ``"v0.1"`` on the pocket night and
"off" on the twin, and prints

- the median flux / true (simulator truth) at r = 3 px of isolated unflagged stars, in bins of
  instrumental magnitude ``-2.5 log10(true ADU)``, for the three runs, and the median ratio to the
  twin (same photon and read noise: the pocket alone);
- for the stars of true S/N > 100, the median flux / aperture truth by magnitude bin and by third
  of the row, and the median flux / the twin's flux of the same star by magnitude bin, with the
  trend of each from the faintest to the brightest bin (the paired ratio cancels the photon and
  read noise, so it measures what the pocket and its correction do to the trend far more
  precisely than the ratio to the truth);
- the raw overscan level (readout columns 0-4 and 5-24, the ones the overscan model uses) of the
  pocket night less the twin's, in rows with a bright star (true > 10^4 ADU) read within the last
  16 data columns of its row, and in the other rows;
- the overscan level the pipeline fits (``calibrate.fit_overscan``: its per-row medians and its
  model), pocket night less twin, with the pocket left uncorrected and with the correction (which
  refits the level from the corrected overscan), in the same two sets of rows.

and draws both in a PNG (matplotlib, the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import sep
from astropy.io import fits

from streamer.config import DetrendConfig, PhotometryConfig
from streamer.detrend import nonlinearity
from streamer.detrend.calibrate import fit_overscan, pocket_step
from streamer.detrend.readout import to_readout
from streamer.formats.raw import open_raw
from streamer.sim import sky
from streamer.sim.generate import NightTruth, generate_night
from streamer.sim.geometry import PIXEL_SCALE_ARCSEC
from streamer.work.exposure import process_exposure
from streamer.work.masters import build_master_bias, build_master_flat

NIGHT = dt.date(2020, 9, 24)
CCD = 6
FILTER = "zg"
BRIGHT_ADU = 1e4
LAST_COLUMNS = 16
MIN_SNR = 20.0
TREND_SNR = 100.0
TREND_MIN_STARS = 20
BINS = np.arange(-11.0, -6.5, 0.5)  # instrumental magnitude; fainter stars pass the S/N cut only when something else adds to them


def _night(out: Path, pocket: str, exposures: int, stars: int | None) -> NightTruth:
    return generate_night(
        out, NIGHT, ccds=(CCD,), n_exposures=exposures, flats_per_led=3, n_biases=6, seed=11, shape="small",
        filters=(FILTER,), flat_filters=(FILTER,), stars_per_quadrant=stars, pocket=pocket,
    )  # fmt: skip


def _catalogues(night: NightTruth, work: Path, detrend: DetrendConfig) -> list[Path]:
    """The apcat files of the night's science exposures, made with ``detrend``."""
    work.mkdir(parents=True)
    raws = sorted(night.out.glob("raw/**/*.fits.fz"))
    biases = [str(p) for p in raws if p.name.endswith("_b.fits.fz")]
    by_led: dict[int, list[str]] = defaultdict(list)
    for path in (p for p in raws if p.name.endswith("_f.fits.fz")):
        by_led[int(fits.getheader(path, 0)["ILUM_LED"])].append(str(path))
    bias = build_master_bias(biases, str(work / "bias.fits"), night=NIGHT, ccdid=CCD, detrend=detrend)
    flat = build_master_flat(by_led, bias.path, str(work / "flat.fits"), night=NIGHT, ccdid=CCD, filtercode=FILTER, detrend=detrend)
    paths = []
    for exposure in (e for e in night.exposures if e.imgtype == "object"):
        name = exposure.raw_name(CCD)
        result = process_exposure(
            night.out / name.relpath, master_bias_path=bias.path, master_flat_path=flat.path,
            sciimg_header_paths={q: night.out / name.sci(q, "sciimg.fits").relpath for q in (1, 2, 3, 4)},
            mask_paths={q: night.out / name.sci(q, "mskimg.fits").relpath for q in (1, 2, 3, 4)},
            catalog_dir=night.out / "refcat", storage_root=work, detrend_config=detrend,
            photometry_config=PhotometryConfig(catalog_dir=night.out / "refcat"), provenance={"config_hash": "bench"},
        )  # fmt: skip
        paths.append(Path(result.apcat_path))
    return paths


def _aperture_fraction(x: float, y: float, sigma: float, radius: float) -> float:
    """The share of a unit star that an exact-overlap circle of ``radius`` at its centre holds: the simulator's
    own pixel-integrated Gaussian, rendered without noise, summed by sep (not the service's kernel)."""
    half = sky.STAMP_HALF_WIDTH + 4
    stamp = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float32)
    fx, fy = x - math.floor(x) + half, y - math.floor(y) + half
    sky.render_stars(stamp, np.array([fx]), np.array([fy]), np.array([1.0]), sigma)
    total, _error, _flag = sep.sum_circle(stamp.astype(np.float64), [fx], [fy], radius, subpix=0)
    return float(total[0])


def _rows(paths: list[Path], truth: NightTruth) -> dict[tuple[int, int, int], dict[str, Any]]:
    """Isolated unflagged stars with S/N > ``MIN_SNR`` at the first radius, with their truth: ``true`` (total
    flux), ``expected`` (what the aperture holds of it without noise) and ``column`` (its readout column)."""
    stars = {(int(r["filefracday"]), r["qid"], r["source_id"]): r for r in truth.stars.to_pylist()}
    to_sigma = 1.0 / PIXEL_SCALE_ARCSEC / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    sigma = {int(e.filefracday): float(e.seeing_fwhm_arcsec or 0.0) * to_sigma for e in truth.exposures if e.imgtype == "object"}
    columns = int(truth.params["shape"]["cols"])
    rows = {}
    for path in paths:
        for row in pq.read_table(path).to_pylist():
            key = (row["filefracday"], row["qid"], row["source_id"])
            if row["isolated"] and row["f_0_f"] == 0 and row["f_0"] > MIN_SNR * row["f_0_e"]:
                star = stars[key]
                fraction = _aperture_fraction(star["x"], star["y"], sigma[key[0]], float(row["r_0"]))
                column = star["x"] if key[1] in (1, 4) else columns - 1 - star["x"]
                rows[key] = row | {"true": star["flux"], "expected": star["flux"] * fraction, "column": column}
    return rows


def _trend(runs: dict[str, dict[tuple[int, int, int], dict[str, Any]]], reference: dict[tuple[int, int, int], dict[str, Any]]) -> dict[str, Any]:
    """Median flux / aperture truth of the stars with S/N > ``TREND_SNR`` (truth over the twin's error) in every run, by
    magnitude bin and by third of the row (readout order), with the error of each median."""
    # chosen by the S/N of the aperture truth, not of the measured flux, which would favour stars whose noise came out high
    keys = [k for k, r in reference.items() if r["expected"] > TREND_SNR * r["f_0_e"] and all(k in run for run in runs.values())]

    def median_and_error(ratio: np.ndarray) -> tuple[float, float]:
        return float(np.median(ratio)), float(1.2533 * np.std(ratio) / math.sqrt(len(ratio)))

    def median(run: dict[tuple[int, int, int], dict[str, Any]], chosen: list[tuple[int, int, int]]) -> tuple[float, float]:
        return median_and_error(np.array([run[k]["f_0"] / run[k]["expected"] for k in chosen]))

    def to_twin(run: dict[tuple[int, int, int], dict[str, Any]], chosen: list[tuple[int, int, int]]) -> tuple[float, float]:
        return median_and_error(np.array([run[k]["f_0"] / reference[k]["f_0"] for k in chosen]))

    by_magnitude = []
    paired = []
    for low, high in zip(BINS[:-1], BINS[1:], strict=True):
        chosen = [k for k in keys if low <= -2.5 * np.log10(reference[k]["true"]) < high]
        if len(chosen) >= TREND_MIN_STARS:
            by_magnitude.append(((low + high) / 2, len(chosen), {name: median(run, chosen) for name, run in runs.items()}))
            paired.append(((low + high) / 2, len(chosen), {name: to_twin(run, chosen) for name, run in runs.items() if run is not reference}))
    columns = max(reference[k]["column"] for k in keys) + 1 if keys else 1
    by_column = []
    for third in range(3):
        chosen = [k for k in keys if third * columns / 3 <= reference[k]["column"] < (third + 1) * columns / 3]
        if chosen:
            by_column.append((third, len(chosen), {name: median(run, chosen) for name, run in runs.items()}))
    return {"stars": len(keys), "by_magnitude": by_magnitude, "paired": paired, "by_column": by_column}


def _print_trend(trend: dict[str, Any], names: list[str]) -> None:
    print(f"\nflux / aperture truth at r = 3 px, true S/N > {TREND_SNR:g} ({trend['stars']} stars; bins of >= {TREND_MIN_STARS}):")
    print("magnitude bin centre | " + " | ".join(names) + " | stars")
    for centre, count, medians in trend["by_magnitude"]:
        print(f"{centre:.2f} | " + " | ".join(f"{medians[n][0]:.4f} +- {medians[n][1]:.4f}" for n in names) + f" | {count}")
    if len(trend["by_magnitude"]) >= 2:
        first, last = trend["by_magnitude"][0][2], trend["by_magnitude"][-1][2]
        print("trend, brightest bin less faintest: " + ", ".join(
            f"{n} {100 * (first[n][0] - last[n][0]):+.2f} % +- {100 * math.hypot(first[n][1], last[n][1]):.2f}" for n in names))
    if len(trend["paired"]) >= 2:
        # the same stars with the same photon and read noise: what the pocket (and its correction) alone does
        paired_names = list(trend["paired"][0][2])
        print("median flux / the twin's flux of the same star | " + " | ".join(paired_names) + " | stars")
        for centre, count, medians in trend["paired"]:
            print(f"{centre:.2f} | " + " | ".join(f"{medians[n][0]:.5f} +- {medians[n][1]:.5f}" for n in paired_names) + f" | {count}")
        first, last = trend["paired"][0][2], trend["paired"][-1][2]
        print("trend of the ratio to the twin, brightest bin less faintest: " + ", ".join(
            f"{n} {100 * (first[n][0] - last[n][0]):+.3f} % +- {100 * math.hypot(first[n][1], last[n][1]):.3f}" for n in paired_names))
    print("third of the row (readout order) | " + " | ".join(names) + " | stars")
    for third, count, medians in trend["by_column"]:
        print(f"{('first', 'middle', 'last')[third]} | " + " | ".join(f"{medians[n][0]:.4f} +- {medians[n][1]:.4f}" for n in names) + f" | {count}")


def _bright_rows(stars: list[dict[str, Any]], filefracday: str, qid: int, rows: int, columns: int) -> np.ndarray:
    """Stored rows holding a star brighter than ``BRIGHT_ADU`` within the last ``LAST_COLUMNS`` data columns read."""
    bright = np.zeros(rows, dtype=bool)
    for star in stars:
        if star["filefracday"] == filefracday and star["qid"] == qid and star["flux"] > BRIGHT_ADU:
            column = star["x"] if qid in (1, 4) else columns - 1 - star["x"]
            if column >= columns - LAST_COLUMNS:
                y = int(round(star["y"]))
                bright[max(0, y - 2) : y + 3] = True
    return bright


def _fitted_levels(pocket: NightTruth, twin: NightTruth) -> dict[str, list[float]]:
    """The overscan level fitted by the pipeline, pocket night less twin (ADU): per-row medians and
    model, correction "off" and "v0.1", in bright rows (see :func:`_bright_rows`) and the others."""
    detrend = DetrendConfig()
    found: dict[str, list[float]] = defaultdict(list)
    stars = pocket.stars.to_pylist()
    for exposure in (e for e in pocket.exposures if e.imgtype == "object"):
        relpath = exposure.raw_name(CCD).relpath
        with open_raw(pocket.out / relpath) as raw, open_raw(twin.out / relpath) as clean:
            for qid in (1, 2, 3, 4):
                coefficients = nonlinearity.coefficients(NIGHT, CCD, qid)
                corrections = pocket_step(DetrendConfig(pocket="v0.1"), CCD, qid, NIGHT).row_corrections
                truth = fit_overscan(clean.overscan(qid), qid, config=detrend, nonlinearity_coefficients=coefficients)
                fits_of = {
                    "off": fit_overscan(raw.overscan(qid), qid, config=detrend, nonlinearity_coefficients=coefficients),
                    "v0.1": fit_overscan(
                        raw.overscan(qid), qid, config=detrend, nonlinearity_coefficients=coefficients,
                        data=raw.data(qid), row_corrections=corrections,
                    ),
                }  # fmt: skip
                rows, columns = raw.data_shape(qid)
                bright = to_readout(_bright_rows(stars, exposure.filefracday, qid, rows, columns)[:, np.newaxis], qid)[:, 0]
                for name, model in fits_of.items():
                    median = model.row_median_readout - truth.row_median_readout
                    level = model.level_stored - truth.level_stored
                    found[f"{name} medians bright"] += list(median[bright])
                    found[f"{name} medians other"] += list(median[~bright])
                    found[f"{name} model"] += list(level)
    return found


def _overscan(pocket: NightTruth, twin: NightTruth) -> tuple[list[float], list[float], list[float], list[float]]:
    """Pocket night less twin, raw overscan: (cols 0-4 bright rows, 0-4 others, 5-24 bright, 5-24 others), ADU."""
    near_first: list[float] = []
    other_first: list[float] = []
    near_model: list[float] = []
    other_model: list[float] = []
    stars = pocket.stars.to_pylist()
    for exposure in (e for e in pocket.exposures if e.imgtype == "object"):
        relpath = exposure.raw_name(CCD).relpath
        with fits.open(pocket.out / relpath) as a, fits.open(twin.out / relpath) as b:
            for qid in (1, 2, 3, 4):
                rows, columns = a[qid].data.shape
                difference = a[qid + 4].data.astype(np.float64) - b[qid + 4].data  # stored rows, stored columns
                readout_columns = to_readout(difference, qid)[::-1 if qid in (3, 4) else 1]  # stored rows, readout columns
                bright = _bright_rows(stars, exposure.filefracday, qid, rows, columns)
                first, model = readout_columns[:, :5].mean(axis=1), readout_columns[:, 5:25].mean(axis=1)
                near_first += list(first[bright])
                other_first += list(first[~bright])
                near_model += list(model[bright])
                other_model += list(model[~bright])
    return near_first, other_first, near_model, other_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=8)
    parser.add_argument("--stars", type=int, default=None, help="stars per quadrant (default: the generator's, 120 on small frames)")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--png", type=Path, default=Path("pocket_night.png"))
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="pocket-night-"))
    twin = _night(out / "twin", "off", args.exposures, args.stars)
    pocket = _night(out / "pocket", "v0.1", args.exposures, args.stars)
    runs = {
        "twin (no pocket), off": _rows(_catalogues(twin, out / "run-twin", DetrendConfig()), twin),
        "pocket night, off": _rows(_catalogues(pocket, out / "run-off", DetrendConfig()), pocket),
        "pocket night, v0.1": _rows(_catalogues(pocket, out / "run-on", DetrendConfig(pocket="v0.1")), pocket),
    }
    reference = runs["twin (no pocket), off"]
    print(f"work directory {out}; stars kept (S/N > {MIN_SNR:g} at r = 3 px, isolated, unflagged): "
          + ", ".join(f"{k}: {len(v)}" for k, v in runs.items()))
    print("magnitude bin | " + " | ".join(runs) + " | off / twin | v0.1 / twin | stars")
    for low, high in zip(BINS[:-1], BINS[1:], strict=True):
        keys = [k for k, r in reference.items() if low <= -2.5 * np.log10(r["true"]) < high and all(k in run for run in runs.values())]
        if len(keys) < 3:
            continue
        medians = [float(np.median([run[k]["f_0"] / run[k]["true"] for k in keys])) for run in runs.values()]
        twin_ratio = [float(np.median([runs[n][k]["f_0"] / reference[k]["f_0"] for k in keys])) for n in ("pocket night, off", "pocket night, v0.1")]
        print(f"[{low:.1f}, {high:.1f}) | " + " | ".join(f"{m:.4f}" for m in medians) + f" | {twin_ratio[0]:.4f} | {twin_ratio[1]:.4f} | {len(keys)}")
    trend = _trend(runs, reference)
    _print_trend(trend, list(runs))
    near_first, other_first, near_model, other_model = _overscan(pocket, twin)
    print(
        f"raw overscan, pocket night less twin (ADU, median): readout columns 0-4: rows with a bright star read in the "
        f"last {LAST_COLUMNS} columns {np.median(near_first):.1f} ({len(near_first)} rows), other rows {np.median(other_first):.1f}; "
        f"columns 5-24 (the overscan model's): {np.median(near_model):.2f} and {np.median(other_model):.2f}"
    )
    fitted = _fitted_levels(pocket, twin)
    for name in ("off", "v0.1"):
        print(
            f"fitted overscan level, pocket night less twin (ADU, mean), correction {name}: per-row medians in rows with a "
            f"bright star read last {np.mean(fitted[f'{name} medians bright']):.3f} ({len(fitted[f'{name} medians bright'])} rows), "
            f"other rows {np.mean(fitted[f'{name} medians other']):.3f}; the model {np.mean(fitted[f'{name} model']):.3f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in runs:
        centres_100 = [c for c, _n, _m in trend["by_magnitude"]]
        values = [m[name][0] for _c, _n, m in trend["by_magnitude"]]
        errors = [m[name][1] for _c, _n, m in trend["by_magnitude"]]
        left.errorbar(centres_100, values, yerr=errors, marker="o", capsize=2, label=name)
    left.set_xlabel("instrumental magnitude, -2.5 log10(true ADU)")
    left.set_ylabel(f"median flux / aperture truth at r = 3 px, S/N > {TREND_SNR:g}")
    left.legend()
    left.set_title(f"CCD {CCD}, {FILTER}, {args.exposures} exposures")
    right.hist([other_first, near_first], bins=30, label=["other rows", f"bright star in the last {LAST_COLUMNS} columns"], density=True, histtype="step")
    right.set_xlabel("raw overscan columns 0-4, pocket night less twin (ADU)")
    right.legend()
    figure.tight_layout()
    figure.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
