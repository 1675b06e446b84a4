"""The PNG figures of a night's QA report (matplotlib, drawn off-screen from the numbers of ``Report``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from streamer.storage.atomic import write_atomically
from streamer.storage.naming import ccd_quadrant_of

if TYPE_CHECKING:
    from streamer.work.report import Report

QUADRANT_CELL: dict[int, tuple[int, int]] = {1: (0, 1), 2: (0, 0), 3: (1, 0), 4: (1, 1)}
"""(row, column) of a quadrant's cell within its CCD's cell of the schematic map, by qid."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> str:
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=90))
    _pyplot().close(figure)
    return path.name


def draw(report: Report, thumbnails: Mapping[str, Sequence[npt.NDArray[np.float32]]], out: Path) -> dict[str, str]:
    """Draw every figure of ``report`` under ``out``; return {title: file name}."""
    figures: dict[str, str] = {}
    for master in report.masters:
        images = thumbnails.get(master["relpath"])
        if images:
            title = f"{master['kind']} c{int(master['ccdid']):02d} {master['filtercode'] or ''}".strip()
            figures[f"Master {title}"] = _save(_master_figure(title, master, images), out / _png_name(master["relpath"]))
    for filtercode in sorted({zp["filtercode"] for zp in report.zero_points}):
        figures[f"Zero-points {filtercode}"] = _save(_zero_point_map(report, filtercode), out / f"zeropoints_{filtercode}.png")
    if report.disk["samples"]:
        figures["Disk use against the budget"] = _save(_disk_figure(report.disk), out / "disk.png")
    figures["Throughput"] = _save(_throughput_figure(report.throughput), out / "throughput.png")
    return figures


def _png_name(relpath: str) -> str:
    return "master_" + Path(relpath).name.split(".")[0] + ".png"


def _master_figure(title: str, master: Mapping[str, Any], images: Sequence[npt.NDArray[np.float32]]) -> Any:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.4), squeeze=False)
    for axis, image, stats in zip(axes[0], images, master["quadrants"], strict=True):
        finite = image[np.isfinite(image)]
        low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        axis.imshow(image, origin="lower", cmap="gray", vmin=low, vmax=high)
        axis.set_title(f"q{stats['qid']}: median {stats['median']:.4g}\nsigma {stats['sigma']:.3g}, masked {stats['masked_fraction']:.2%}", fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title)
    return figure


def _zero_point_map(report: Report, filtercode: str) -> Any:
    """Per quadrant, the median over the night's exposures of its zero-point."""
    by_rcid: dict[int, list[float]] = {}
    for zp in report.zero_points:
        if zp["filtercode"] == filtercode:
            by_rcid.setdefault(int(zp["rcid"]), []).append(float(zp["zp"]))
    values = {rcid: float(np.median(v)) for rcid, v in by_rcid.items()}
    return _rcid_map_figure(values, f"{report.night} {filtercode}: zero-point per quadrant", "ZP = G + 2.5 log10(flux) [mag]")


def _rcid_map_figure(values: Mapping[int, float], title: str, label: str) -> Any:
    """One value per quadrant (by rcid) on a schematic 4 x 4 grid of CCDs by ccdid, quadrants by qid."""
    plt = _pyplot()
    grid = np.full((8, 8), np.nan)
    for rcid, value in values.items():
        ccdid, qid = ccd_quadrant_of(rcid)
        ccd = ccdid - 1
        row, col = QUADRANT_CELL[qid]
        grid[2 * (ccd // 4) + row, 2 * (ccd % 4) + col] = value
    figure, axis = plt.subplots(figsize=(5.5, 4.8))
    shown = axis.imshow(grid, cmap="viridis", origin="upper")
    figure.colorbar(shown, ax=axis, label=label)
    for ccd in range(16):
        axis.text(2 * (ccd % 4) + 0.5, 2 * (ccd // 4) + 0.5, f"c{ccd + 1:02d}", ha="center", va="center", fontsize=7, color="w")
    axis.set_xticks(np.arange(-0.5, 8, 2), minor=False)
    axis.set_yticks(np.arange(-0.5, 8, 2), minor=False)
    axis.grid(color="k", linewidth=1.5)
    axis.set_xticklabels([])
    axis.set_yticklabels([])
    axis.set_title(f"{title}\n(schematic grid by ccdid and qid, not the sky orientation)", fontsize=8)
    return figure


def draw_rcid_map(values: Mapping[int, float], title: str, label: str, path: Path) -> str:
    """Write the schematic per-quadrant map of ``values`` (by rcid) as the PNG ``path``; its file name."""
    return _save(_rcid_map_figure(values, title, label), path)


def _times(values: Sequence[float]) -> list[dt.datetime]:
    return [dt.datetime.fromtimestamp(v, dt.UTC) for v in values]


def _disk_figure(disk: Mapping[str, Any]) -> Any:
    plt = _pyplot()
    samples = disk["samples"]
    times = _times([s["t"] for s in samples])
    figure, axis = plt.subplots(figsize=(7, 3.2))
    axis.step(times, [s["disk_bytes"] / 1e9 for s in samples], where="post", label="on disk")
    axis.step(times, [(s["disk_bytes"] + s["reserved_bytes"]) / 1e9 for s in samples], where="post", label="on disk + reserved")
    for name, style in (("budget", "r-"), ("high", "r--"), ("low", "r:")):
        axis.axhline(disk[name] / 1e9, color=style[0], linestyle=style[1:], label=name)
    axis.set_ylabel("GB")
    axis.legend(fontsize=7)
    figure.autofmt_xdate()
    return figure


def _throughput_figure(throughput: Mapping[str, Any]) -> Any:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.2))
    for name in ("jobs_done", "downloads"):
        edges = throughput[name]["edges"]
        axis.stairs(throughput[name]["counts"], np.asarray(edges) - edges[0], label=name.replace("_", " "))
    axis.set_xlabel("seconds since the night's first job")
    axis.set_ylabel("per bin")
    axis.legend(fontsize=7)
    return figure
