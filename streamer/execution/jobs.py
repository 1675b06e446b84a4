"""From a job row to a worker call, and from a worker's failure to the service's decision.

The service calls :func:`build_call` to get a picklable function and keyword arguments
(paths and configuration sections, nothing else), and :func:`classify_failure` when a
worker raises. The functions themselves live in :mod:`streamer.work`. LEDs and CCDs of
produced inputs come from their producer jobs' rows, never from file names.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamer import __version__
from streamer.config import Config
from streamer.ledger.core import Ledger
from streamer.ledger.files import job_inputs, job_outputs
from streamer.ledger.planning import led_of_led_flat_key
from streamer.storage.paths import local_path


@dataclass(frozen=True)
class Call:
    """A worker call: the function, its keyword arguments, and the files (relpaths) it writes."""

    function: Callable[..., Any]
    kwargs: dict[str, Any]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    """What to do with a failed job: ``blocked`` for good, ``refetch`` its raw file, or ``retry``."""

    kind: str
    reason: str


def provenance(config: Config, job: dict[str, Any]) -> dict[str, str]:
    """What a product records of how it was made (strings; never in a catalogue's rows)."""
    versions = []
    for package in ("numpy", "astropy", "sep"):
        try:
            versions.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package}=unknown")
    return {
        "job": job["key"],
        "config_hash": config.config_hash(),
        "ztf_streamer": __version__,
        "versions": " ".join(versions),
    }


def build_call(ledger: Ledger, config: Config, job: dict[str, Any]) -> Call:
    """The worker call for a ready job."""
    from streamer.work import exposure as work
    from streamer.work import focalplane as work_focalplane
    from streamer.work import masters as work_masters

    root = config.storage.root
    inputs = job_inputs(ledger, job["id"])
    outputs = tuple(job_outputs(ledger, job["id"]))
    on_disk = [r for r in inputs if r["state"] == "on_disk"]

    def path(row: dict[str, Any]) -> str:
        return str(local_path(root, row["relpath"]))

    def produced(kind: str) -> dict[str, Any] | None:
        return next((r for r in on_disk if r["producer_kind"] == kind), None)

    common = {"provenance": provenance(config, job)}
    out_path = str(local_path(root, outputs[0])) if outputs else ""
    kind = job["kind"]
    if kind == "master_bias":
        # The work graph pinned the biases that rules.bias chose: the worker combines them all.
        return Call(
            work_masters.build_master_bias,
            {**common, "bias_paths": [path(r) for r in on_disk if r["kind"] == "raw"], "out_path": out_path,
             "night": job["night"], "ccdid": job["ccdid"], "detrend": config.detrend},
            outputs,
        )  # fmt: skip
    if kind == "led_flat":
        bias = produced("master_bias")
        return Call(
            work_masters.build_led_flat,
            {**common, "flat_paths": [path(r) for r in on_disk if r["kind"] == "raw"],
             "master_bias_path": path(bias) if bias else None, "out_path": out_path,
             "led": led_of_led_flat_key(job["key"]), "night": job["night"], "ccdid": job["ccdid"],
             "filtercode": job["filtercode"], "detrend": config.detrend},
            outputs,
        )  # fmt: skip
    if kind == "master_flat":
        led_flats = {
            led_of_led_flat_key(r["producer_key"]): path(r) for r in on_disk if r["producer_kind"] == "led_flat"
        }
        return Call(
            work_masters.combine_master_flat,
            {**common, "led_flat_paths": led_flats, "out_path": out_path, "night": job["night"],
             "ccdid": job["ccdid"], "filtercode": job["filtercode"], "detrend": config.detrend},
            outputs,
        )  # fmt: skip
    if kind == "focalplane":
        flats = {int(r["producer_ccd"]): path(r) for r in on_disk if r["producer_kind"] == "master_flat"}
        return Call(
            work_focalplane.write_focalplane_factors,
            {**common, "master_flat_paths": flats, "out_path": out_path},
            outputs,
        )  # fmt: skip
    if kind == "exposure":
        raw = next(r for r in on_disk if r["kind"] == "raw")
        bias, flat, focal = produced("master_bias"), produced("master_flat"), produced("focalplane")
        headers = {q: None for q in (1, 2, 3, 4)} | {r["qid"]: path(r) for r in on_disk if r["kind"] == "sciimg_header"}
        masks = {q: None for q in (1, 2, 3, 4)} | {r["qid"]: path(r) for r in on_disk if r["kind"] == "mskimg"}
        calibration = {
            "master_bias": bias["relpath"] if bias else "",
            "master_bias_night": bias["producer_night"] if bias else "",
            "master_flat": flat["relpath"] if flat else "",
            "master_flat_night": flat["producer_night"] if flat else "",
        }
        factor = work_focalplane.read_focalplane_factor(path(focal), job["ccdid"]) if focal else 1.0
        return Call(
            work.process_exposure,
            {"raw_path": path(raw), "master_bias_path": path(bias) if bias else None,
             "master_flat_path": path(flat) if flat else None, "sciimg_header_paths": headers,
             "mask_paths": masks, "catalog_dir": str(config.photometry.catalog_dir), "storage_root": str(root),
             "detrend_config": config.detrend, "photometry_config": config.photometry,
             "provenance": {**common["provenance"], **calibration}, "focalplane_factor": factor},
            outputs,
        )  # fmt: skip
    raise ValueError(f"job {job['key']}: unknown kind {kind!r}")


def result_record(result: Any) -> dict[str, Any]:
    """A worker's result as JSON-ready values for the ledger."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(result).items()}
    if isinstance(result, dict):
        return {str(k): _plain(v) for k, v in result.items()}
    return {"result": _plain(result)}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def classify_failure(error: BaseException) -> Verdict:
    """Blocked for good (missing calibration, no WCS), re-download an unreadable raw file, or retry."""
    from streamer import photometry
    from streamer.formats import raw as rawio
    from streamer.work import masters as work_masters

    if isinstance(error, work_masters.IncompleteCalibration | photometry.NoCcdWcsError):
        return Verdict("blocked", str(error))
    if isinstance(error, rawio.RawFileError):
        return Verdict("refetch", str(error))
    return Verdict("retry", f"{type(error).__name__}: {error}")
