"""Prometheus metrics at ``/metrics``, served by aiohttp on the service's own event loop.

A stuck loop therefore stops answering scrapes (unlike ``prometheus_client``'s server thread).
The figures are read from the ledger at scrape time by one custom collector, one cheap query
per family, so counters derived from the ledger survive restarts:

- ``streamer_disk_used_bytes``, ``streamer_disk_reserved_bytes``: files on disk by the ledger's
  account, and outstanding reservations (the same figures as ``streamer status``);
- ``streamer_disk_overhead_bytes``: the ledger's own files under the root (scraped in-process);
- ``streamer_disk_budget_bytes``, ``streamer_disk_high_watermark_bytes``, ``streamer_disk_low_watermark_bytes``;
- ``streamer_disk_minimum_budget_bytes``, ``streamer_erasable_bytes``, ``streamer_erasable_files``;
- ``streamer_files{kind,state}``, ``streamer_files_disk_bytes{kind,state}``;
- ``streamer_tasks{kind,state}``; ``streamer_task_duration_seconds{kind}`` (histogram of done tasks);
- ``streamer_downloads_total{outcome="ok"}``, ``streamer_downloaded_bytes_total{outcome="ok"}``: archive
  files that reached disk, each once (files given up on are ``streamer_files{state="missing"|"corrupt"}``);
- ``streamer_archive_requests_total``: requests counted against archive files, failed ones included;
- ``streamer_archive_outage``, ``streamer_stuck`` (0 or 1);
- ``streamer_last_plan_timestamp_seconds``, ``streamer_last_download_timestamp_seconds``,
  ``streamer_last_task_timestamp_seconds`` (absent until the first one);
- ``process_*``: the standard process collector.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from streamer.config import Config
from streamer.errors import StreamerError
from streamer.ledger import metrics as queries
from streamer.ledger import status as status_queries
from streamer.ledger.core import Ledger
from streamer.ledger.downloads import OUTAGE_META_KEY
from streamer.service.context import Context

log = logging.getLogger("streamer.service")

#: Upper bounds (seconds) of the task duration histogram's buckets.
DURATION_BUCKETS: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class LedgerCollector(Collector):
    """Reads the ledger at each scrape; ``overhead`` gives the ledger's own bytes under the root."""

    def __init__(self, config: Config, ledger: Ledger, overhead: Callable[[], int]) -> None:
        self.config = config
        self.ledger = ledger
        self.overhead = overhead

    def collect(self) -> Iterator[Metric]:
        yield from self._disk()
        yield from self._files()
        yield self._tasks()
        yield self._durations()
        yield from self._downloads()
        yield from self._health()
        yield from self._timestamps()

    def _disk(self) -> Iterator[Metric]:
        storage = self.config.storage
        totals = self.ledger.bytes_by_kind_and_state().values()
        yield _gauge("streamer_disk_used_bytes", "Bytes of the files on disk, by the ledger's account.",
                     sum(t["disk_bytes"] for t in totals))  # fmt: skip
        yield _gauge("streamer_disk_reserved_bytes", "Bytes reserved for downloads and products not yet written.",
                     sum(t["reserved_bytes"] for t in totals))  # fmt: skip
        yield _gauge("streamer_disk_overhead_bytes", "Bytes of the ledger's own files under the root.", self.overhead())
        yield _gauge("streamer_disk_budget_bytes", "The configured disk budget.", storage.budget)
        yield _gauge("streamer_disk_high_watermark_bytes", "Eviction starts above this many bytes.",
                     int(storage.budget * storage.high_watermark))  # fmt: skip
        yield _gauge("streamer_disk_low_watermark_bytes", "Eviction stops below this many bytes.",
                     int(storage.budget * storage.low_watermark))  # fmt: skip
        minimum = self.ledger.get_meta("minimum_budget_bytes")
        if minimum is not None:
            yield _gauge("streamer_disk_minimum_budget_bytes", "The smallest workable budget, as last computed.", int(minimum))
        erasable = status_queries.erasable_totals(self.ledger)
        yield _gauge("streamer_erasable_files", "Files on disk that no consumer keeps and no task pins.", erasable["files"])
        yield _gauge("streamer_erasable_bytes", "Bytes of the erasable files.", erasable["bytes"])

    def _files(self) -> Iterator[Metric]:
        files = GaugeMetricFamily("streamer_files", "Files by kind and state.", labels=["kind", "state"])
        disk = GaugeMetricFamily("streamer_files_disk_bytes", "Bytes on disk by file kind and state.", labels=["kind", "state"])
        for (kind, state), figures in self.ledger.bytes_by_kind_and_state().items():
            files.add_metric([kind, state], figures["files"])
            disk.add_metric([kind, state], figures["disk_bytes"])
        yield files
        yield disk

    def _tasks(self) -> Metric:
        tasks = GaugeMetricFamily("streamer_tasks", "Tasks by kind and state.", labels=["kind", "state"])
        for (kind, state), n in sorted(self.ledger.jobs_by_kind_and_state().items()):
            tasks.add_metric([kind, state], n)
        return tasks

    def _durations(self) -> Metric:
        family = HistogramMetricFamily(
            "streamer_task_duration_seconds", "Run time of the tasks done (started to finished), by kind.", labels=["kind"]
        )
        for row in queries.done_duration_buckets(self.ledger, DURATION_BUCKETS):
            buckets = [(repr(float(b)), float(row[f"le_{i}"])) for i, b in enumerate(DURATION_BUCKETS)]
            family.add_metric([row["kind"]], [*buckets, ("+Inf", float(row["n"]))], sum_value=float(row["total"]))
        return family

    def _downloads(self) -> Iterator[Metric]:
        fetched = queries.fetched_from_archive(self.ledger)
        downloads = CounterMetricFamily("streamer_downloads", "Archive files that reached disk, each once.", labels=["outcome"])
        downloads.add_metric(["ok"], fetched["files"])
        volume = CounterMetricFamily("streamer_downloaded_bytes", "Bytes of those files.", labels=["outcome"])
        volume.add_metric(["ok"], fetched["bytes"])
        yield downloads
        yield volume
        yield CounterMetricFamily(
            "streamer_archive_requests", "Requests counted against archive files, failed ones included.",
            value=queries.archive_requests(self.ledger),
        )  # fmt: skip

    def _health(self) -> Iterator[Metric]:
        outage = json.loads(self.ledger.get_meta(OUTAGE_META_KEY) or "{}")
        yield _gauge("streamer_archive_outage", "1 while the archive is in an outage, else 0.", int(bool(outage.get("outage"))))
        stuck = status_queries.stuck_reason(self.ledger) is not None
        yield _gauge("streamer_stuck", "1 while the service cannot move (see streamer status), else 0.", int(stuck))

    def _timestamps(self) -> Iterator[Metric]:
        latest = {
            "plan": queries.last_plan_time(self.ledger),
            "download": queries.last_download_time(self.ledger),
            "task": queries.last_task_time(self.ledger),
        }
        for what, t in latest.items():
            if t is not None:
                yield _gauge(f"streamer_last_{what}_timestamp_seconds", f"Unix time of the last successful {what}.", t)


def build_registry(config: Config, ledger: Ledger, overhead: Callable[[], int]) -> CollectorRegistry:
    """The service's own registry: the ledger collector and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(config, ledger, overhead))
    ProcessCollector(registry=registry)
    return registry


async def start_metrics(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    """Listen on ``host:port`` with a ``/metrics`` route; the caller cleans the runner up."""

    async def scrape(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as err:
        await runner.cleanup()
        raise StreamerError(f"metrics.listen {host}:{port}: cannot listen there ({err.strerror or err})") from None
    return runner


async def metrics_server(ctx: Context) -> None:
    """The metrics stage: serve until the service stops."""
    assert ctx.config.metrics.listen is not None
    host, port = ctx.config.metrics.listen
    runner = await start_metrics(build_registry(ctx.config, ctx.ledger, ctx.overhead), host, port)
    log.info("metrics at http://%s:%d/metrics", host, port)
    try:
        await ctx.stopping.wait()
    finally:
        await runner.cleanup()


__all__ = ["LedgerCollector", "build_registry", "metrics_server", "start_metrics"]
