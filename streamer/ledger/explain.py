"""The read-only queries behind ``streamer explain``: one file's row, history, pins and producer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streamer.ledger.core import Ledger

_JOB_COLUMNS = "j.id, j.kind, j.key, j.state, j.attempts, j.error, j.not_before, j.started, j.finished"


def files_named(ledger: Ledger, name: str) -> list[dict[str, Any]]:
    """File rows whose relpath is ``name``, or else whose file name is ``name``, by id."""
    exact = ledger.rows("SELECT * FROM files WHERE relpath = ?", (name,))
    if exact:
        return exact
    tail = "/" + name
    return ledger.rows("SELECT * FROM files WHERE substr(relpath, -length(?)) = ? ORDER BY id", (tail, tail))


def history(ledger: Ledger, file_id: int, job_id: int | None, limit: int = 200) -> list[dict[str, Any]]:
    """Events about the file, or about the job that produces it, oldest first (the newest ``limit``)."""
    rows = ledger.rows(
        "SELECT t, level, kind, message FROM events WHERE file_id = ? OR (job_id IS NOT NULL AND job_id = ?) "
        "ORDER BY id DESC LIMIT ?",
        (file_id, job_id, limit),
    )
    return rows[::-1]


def pinning_jobs(ledger: Ledger, file_id: int) -> list[dict[str, Any]]:
    """The jobs that pin the file (a job's pins go when it is done), by id."""
    return ledger.rows(
        f"SELECT {_JOB_COLUMNS} FROM pins p JOIN jobs j ON j.id = p.job_id WHERE p.file_id = ? ORDER BY j.id",
        (file_id,),
    )


def job(ledger: Ledger, job_id: int) -> dict[str, Any] | None:
    """One job with its ``exposure_id``, or None."""
    rows = ledger.rows(f"SELECT {_JOB_COLUMNS}, j.exposure_id FROM jobs j WHERE j.id = ?", (job_id,))
    return rows[0] if rows else None


def provenance(ledger: Ledger, file_id: int) -> str | None:
    """The provenance JSON recorded with the product, or None."""
    value = ledger.scalar("SELECT provenance FROM products WHERE file_id = ?", (file_id,))
    return None if value is None else str(value)


def job_inputs(ledger: Ledger, job_id: int, exposure_id: int | None, names: Sequence[str]) -> list[dict[str, Any]]:
    """The files a job reads, as far as the ledger tells, by id, each with its ``source``.

    ``pinned`` (while the job is unfinished; a done job's pins are gone), ``exposure`` (the
    downloaded files of its exposure), ``provenance`` (files its provenance names), and for an
    exposure without a calibration fallback event, ``same night`` (the done masters of its
    night, CCD and filter, which the graph gives it).
    """
    tails = ["/" + n for n in names]
    named = " OR ".join(f"substr(f.relpath, -length(:t{i})) = :t{i}" for i in range(len(tails))) or "0"
    params: dict[str, Any] = {"job": job_id, "exposure": exposure_id, **{f"t{i}": t for i, t in enumerate(tails)}}
    return ledger.rows(
        "SELECT f.id, f.relpath, f.kind, f.state, CASE "
        "  WHEN f.id IN (SELECT file_id FROM pins WHERE job_id = :job) THEN 'pinned' "
        "  WHEN f.exposure_id IS NOT NULL AND f.exposure_id = :exposure AND f.url != '' THEN 'exposure' "
        f"  WHEN {named} THEN 'provenance' ELSE 'same night' END AS source "
        "FROM files f WHERE (f.producer_job IS NULL OR f.producer_job != :job) AND ("
        "f.id IN (SELECT file_id FROM pins WHERE job_id = :job) "
        "OR (f.exposure_id IS NOT NULL AND f.exposure_id = :exposure AND f.url != '') "
        f"OR ({named}) "
        "OR f.producer_job IN (SELECT m.id FROM jobs m JOIN jobs e ON e.id = :job WHERE e.kind = 'exposure' "
        "  AND m.kind IN ('master_bias', 'master_flat') AND m.state = 'done' AND m.ccdid = e.ccdid "
        "  AND m.night = e.night AND (m.kind = 'master_bias' OR m.filtercode = e.filtercode) "
        "  AND NOT EXISTS (SELECT 1 FROM events WHERE kind = 'calibration' AND job_id = :job))"
        ") ORDER BY f.id",
        params,
    )
