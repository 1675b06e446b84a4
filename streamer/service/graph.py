"""The work graph of a night: which jobs, in which order, pinning which files.

For each night and CCD: a master bias, one LED flat per (filter, LED), a master flat
per filter; optionally a focal-plane normalisation per night and filter; then one job
per science raw file. A job's inputs, including the masters it needs, are pinned
files; a job is ready when its pinned files are on disk. Files that a job writes are
rows of kind ``masters``, ``apcat`` or ``detrended`` with ``producer_job`` set, so the
same rule (pinned and on disk) covers downloaded and produced inputs, and the budget,
eviction and retention cover every product. Jobs are created in the order they should
run, so that ``jobs.id`` orders downloads too.

The master bias pins the biases that :func:`streamer.rules.bias.biases_to_use` chooses
(the only place the bias skip is applied); the detrended images are planned with the
night (:mod:`streamer.service.plan`, which knows the consumers) and given their producer here.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from streamer.config import Config, ConsumerConfig
from streamer.ledger import planning as queries
from streamer.ledger.core import Ledger
from streamer.rules.bias import bias_time_order, biases_to_use
from streamer.rules.retention import FileFacts, kept_by
from streamer.storage.naming import RawName
from streamer.storage.paths import (
    apcat_relpaths,
    focalplane_relpath,
    led_flat_relpath,
    master_bias_relpath,
    master_flat_relpath,
)


def _product(
    ledger: Ledger, conn: sqlite3.Connection, relpath: str, kind: str, job_id: int, night: str, *,
    keepers: Sequence[str] | None = None,
) -> int:
    file_id = ledger.want_file(conn, relpath=relpath, kind=kind, night=night, keepers=keepers)
    queries.set_producer(conn, file_id, job_id)
    return file_id


#: Graph passes at most: one, and one per level of masters a reopened job can need (flat, LED flat, bias, focal plane).
MAX_REOPEN_PASSES = 5


def build_configured_graph(config: Config, ledger: Ledger, night: str, ccds: Sequence[int]) -> dict[str, int]:
    """:func:`build_night_graph` with the options of the configuration (the planner's and dispatch's one call)."""
    return build_night_graph(
        ledger, night, ccds,
        bias_skip_first=config.detrend.bias_skip_first, focalplane=config.detrend.flat_normalisation == "focalplane",
        consumers=config.consumers, catalogue_layout=config.photometry.layout,
    )  # fmt: skip


def build_night_graph(
    ledger: Ledger,
    night: str,
    ccds: Sequence[int],
    *,
    bias_skip_first: int,
    focalplane: bool,
    consumers: Sequence[ConsumerConfig] = (),
    catalogue_layout: str = "streamer",
) -> dict[str, int]:
    """Create (idempotently) the jobs of one night for the given CCDs; return counts by job kind.

    A master is kept when a consumer keeps ``masters`` for that night (masters have no field or footprint,
    so a consumer restricted to fields or targets keeps none).
    """
    with ledger.transaction() as conn:
        exposures = queries.night_inputs(conn, night, ccds)
        # a night planned again (new exposures ingested since) may need masters made and since evicted:
        # their jobs are reopened and the graph built again, so that they pin their inputs, down the chain
        # (master flat -> LED flats -> master bias); each pass only adds, by key
        for _pass in range(MAX_REOPEN_PASSES):
            graph = _NightGraph(ledger, conn, night, consumers, catalogue_layout)
            for ccdid in ccds:
                graph.add_master_bias(ccdid, exposures.get(ccdid, []), bias_skip_first)
                graph.add_flats(ccdid, exposures.get(ccdid, []))
            if focalplane:
                graph.add_focalplane()
            for ccdid in ccds:
                for row in exposures.get(ccdid, []):
                    if row["imgtype"] == "object" and row["raw_file_id"] is not None:
                        graph.add_exposure(ccdid, row)
            if not queries.reopen_producers_of_needed_products(ledger, conn):
                break
    return dict(graph.counts)


class _NightGraph:
    """The jobs of one night being built in one transaction, with the masters made so far."""

    def __init__(
        self, ledger: Ledger, conn: sqlite3.Connection, night: str, consumers: Sequence[ConsumerConfig], catalogue_layout: str
    ) -> None:
        self.ledger = ledger
        self.catalogue_layout = catalogue_layout
        self.conn = conn
        self.night = night
        self.consumers = consumers
        self.night_date = dt.date.fromisoformat(night)
        self.master_keepers = kept_by(consumers, FileFacts("masters", None, self.night_date))
        self.counts: dict[str, int] = defaultdict(int)
        self.master_biases: dict[int, int] = {}
        self.master_flats: dict[tuple[int, str], int] = {}
        self.flats_by_filter: dict[str, list[int]] = defaultdict(list)
        self.focalplane_files: dict[str, int] = {}

    def _job(self, kind: str, key: str, pins: Sequence[int], **fields: Any) -> int:
        self.counts[kind] += 1
        return self.ledger.add_job(self.conn, kind=kind, key=key, pins=pins, night=self.night, **fields)

    def _product(self, relpath: str, kind: str, job_id: int, keepers: Sequence[str] | None = None) -> int:
        """A product file of ``job_id``; a master's keepers are the night's, others are given (None: unchanged)."""
        if kind == "masters":
            keepers = self.master_keepers
        return _product(self.ledger, self.conn, relpath, kind, job_id, self.night, keepers=keepers)

    def add_master_bias(self, ccdid: int, rows: Sequence[dict[str, Any]], skip_first: int) -> None:
        biases = biases_to_use(
            [r for r in rows if r["imgtype"] == "bias"], skip_first,
            order=lambda r: bias_time_order(r["obsjd"], r["filefracday"]),
        )  # fmt: skip
        bias_files = [r["raw_file_id"] for r in biases if r["raw_file_id"] is not None]
        if bias_files:
            job = self._job("master_bias", queries.master_bias_key(self.night, ccdid), bias_files, ccdid=ccdid)
            self.master_biases[ccdid] = self._product(master_bias_relpath(self.night, ccdid), "masters", job)

    def add_flats(self, ccdid: int, rows: Sequence[dict[str, Any]]) -> None:
        """One LED flat per (filter, LED) with its frames and the master bias, then the filter's master flat."""
        flats: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["imgtype"] == "flat" and r["raw_file_id"] is not None and r["led"] is not None:
                flats[r["filtercode"]][int(r["led"])].append(r["raw_file_id"])
        bias = [self.master_biases[ccdid]] if ccdid in self.master_biases else []
        for filtercode in sorted(flats):
            led_products = []
            for led in sorted(flats[filtercode]):
                key = queries.led_flat_key(self.night, ccdid, filtercode, led)
                job = self._job("led_flat", key, [*flats[filtercode][led], *bias], ccdid=ccdid, filtercode=filtercode)
                led_products.append(self._product(led_flat_relpath(self.night, ccdid, filtercode, led), "masters", job))
            key = queries.master_flat_key(self.night, ccdid, filtercode)
            job = self._job("master_flat", key, led_products, ccdid=ccdid, filtercode=filtercode)
            flat_id = self._product(master_flat_relpath(self.night, ccdid, filtercode), "masters", job)
            self.master_flats[(ccdid, filtercode)] = flat_id
            self.flats_by_filter[filtercode].append(flat_id)

    def add_focalplane(self) -> None:
        for filtercode, flat_ids in sorted(self.flats_by_filter.items()):
            job = self._job("focalplane", queries.focalplane_key(self.night, filtercode), flat_ids, filtercode=filtercode)
            self.focalplane_files[filtercode] = self._product(focalplane_relpath(self.night, filtercode), "masters", job)

    def add_exposure(self, ccdid: int, row: dict[str, Any]) -> None:
        """The exposure job: its raw, IPAC inputs and masters pinned; its catalogue and detrended images its products."""
        pins = [row["raw_file_id"], *row["science_inputs"]]
        for master in (self.master_biases.get(ccdid), self.master_flats.get((ccdid, row["filtercode"]))):
            if master is not None:
                pins.append(master)
        if row["filtercode"] in self.focalplane_files:
            pins.append(self.focalplane_files[row["filtercode"]])
        job = self._job(
            "exposure", queries.exposure_key(row["filefracday"], ccdid), pins,
            ccdid=ccdid, filtercode=row["filtercode"], exposure_id=row["id"],
        )  # fmt: skip
        raw = RawName(row["filefracday"], row["field"], row["filtercode"], ccdid, "o")
        for relpath in apcat_relpaths(raw, self.catalogue_layout):
            # no footprint here: a consumer restricted to targets is not counted as keeping catalogues
            # (they are never evicted anyway)
            keepers = kept_by(self.consumers, FileFacts("apcat", row["field"], self.night_date))
            apcat = self._product(relpath, "apcat", job, keepers)
            queries.set_file_exposure(self.conn, apcat, row["id"], row["field"])
        for detrended in row["detrended_outputs"]:
            queries.set_producer(self.conn, detrended, job)
