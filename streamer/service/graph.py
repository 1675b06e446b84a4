"""The work graph of a night: which jobs, in which order, pinning which files.

For each night and CCD: a master bias, one LED flat per (filter, LED), a master flat
per filter; optionally a focal-plane normalisation per night and filter; then one job
per science raw file. A job's inputs, including the masters it needs, are pinned
files; a job is ready when its pinned files are on disk. Files that a job writes are
rows of kind ``masters`` or ``apcat`` with ``producer_job`` set, so the same rule
(pinned and on disk) covers downloaded and produced inputs. Jobs are created in the
order they should run, so that ``jobs.id`` orders downloads too.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from streamer.archive.naming import RawName
from streamer.ledger.core import Ledger
from streamer.formats.apcat import apcat_relpath


def _compact(night: str) -> str:
    return night.replace("-", "")


def master_bias_relpath(night: str, ccdid: int) -> str:
    n = _compact(night)
    return f"masters/{n[:4]}/{n[4:]}/ccd{ccdid:02d}/ztf_{n}_c{ccdid:02d}_bias.fits"


def led_flat_relpath(night: str, ccdid: int, filtercode: str, led: int) -> str:
    n = _compact(night)
    return f"masters/{n[:4]}/{n[4:]}/ccd{ccdid:02d}/ztf_{n}_c{ccdid:02d}_{filtercode}_led{led:02d}_flat.fits"


def master_flat_relpath(night: str, ccdid: int, filtercode: str) -> str:
    n = _compact(night)
    return f"masters/{n[:4]}/{n[4:]}/ccd{ccdid:02d}/ztf_{n}_c{ccdid:02d}_{filtercode}_flat.fits"


def focalplane_relpath(night: str, filtercode: str) -> str:
    n = _compact(night)
    return f"masters/{n[:4]}/{n[4:]}/ztf_{n}_{filtercode}_focalplane.json"


def _product(ledger: Ledger, conn: sqlite3.Connection, relpath: str, kind: str, job_id: int, night: str) -> int:
    file_id = ledger.want_file(conn, relpath=relpath, kind=kind, night=night)
    conn.execute("UPDATE files SET producer_job = ? WHERE id = ? AND producer_job IS NULL", (job_id, file_id))
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
        exposures = _night_inputs(conn, night, ccds)
        flat_files_by_filter: dict[str, list[int]] = defaultdict(list)
        master_flats: dict[tuple[int, str], int] = {}
        master_biases: dict[int, int] = {}
        for ccdid in ccds:
            rows = exposures.get(ccdid, [])
            biases = sorted((r for r in rows if r["imgtype"] == "bias"), key=lambda r: r["obsjd"] or 0)
            used_biases = biases[bias_skip_first:]
            bias_files = [r["raw_file_id"] for r in used_biases if r["raw_file_id"] is not None]
            if bias_files:
                job = ledger.add_job(
                    conn, kind="master_bias", key=f"master_bias:{night}:c{ccdid:02d}",
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
                        conn, kind="led_flat", key=f"led_flat:{night}:c{ccdid:02d}:{filtercode}:{led}",
                        pins=pins, night=night, ccdid=ccdid, filtercode=filtercode,
                    )  # fmt: skip
                    led_products.append(
                        _product(ledger, conn, led_flat_relpath(night, ccdid, filtercode, led), "masters", job, night)
                    )
                    counts["led_flat"] += 1
                job = ledger.add_job(
                    conn, kind="master_flat", key=f"master_flat:{night}:c{ccdid:02d}:{filtercode}",
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
                    conn, kind="focalplane", key=f"focalplane:{night}:{filtercode}",
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
                    conn, kind="exposure", key=f"exposure:{r['filefracday']}:c{ccdid:02d}",
                    pins=pins, night=night, ccdid=ccdid, filtercode=r["filtercode"], exposure_id=r["id"],
                )  # fmt: skip
                apcat = _product(ledger, conn, apcat_relpath(raw), "apcat", job, night)
                conn.execute("UPDATE files SET exposure_id = ?, field = ? WHERE id = ?", (r["id"], r["field"], apcat))
                counts["exposure"] += 1
    return dict(counts)


def _night_inputs(conn: sqlite3.Connection, night: str, ccds: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """Exposures of a night by CCD, each with its raw file id and its science input file ids."""
    marks = ",".join("?" * len(ccds))
    cursor = conn.execute(
        f"SELECT e.*, "
        f" (SELECT f.id FROM files f WHERE f.exposure_id = e.id AND f.kind = 'raw') AS raw_file_id "
        f"FROM exposures e WHERE e.night = ? AND e.ccdid IN ({marks}) ORDER BY e.obsjd, e.filefracday",
        (night, *ccds),
    )
    names = [d[0] for d in cursor.description]
    by_ccd: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for values in cursor.fetchall():
        row = dict(zip(names, values, strict=True))
        row["science_inputs"] = [
            fid
            for (fid,) in conn.execute(
                "SELECT id FROM files WHERE exposure_id = ? AND kind IN ('sciimg_header', 'mskimg') ORDER BY kind, qid",
                (row["id"],),
            )
        ]
        by_ccd[int(row["ccdid"])].append(row)
    return by_ccd
