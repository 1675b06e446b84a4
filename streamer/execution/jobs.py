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
from typing import Any, Final

from streamer import __version__
from streamer.config import Config
from streamer.ledger.core import Ledger
from streamer.ledger.files import job_inputs, job_outputs
from streamer.ledger.planning import led_of_led_flat_key
from streamer.rules.failures import ErrorClass
from streamer.storage.atomic import is_disk_full
from streamer.storage.paths import local_path


@dataclass(frozen=True)
class Call:
    """A worker call: the function, its keyword arguments, and the files (relpaths) it writes."""

    function: Callable[..., Any]
    kwargs: dict[str, Any]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    """A worker's failure as the failure policy names it, with the reason to record."""

    kind: ErrorClass
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


@dataclass(frozen=True)
class JobContext:
    """What a job kind's builder sees: the job row, its inputs on disk, its outputs, and the configuration."""

    job: dict[str, Any]
    config: Config
    on_disk: tuple[dict[str, Any], ...]
    outputs: tuple[str, ...]

    def path(self, row: dict[str, Any]) -> str:
        return str(local_path(self.config.storage.root, row["relpath"]))

    def produced(self, kind: str) -> dict[str, Any] | None:
        """The pinned input made by a job of ``kind`` (a master), if on disk."""
        return next((r for r in self.on_disk if r["producer_kind"] == kind), None)

    def raws(self) -> list[str]:
        return [self.path(r) for r in self.on_disk if r["kind"] == "raw"]

    @property
    def out_path(self) -> str:
        return str(local_path(self.config.storage.root, self.outputs[0])) if self.outputs else ""

    @property
    def common(self) -> dict[str, Any]:
        return {"provenance": provenance(self.config, self.job), "out_path": self.out_path}


def _master_bias(ctx: JobContext) -> Call:
    from streamer.work.masters import build_master_bias

    # The work graph pinned the biases that rules.bias chose: the worker combines them all.
    job = ctx.job
    kwargs = {**ctx.common, "bias_paths": ctx.raws(), "night": job["night"], "ccdid": job["ccdid"], "detrend": ctx.config.detrend}
    return Call(build_master_bias, kwargs, ctx.outputs)


def _led_flat(ctx: JobContext) -> Call:
    from streamer.work.masters import build_led_flat

    job, bias = ctx.job, ctx.produced("master_bias")
    return Call(
        build_led_flat,
        {**ctx.common, "flat_paths": ctx.raws(), "master_bias_path": ctx.path(bias) if bias else None,
         "led": led_of_led_flat_key(job["key"]), "night": job["night"], "ccdid": job["ccdid"],
         "filtercode": job["filtercode"], "detrend": ctx.config.detrend},
        ctx.outputs,
    )  # fmt: skip


def _master_flat(ctx: JobContext) -> Call:
    from streamer.work.masters import combine_master_flat

    job = ctx.job
    led_flats = {led_of_led_flat_key(r["producer_key"]): ctx.path(r) for r in ctx.on_disk if r["producer_kind"] == "led_flat"}
    return Call(
        combine_master_flat,
        {**ctx.common, "led_flat_paths": led_flats, "night": job["night"], "ccdid": job["ccdid"],
         "filtercode": job["filtercode"], "detrend": ctx.config.detrend},
        ctx.outputs,
    )  # fmt: skip


def _focalplane(ctx: JobContext) -> Call:
    from streamer.work.focalplane import write_focalplane_factors

    flats = {int(r["producer_ccd"]): ctx.path(r) for r in ctx.on_disk if r["producer_kind"] == "master_flat"}
    return Call(write_focalplane_factors, {**ctx.common, "master_flat_paths": flats}, ctx.outputs)


def _exposure(ctx: JobContext) -> Call:
    from streamer.work.exposure import process_exposure
    from streamer.work.focalplane import read_focalplane_factor

    job, config = ctx.job, ctx.config
    raw = next(r for r in ctx.on_disk if r["kind"] == "raw")
    bias, flat, focal = ctx.produced("master_bias"), ctx.produced("master_flat"), ctx.produced("focalplane")
    headers = {q: None for q in (1, 2, 3, 4)} | {r["qid"]: ctx.path(r) for r in ctx.on_disk if r["kind"] == "sciimg_header"}
    masks = {q: None for q in (1, 2, 3, 4)} | {r["qid"]: ctx.path(r) for r in ctx.on_disk if r["kind"] == "mskimg"}
    calibration = {
        "master_bias": bias["relpath"] if bias else "",
        "master_bias_night": bias["producer_night"] if bias else "",
        "master_flat": flat["relpath"] if flat else "",
        "master_flat_night": flat["producer_night"] if flat else "",
    }
    factor = read_focalplane_factor(ctx.path(focal), job["ccdid"]) if focal else float("nan")
    return Call(
        process_exposure,
        {"raw_path": ctx.path(raw), "master_bias_path": ctx.path(bias) if bias else None,
         "master_flat_path": ctx.path(flat) if flat else None, "sciimg_header_paths": headers,
         "mask_paths": masks, "catalog_dir": str(config.photometry.catalog_dir), "storage_root": str(config.storage.root),
         "detrend_config": config.detrend, "photometry_config": config.photometry,
         "provenance": {**ctx.common["provenance"], **calibration}, "focalplane_factor": factor},
        ctx.outputs,
    )  # fmt: skip


#: Each job kind's builder of its worker call.
JOB_KINDS: Final[dict[str, Callable[[JobContext], Call]]] = {
    "master_bias": _master_bias,
    "led_flat": _led_flat,
    "master_flat": _master_flat,
    "focalplane": _focalplane,
    "exposure": _exposure,
}


def build_call(ledger: Ledger, config: Config, job: dict[str, Any]) -> Call:
    """The worker call for a ready job."""
    builder = JOB_KINDS.get(job["kind"])
    if builder is None:
        raise ValueError(f"job {job['key']}: unknown kind {job['kind']!r}: expected one of {', '.join(JOB_KINDS)}")
    on_disk = tuple(r for r in job_inputs(ledger, job["id"]) if r["state"] == "on_disk")
    return builder(JobContext(job=job, config=config, on_disk=on_disk, outputs=tuple(job_outputs(ledger, job["id"]))))


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
    """A full filesystem (not the job's fault), blocked for good (missing calibration, no WCS),
    re-download an unreadable raw file, or retry."""
    from streamer import photometry
    from streamer.formats import raw as rawio
    from streamer.work import masters as work_masters

    if is_disk_full(error):
        return Verdict("disk_full", f"no room on the filesystem: {error}")
    if isinstance(error, work_masters.IncompleteCalibration | photometry.NoCcdWcsError):
        return Verdict("blocked", str(error))
    if isinstance(error, rawio.RawFileError):
        return Verdict("refetch", str(error))
    return Verdict("retry", f"{type(error).__name__}: {error}")
