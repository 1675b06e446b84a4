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

import sqlite3
from collections import defaultdict
from collections.abc import Sequence

from streamer.ledger import planning as queries
from streamer.ledger.core import Ledger
from streamer.rules.bias import bias_time_order, biases_to_use
from streamer.storage.naming import RawName
from streamer.storage.paths import (
    apcat_relpath,
    focalplane_relpath,
    led_flat_relpath,
    master_bias_relpath,
    master_flat_relpath,
)


def _product(ledger: Ledger, conn: sqlite3.Connection, relpath: str, kind: str, job_id: int, night: str) -> int:
    file_id = ledger.want_file(conn, relpath=relpath, kind=kind, night=night)
    queries.set_producer(conn, file_id, job_id)
    return file_id


def build_night_graph(
    ledger: Ledger,
    night: str,
    ccds: Sequence[int],
    *,
    bias_skip_first: int,
    focalplane: bool,
) -> dict[str, int]:
    """Create (idempotently) the jobs of one night for the given CCDs; return counts by job kind."""
    counts: dict[str, int] = defaultdict(int)
    with ledger.transaction() as conn:
        exposures = queries.night_inputs(conn, night, ccds)
        flat_files_by_filter: dict[str, list[int]] = defaultdict(list)
        master_flats: dict[tuple[int, str], int] = {}
        master_biases: dict[int, int] = {}
        for ccdid in ccds:
            rows = exposures.get(ccdid, [])
            biases = biases_to_use(
                [r for r in rows if r["imgtype"] == "bias"], bias_skip_first,
                order=lambda r: bias_time_order(r["obsjd"], r["filefracday"]),
            )  # fmt: skip
            bias_files = [r["raw_file_id"] for r in biases if r["raw_file_id"] is not None]
            if bias_files:
                job = ledger.add_job(
                    conn, kind="master_bias", key=queries.master_bias_key(night, ccdid),
                    pins=bias_files, night=night, ccdid=ccdid,
                )  # fmt: skip
                master_biases[ccdid] = _product(ledger, conn, master_bias_relpath(night, ccdid), "masters", job, night)
                counts["master_bias"] += 1
            flats: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
            for r in rows:
                if r["imgtype"] == "flat" and r["raw_file_id"] is not None and r["led"] is not None:
                    flats[r["filtercode"]][int(r["led"])].append(r["raw_file_id"])
            for filtercode in sorted(flats):
                led_products = []
                for led in sorted(flats[filtercode]):
                    pins = list(flats[filtercode][led])
                    if ccdid in master_biases:
                        pins.append(master_biases[ccdid])
                    job = ledger.add_job(
                        conn, kind="led_flat", key=queries.led_flat_key(night, ccdid, filtercode, led),
                        pins=pins, night=night, ccdid=ccdid, filtercode=filtercode,
                    )  # fmt: skip
                    led_products.append(
                        _product(ledger, conn, led_flat_relpath(night, ccdid, filtercode, led), "masters", job, night)
                    )
                    counts["led_flat"] += 1
                job = ledger.add_job(
                    conn, kind="master_flat", key=queries.master_flat_key(night, ccdid, filtercode),
                    pins=led_products, night=night, ccdid=ccdid, filtercode=filtercode,
                )  # fmt: skip
                flat_id = _product(ledger, conn, master_flat_relpath(night, ccdid, filtercode), "masters", job, night)
                master_flats[(ccdid, filtercode)] = flat_id
                flat_files_by_filter[filtercode].append(flat_id)
                counts["master_flat"] += 1
        focalplane_files: dict[str, int] = {}
        if focalplane:
            for filtercode, flat_ids in sorted(flat_files_by_filter.items()):
                job = ledger.add_job(
                    conn, kind="focalplane", key=queries.focalplane_key(night, filtercode),
                    pins=flat_ids, night=night, filtercode=filtercode,
                )  # fmt: skip
                focalplane_files[filtercode] = _product(
                    ledger, conn, focalplane_relpath(night, filtercode), "masters", job, night
                )
                counts["focalplane"] += 1
        for ccdid in ccds:
            for r in exposures.get(ccdid, []):
                if r["imgtype"] != "object" or r["raw_file_id"] is None:
                    continue
                pins = [r["raw_file_id"], *r["science_inputs"]]
                for master in (master_biases.get(ccdid), master_flats.get((ccdid, r["filtercode"]))):
                    if master is not None:
                        pins.append(master)
                if r["filtercode"] in focalplane_files:
                    pins.append(focalplane_files[r["filtercode"]])
                raw = RawName(r["filefracday"], r["field"], r["filtercode"], ccdid, "o")
                job = ledger.add_job(
                    conn, kind="exposure", key=queries.exposure_key(r["filefracday"], ccdid),
                    pins=pins, night=night, ccdid=ccdid, filtercode=r["filtercode"], exposure_id=r["id"],
                )  # fmt: skip
                apcat = _product(ledger, conn, apcat_relpath(raw), "apcat", job, night)
                queries.set_file_exposure(conn, apcat, r["id"], r["field"])
                for detrended in r["detrended_outputs"]:
                    queries.set_producer(conn, detrended, job)
                counts["exposure"] += 1
    return dict(counts)
