"""``streamer report --night D``: a night's QA page from the ledger and the products; and the daemon's
``[report] after_night`` stage, which writes it once every job of a night has ended.

The report reads the ledger read-only (it runs beside the daemon) and the masters and catalogues
still on disk; masters already evicted are listed without thumbnails. Its files go to ``--out`` (by
default ``streamer-report-YYYY-MM-DD`` in the current directory) or to ``[report] directory``/night.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from pathlib import Path

from streamer.config import Config
from streamer.errors import StreamerError
from streamer.ledger import report as queries
from streamer.ledger.core import Ledger
from streamer.service.context import Context, wait_event
from streamer.work.report import NightRecords, Report, build_report, night_window, summary_lines

log = logging.getLogger("streamer.service")

REPORT_CHECK_EVERY_S = 30.0


def night_records(ledger: Ledger, config: Config, night: str) -> NightRecords:
    """Everything the ledger knows of ``night`` that the report shows."""
    jobs = queries.night_jobs(ledger, night)
    downloads = queries.night_downloads(ledger, night)
    records = NightRecords(
        night=night, root=config.storage.root, masters=queries.night_products(ledger, night, "masters"),
        catalogues=queries.night_products(ledger, night, "apcat"), jobs=jobs, downloads=downloads,
        missing=queries.night_missing_files(ledger, night), calibration=queries.night_calibration_events(ledger, night),
        disk=[], budget=config.storage.budget, high_watermark=config.storage.high_watermark,
        low_watermark=config.storage.low_watermark,
    )  # fmt: skip
    start, end = night_window(records)
    return dataclasses.replace(records, disk=queries.disk_samples(ledger, start - 60.0, end + 60.0))


class NothingToReportError(StreamerError):
    """The ledger has no job of the night asked for."""


def write_night_report(config: Config, night: str, out: Path) -> Report:
    """Read the ledger (read-only) and write ``night``'s report under ``out``."""
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        records = night_records(ledger, config, night)
    if not records.jobs:
        raise NothingToReportError(f"night {night}: no jobs in the ledger (not planned yet, or nothing was taken)")
    return build_report(records, out)


def default_out(config: Config, night: str) -> Path:
    if config.report.directory is not None:
        return config.report.directory / night
    return Path.cwd() / f"streamer-report-{night}"


def show(config: Config, night: dt.date, out: Path | None, *, as_json: bool) -> int:
    """``streamer report``: write the page, print its summary (or report.json with ``--json``); exit 0."""
    target = out if out is not None else default_out(config, night.isoformat())
    report = write_night_report(config, night.isoformat(), target)
    if as_json:
        print((target / "report.json").read_text())
    else:
        print("\n".join(summary_lines(report)))
        print(f"written: {target / 'index.html'}")
    return 0


async def write_pending_reports(ctx: Context) -> int:
    """Write the report of each night whose jobs have all ended and that has none yet; the number written."""
    written = 0
    for night in queries.finished_nights_without_report(ctx.ledger):
        out = default_out(ctx.config, night)
        try:
            report = await asyncio.to_thread(write_night_report, ctx.config, night, out)
        except Exception as err:  # a report must never stop the service
            log.warning("report of night %s not written: %s: %s", night, type(err).__name__, err)
            ctx.ledger.event("report", f"night {night}: {type(err).__name__}: {err}", level="warning")
        else:
            log.info("report of night %s written to %s (%d figures)", night, out, len(report.figures))
            written += 1
        queries.mark_report_written(ctx.ledger, night)
    return written


async def reporter(ctx: Context) -> None:
    """The ``after_night`` stage of the daemon: every ``REPORT_CHECK_EVERY_S``, the nights just finished."""
    while not ctx.stopping.is_set():
        await write_pending_reports(ctx)
        await wait_event(ctx.stopping, REPORT_CHECK_EVERY_S)


__all__ = ["reporter", "show", "write_night_report", "write_pending_reports"]
