"""A night's QA report: statistics of its masters and catalogues, figures (PNG) and one static HTML page.

The numbers behind every figure go to ``report.json`` beside it, so a reader (or a test) can check them
without reading pixels. The ledger's side (which files, which jobs, the disk history) arrives as
``NightRecords``, already read: this module reads only the products themselves.

- Zero-points: per science exposure and quadrant, ``ZP = G + 2.5 log10(f)`` over unflagged catalogue
  stars with ``f / f_err >= ZP_MIN_SNR``, at the aperture nearest ``ZP_RADIUS_PX``: its median and its
  robust scatter (1.4826 x the median absolute deviation). No aperture correction: a 3 px radius holds
  about 99 % of a star's light in 2" seeing and takes in the least of its neighbours' (a larger
  aperture measures blends in a crowded quadrant).
- Flagged measurements: of all (source, radius) measurements, those with any flag set, and by flag.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq

from streamer import clock
from streamer.config import format_size
from streamer.formats import masters as masterio
from streamer.photometry import FLAG_EDGE, FLAG_MASKED, FLAG_NONFINITE
from streamer.storage.atomic import write_atomically
from streamer.storage.naming import rcid_of
from streamer.work import report_figures

ZP_MIN_SNR: Final = 20.0
ZP_RADIUS_PX: Final = 3.0
ZP_MIN_STARS: Final = 5
THUMBNAIL_BLOCK: Final = 8
SHOWN_MASTER_KINDS: Final = ("master_bias", "master_flat")
"""Masters drawn and measured; the per-LED flats are listed only (33 of them per CCD-night)."""
THROUGHPUT_BINS: Final = 24
FLAG_NAMES: Final = {"masked": FLAG_MASKED, "edge": FLAG_EDGE, "nonfinite": FLAG_NONFINITE}


@dataclass(frozen=True)
class NightRecords:
    """What the ledger says of one night, as plain rows (see ``streamer.ledger.report``)."""

    night: str
    root: Path
    masters: Sequence[Mapping[str, Any]]
    catalogues: Sequence[Mapping[str, Any]]
    jobs: Sequence[Mapping[str, Any]]
    downloads: Sequence[Mapping[str, Any]]
    missing: Sequence[Mapping[str, Any]]
    calibration: Sequence[Mapping[str, Any]]
    disk: Sequence[Mapping[str, Any]]
    budget: int
    high_watermark: float
    low_watermark: float


@dataclass
class Report:
    """The numbers of a night's report (``report.json``) and the figures drawn from them."""

    night: str
    masters: list[dict[str, Any]] = field(default_factory=list)
    zero_points: list[dict[str, Any]] = field(default_factory=list)
    flags: dict[str, int] = field(default_factory=dict)
    disk: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)


# --- masters --------------------------------------------------------------------------------


def robust_sigma(values: npt.NDArray[np.floating]) -> float:
    """1.4826 x the median absolute deviation (the standard deviation of a normal sample); NaN when empty."""
    if values.size == 0:
        return math.nan
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def block_mean(image: npt.NDArray[np.floating], block: int = THUMBNAIL_BLOCK) -> npt.NDArray[np.float32]:
    """``image`` averaged over ``block`` x ``block`` pixels (edge rows and columns that do not fill a block dropped)."""
    rows, cols = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    trimmed = np.asarray(image[:rows, :cols], dtype=np.float64)
    return trimmed.reshape(rows // block, block, cols // block, block).mean(axis=(1, 3)).astype(np.float32)


def master_quadrant_stats(path: Path) -> list[tuple[dict[str, Any], npt.NDArray[np.float32]]]:
    """Per quadrant of one master file: its statistics (unmasked pixels) and a thumbnail."""
    out = []
    for qid in masterio.master_quadrants(path):
        quadrant = masterio.read_master(path, qid)
        good = quadrant.data[(quadrant.mask == 0) & np.isfinite(quadrant.data)].astype(np.float64)
        stats = {
            "qid": qid,
            "median": float(np.median(good)) if good.size else math.nan,
            "sigma": robust_sigma(good),
            "masked_fraction": float(1.0 - good.size / quadrant.data.size),
        }
        out.append((stats, block_mean(np.where(quadrant.mask == 0, quadrant.data, np.nan))))
    return out


# --- catalogues -----------------------------------------------------------------------------


def radius_count(columns: Iterable[str]) -> int:
    """The number of apertures of an apcat, from its ``f_k`` columns."""
    return sum(1 for name in columns if name.startswith("f_") and name[2:].isdigit())


def catalogue_zero_points(table: Any) -> list[dict[str, Any]]:
    """Per quadrant of one apcat (one exposure and CCD): ZP median, robust scatter and star count."""
    if radius_count(table.column_names) == 0 or table.num_rows == 0:
        return []
    columns = table.to_pydict()
    radii = [float(columns[f"r_{k}"][0]) for k in range(radius_count(table.column_names))]
    k = int(np.argmin(np.abs(np.asarray(radii) - ZP_RADIUS_PX)))
    flux = np.asarray(columns[f"f_{k}"], dtype=np.float64)
    error = np.asarray(columns[f"f_{k}_e"], dtype=np.float64)
    flags = np.asarray(columns[f"f_{k}_f"], dtype=np.int64)
    gmag = np.asarray(columns["phot_g_mean_mag"], dtype=np.float64)
    qids = np.asarray(columns["qid"], dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        usable = (flags == 0) & np.isfinite(gmag)
        usable &= np.isfinite(flux) & (flux > 0) & (flux >= ZP_MIN_SNR * error)
        zp = gmag + 2.5 * np.log10(np.where(usable, flux, 1.0))
    rows = []
    for qid in sorted(set(qids.tolist())):
        chosen = zp[usable & (qids == qid)]
        if chosen.size < ZP_MIN_STARS:
            continue
        rows.append({
            "expid": int(columns["expid"][0]), "filtercode": str(columns["filtercode"][0]),
            "ccdid": int(columns["ccdid"][0]), "qid": qid, "rcid": rcid_of(int(columns["ccdid"][0]), qid),
            "zp": float(np.median(chosen)), "scatter": robust_sigma(chosen), "stars": int(chosen.size), "radius": radii[k],
        })  # fmt: skip
    return rows


def _no_counts() -> dict[str, int]:
    return {"measurements": 0, "flagged": 0, **dict.fromkeys(FLAG_NAMES, 0)}


def catalogue_flags(table: Any) -> dict[str, int]:
    """Measurements (source x radius) of one apcat, those with any flag, and those with each flag."""
    counts = _no_counts()
    for k in range(radius_count(table.column_names)):
        flags = np.asarray(table.column(f"f_{k}_f").to_numpy(zero_copy_only=False), dtype=np.int64)
        counts["measurements"] += int(flags.size)
        counts["flagged"] += int(np.count_nonzero(flags))
        for name, bit in FLAG_NAMES.items():
            counts[name] += int(np.count_nonzero(flags & bit))
    return counts


def lost_quadrants(catalogues: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Quadrants that a science job recorded as lost (from each apcat's provenance), with their reason."""
    lost = []
    for row in catalogues:
        provenance = json.loads(row["provenance"] or "{}")
        for qid, reason in sorted((provenance.get("quadrants_lost") or {}).items()):
            lost.append({"relpath": row["relpath"], "qid": int(qid), "reason": str(reason)})
    return lost


# --- the ledger's side ----------------------------------------------------------------------


def histogram(times: Sequence[float], start: float, end: float, bins: int = THROUGHPUT_BINS) -> dict[str, Any]:
    """Counts of ``times`` in ``bins`` equal bins over [start, end] (``edges`` in Unix seconds)."""
    edges = np.linspace(start, max(end, start + 1.0), bins + 1)
    counts, _ = np.histogram(np.asarray(times, dtype=np.float64), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist()}


def night_window(records: NightRecords) -> tuple[float, float]:
    """From the first job created to the last job finished or download made (Unix seconds)."""
    starts = [float(j["created"]) for j in records.jobs if j["created"] is not None]
    ends = [float(j["finished"]) for j in records.jobs if j["finished"] is not None]
    ends += [float(d["fetched_at"]) for d in records.downloads]
    if not starts:
        return 0.0, 0.0
    return min(starts), max([*ends, *starts])


def job_problems(jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Jobs that ended parked, blocked or failed, with their error."""
    return [
        {"id": j["id"], "kind": j["kind"], "state": j["state"], "ccdid": j["ccdid"], "filtercode": j["filtercode"],
         "attempts": j["attempts"], "error": j["error"] or ""}
        for j in jobs if j["state"] in ("parked", "blocked", "failed")
    ]  # fmt: skip


# --- assembly -------------------------------------------------------------------------------


def build_report(records: NightRecords, out: Path) -> Report:
    """Compute the report of one night and write its figures, ``report.json`` and ``index.html`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report = Report(night=records.night)
    thumbnails = _masters(records, report)
    tables = [
        pq.read_table(records.root / row["relpath"]) for row in records.catalogues if row["state"] == "on_disk"
    ]
    for table in tables:
        report.zero_points.extend(catalogue_zero_points(table))
    report.flags = _sum_counts(catalogue_flags(table) for table in tables)
    start, end = night_window(records)
    report.disk = {
        "budget": records.budget, "high": int(records.high_watermark * records.budget),
        "low": int(records.low_watermark * records.budget),
        "samples": [dict(sample) for sample in records.disk],
        "peak": max((int(s["disk_bytes"]) + int(s["reserved_bytes"]) for s in records.disk), default=0),
    }  # fmt: skip
    done = [float(j["finished"]) for j in records.jobs if j["state"] == "done" and j["finished"] is not None]
    report.throughput = {
        "jobs_done": histogram(done, start, end), "downloads": histogram([float(d["fetched_at"]) for d in records.downloads], start, end),
        "start": start, "end": end,
    }  # fmt: skip
    report.problems = {
        "calibration_fallbacks": [dict(e) for e in records.calibration],
        "lost_quadrants": lost_quadrants(records.catalogues),
        "missing_files": [dict(m) for m in records.missing],
        "jobs": job_problems(records.jobs),
    }
    report.figures = report_figures.draw(report, thumbnails, out)
    _write_bytes(out / "report.json", json.dumps(_as_json(report), indent=1).encode())
    _write_bytes(out / "index.html", render_html(report).encode())
    return report


def _write_bytes(path: Path, data: bytes) -> None:
    write_atomically(path, lambda handle: handle.write(data))


def _masters(records: NightRecords, report: Report) -> dict[str, list[npt.NDArray[np.float32]]]:
    thumbnails: dict[str, list[npt.NDArray[np.float32]]] = {}
    for row in records.masters:
        entry = {"relpath": row["relpath"], "kind": row["product_kind"], "ccdid": row["ccdid"],
                 "filtercode": row["filtercode"], "state": row["state"], "quadrants": []}  # fmt: skip
        report.masters.append(entry)
        if row["state"] != "on_disk" or row["product_kind"] not in SHOWN_MASTER_KINDS:
            continue
        try:
            stats = master_quadrant_stats(records.root / row["relpath"])
        except masterio.MasterReadError as err:
            entry["error"] = str(err)
            continue
        entry["quadrants"] = [s for s, _ in stats]
        thumbnails[row["relpath"]] = [t for _, t in stats]
    return thumbnails


def _sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total = _no_counts()
    for one in counts:
        for key, value in one.items():
            total[key] += value
    return total


def _as_json(report: Report) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(
        {"night": report.night, "masters": report.masters, "zero_points": report.zero_points, "flags": report.flags,
         "disk": report.disk, "throughput": report.throughput, "problems": report.problems, "figures": report.figures}
    )  # fmt: skip


def summary_lines(report: Report) -> list[str]:
    """The report as a few lines of text (what ``streamer report`` prints)."""
    lines = [f"night {report.night}"]
    drawn = sum(1 for m in report.masters if m["quadrants"])
    lines.append(f"masters: {len(report.masters)} made, {drawn} drawn (bias and flats still on disk; LED flats listed)")
    by_filter: dict[str, list[float]] = {}
    for zp in report.zero_points:
        by_filter.setdefault(zp["filtercode"], []).append(zp["zp"])
    for filtercode, values in sorted(by_filter.items()):
        array = np.asarray(values)
        lines.append(
            f"zero-point {filtercode}: median {np.median(array):.3f} mag over {array.size} quadrant-exposures, "
            f"spread {robust_sigma(array):.3f} mag"
        )
    flags = report.flags
    fraction = flags["flagged"] / flags["measurements"] if flags.get("measurements") else 0.0
    lines.append(f"flagged measurements: {flags.get('flagged', 0)} of {flags.get('measurements', 0)} ({100 * fraction:.2f} %)")
    disk = report.disk
    lines.append(f"disk peak {format_size(disk['peak'])} of a {format_size(disk['budget'])} budget ({len(disk['samples'])} samples)")
    for name, rows in report.problems.items():
        lines.append(f"{name.replace('_', ' ')}: {len(rows)}")
    return lines


def render_html(report: Report) -> str:
    """A self-contained static page: the summary, the figures, and the problem tables."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>ztf-streamer QA {html.escape(report.night)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}img{max-width:100%}</style></head><body>",
        f"<h1>Night {html.escape(report.night)}</h1><pre>{html.escape(chr(10).join(summary_lines(report)))}</pre>",
    ]
    for title, name in report.figures.items():
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{html.escape(os.path.basename(name))}' alt='{html.escape(title)}'>")
    parts.append(_table("Master statistics", [
        {"master": m["relpath"], "qid": q["qid"], "median": f"{q['median']:.4g}", "sigma": f"{q['sigma']:.3g}",
         "masked": f"{q['masked_fraction']:.2%}"} for m in report.masters for q in m["quadrants"]
    ]))  # fmt: skip
    for name, rows in report.problems.items():
        parts.append(_table(name.replace("_", " ").capitalize(), rows))
    parts.append(f"<p>Written {clock.utcnow():%Y-%m-%d %H:%M} UTC; numbers in report.json.</p></body></html>")
    return "\n".join(parts)


def _table(title: str, rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return f"<h2>{html.escape(title)}</h2><p>none</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(k, '')))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"
