"""Planning and work-graph statements: flat LEDs, a night's inputs, products and their producers, job keys."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from streamer.ledger.core import Ledger

# --- job keys (one rule for building and reading them) -----------------------------------


def master_bias_key(night: str, ccdid: int) -> str:
    return f"master_bias:{night}:c{ccdid:02d}"


def led_flat_key(night: str, ccdid: int, filtercode: str, led: int) -> str:
    return f"led_flat:{night}:c{ccdid:02d}:{filtercode}:{led}"


def master_flat_key(night: str, ccdid: int, filtercode: str) -> str:
    return f"master_flat:{night}:c{ccdid:02d}:{filtercode}"


def focalplane_key(night: str, filtercode: str) -> str:
    return f"focalplane:{night}:{filtercode}"


def exposure_key(filefracday: str, ccdid: int) -> str:
    return f"exposure:{filefracday}:c{ccdid:02d}"


def led_of_led_flat_key(key: str) -> int:
    """The LED of a ``led_flat`` job, from its key (:func:`led_flat_key`)."""
    kind, _night, _ccd, _filter, led = key.split(":")
    if kind != "led_flat":
        raise ValueError(f"job key {key!r}: not a led_flat job")
    return int(led)


# --- planning ------------------------------------------------------------------------------


def file_states(conn: sqlite3.Connection, file_ids: Sequence[int]) -> dict[int, str]:
    """The state of each of ``file_ids``."""
    if not file_ids:
        return {}
    marks = ", ".join("?" * len(file_ids))
    return {int(i): str(s) for i, s in conn.execute(f"SELECT id, state FROM files WHERE id IN ({marks})", list(file_ids))}


def unkeep_unplanned(
    conn: sqlite3.Connection, night: str, ccds: Sequence[int], kinds: Sequence[str], planned: Sequence[int]
) -> int:
    """Files of ``kinds`` of the night's ``ccds`` that a new plan no longer lists lose their ``keeps`` rows
    and their ``kept`` flag (a consumer's selection changed). Returns how many files lost rows."""
    if not ccds or not kinds:
        return 0
    listed = set(planned)
    stale = [
        int(r[0])
        for r in conn.execute(
            f"SELECT DISTINCT f.id FROM files f JOIN exposures e ON e.id = f.exposure_id "
            f"JOIN keeps k ON k.file_id = f.id WHERE f.night = ? AND e.ccdid IN ({', '.join('?' * len(ccds))}) "
            f"AND f.kind IN ({', '.join('?' * len(kinds))})",
            (night, *ccds, *kinds),
        )
        if int(r[0]) not in listed
    ]
    conn.executemany("DELETE FROM keeps WHERE file_id = ?", [(i,) for i in stale])
    conn.executemany("UPDATE files SET kept = 0 WHERE id = ?", [(i,) for i in stale])
    return len(stale)


def flats_without_led(ledger: Ledger, night: str, ccds: Sequence[int]) -> list[dict[str, Any]]:
    """Raw flat files of a night whose exposure has no LED yet: on-disk files first within each exposure."""
    marks = ", ".join("?" * len(ccds))
    return ledger.rows(
        "SELECT e.filefracday, f.id AS file_id, f.url, f.relpath, f.state FROM exposures e "
        "JOIN files f ON f.exposure_id = e.id AND f.kind = 'raw' "
        f"WHERE e.night = ? AND e.imgtypecode = 'f' AND e.led IS NULL AND e.ccdid IN ({marks}) "
        "ORDER BY e.filefracday, f.state != 'on_disk', e.ccdid",
        (night, *ccds),
    )


def set_flat_led(conn: sqlite3.Connection, filefracday: str, led: int) -> None:
    """Record the LED of a flat exposure (all its CCDs)."""
    conn.execute("UPDATE exposures SET led = ? WHERE filefracday = ? AND imgtypecode = 'f'", (led, filefracday))


# --- the work graph ------------------------------------------------------------------------


def night_inputs(conn: sqlite3.Connection, night: str, ccds: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """Exposures of a night by CCD (by obsjd), each with its raw file id, science input ids and detrended ids."""
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
        row["detrended_outputs"] = [
            fid
            for (fid,) in conn.execute(
                "SELECT id FROM files WHERE exposure_id = ? AND kind = 'detrended' ORDER BY qid, id", (row["id"],)
            )
        ]
        by_ccd[int(row["ccdid"])].append(row)
    return by_ccd


def reopen_producers_of_needed_products(ledger: Ledger, conn: sqlite3.Connection) -> list[str]:
    """Done jobs whose product was deleted (evicted) but is pinned by a job still to run go back to
    ``waiting``, to be made again; returns their keys. A later pass of the graph pins their inputs."""
    rows = conn.execute(
        "SELECT DISTINCT j.id, j.key FROM jobs j JOIN files f ON f.producer_job = j.id "
        "JOIN pins p ON p.file_id = f.id JOIN jobs u ON u.id = p.job_id "
        "WHERE j.state = 'done' AND f.state = 'deleted' AND u.state IN ('waiting', 'ready', 'failed') ORDER BY j.id"
    ).fetchall()
    for job_id, key in rows:
        ledger.set_job_state(conn, job_id, "waiting", expect=("done",), error=None, attempts=0, worker_losses=0)
        ledger.event("plan", f"{key}: made again, its product was deleted and a new job needs it", job_id=job_id, conn=conn)
    return [str(key) for _job_id, key in rows]


def set_producer(conn: sqlite3.Connection, file_id: int, job_id: int) -> None:
    """Make ``job_id`` the producer of a file that has none yet."""
    conn.execute("UPDATE files SET producer_job = ? WHERE id = ? AND producer_job IS NULL", (job_id, file_id))


def set_file_exposure(conn: sqlite3.Connection, file_id: int, exposure_id: int, field: int | None) -> None:
    """Tie a product file to the exposure (and field) it comes from."""
    conn.execute("UPDATE files SET exposure_id = ?, field = ? WHERE id = ?", (exposure_id, field, file_id))
