"""``streamer explain NAME|PATH``: why one file is where it is, and whether it may go. Read-only.

For one file (its relpath, its absolute path under the root, or its file name): its ledger row
and history, the consumers that keep it and by which rule, the unfinished tasks that pin it,
the job that produced it and from which inputs, and whether it is erasable now, and if not,
what must happen first. It opens the ledger read-only, so it works while the daemon runs.
``--json`` prints the same as one object: ``file``, ``history``, ``consumers``, ``pinned_by``,
``producer`` (null for a downloaded file) and ``erasable`` (``now`` and the ``blockers``); ``file``
holds the ledger row, with ``kept_by`` (the consumers its ``keeps`` rows name) and ``refusals``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from streamer.config import Config, ConsumerConfig, format_size
from streamer.errors import StreamerError
from streamer.ledger import explain as queries
from streamer.ledger.core import Ledger
from streamer.rules.retention import FileFacts, consumer_keeps

#: Kinds the evictor never deletes (the catalogues are the service's result).
NEVER_ERASED = frozenset({"apcat"})


class UnknownFileError(StreamerError):
    """No file (or more than one) answers to the name given."""


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def relpath_for(config: Config, name: str) -> str:
    """A relpath under the root for an absolute path; any other name is returned as given."""
    if not os.path.isabs(name):
        return name
    root = os.path.abspath(config.storage.root)
    path = os.path.abspath(name)
    if os.path.commonpath([root, path]) != root or path == root:
        raise UnknownFileError(f"{name}: not under the storage root {root}")
    return Path(os.path.relpath(path, root)).as_posix()


def find_file(ledger: Ledger, config: Config, name: str) -> dict[str, Any]:
    """The one file row that ``name`` designates; UnknownFileError otherwise."""
    rows = queries.files_named(ledger, relpath_for(config, name))
    if not rows:
        raise UnknownFileError(f"{name}: no such file in the ledger")
    if len(rows) > 1:
        shown = ", ".join(r["relpath"] for r in rows[:3]) + (", ..." if len(rows) > 3 else "")
        raise UnknownFileError(f"{name}: {len(rows)} files have this name ({shown}); give the relpath")
    return rows[0]


def consumer_verdict(consumer: ConsumerConfig, row: dict[str, Any], recorded: list[str] | None = None) -> dict[str, Any]:
    """Whether ``consumer`` keeps the file, and by which of its rules (kind, fields, dates, targets).

    ``recorded``: the consumers the ledger's ``keeps`` rows name for the file (written at planning,
    where a target's footprint is known).
    """
    rule = {"kind": list(consumer.keep), "fields": list(consumer.fields) if consumer.fields is not None else "any",
            "dates": [str(consumer.start or "any"), str(consumer.end or "any")],
            "targets": len(consumer.targets) if consumer.targets is not None else "any"}  # fmt: skip
    night = dt.date.fromisoformat(row["night"]) if row.get("night") else None
    if night is None:
        return {"consumer": consumer.name, "keeps": False, "why": "the file has no night", "rule": rule}
    facts = FileFacts(kind=row["kind"], field=row.get("field"), night=night)
    if not consumer_keeps(dataclasses.replace(consumer, targets=None), facts):
        why = "kind not kept" if row["kind"] not in consumer.keep else "field or dates outside its selection"
        return {"consumer": consumer.name, "keeps": False, "why": why, "rule": rule}
    if consumer.targets is None:
        return {"consumer": consumer.name, "keeps": True, "why": "kind, field and dates match", "rule": rule}
    # the footprint comes from the search row at planning, which wrote the keeps rows (before them: files.kept)
    recorded = recorded or []
    keeps = consumer.name in recorded if recorded else bool(row["kept"])
    why = "a target's footprint matched at planning" if keeps else "no target's footprint matched at planning"
    return {"consumer": consumer.name, "keeps": keeps, "why": why, "rule": rule}


def producer_of(ledger: Ledger, config: Config, row: dict[str, Any]) -> dict[str, Any] | None:
    """The job that writes the file, with the inputs the ledger knows of (None for a downloaded file)."""
    if row.get("producer_job") is None:
        return None
    job = queries.job(ledger, row["producer_job"])
    if job is None:
        return None
    record = json.loads(queries.provenance(ledger, row["id"]) or "{}")
    names = [str(n) for n in record.get("frames_used", []) if isinstance(n, str)]
    names += [os.path.basename(str(record[k])) for k in ("raw_path",) if record.get(k)]
    inputs = queries.job_inputs(ledger, job["id"], job.get("exposure_id"), names)
    return {
        "id": job["id"], "kind": job["kind"], "key": job["key"], "state": job["state"], "attempts": job["attempts"],
        "error": job["error"], "started": _iso(job["started"]), "finished": _iso(job["finished"]),
        "inputs": [{k: r[k] for k in ("relpath", "kind", "state", "source")} for r in inputs],
    }  # fmt: skip


def erasable(row: dict[str, Any], keepers: list[str], pins: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the evictor may delete the file now, and if not, what must happen first.

    The same conditions as :meth:`Ledger.erasable`: on disk, not kept, pinned by no job, not a catalogue.
    """
    blockers = []
    if row["state"] != "on_disk":
        blockers.append(f"it is not on disk (it is {row['state']})")
    if row["kind"] in NEVER_ERASED:
        blockers.append("it is a catalogue (never erased)")
    if row["kept"]:
        who = ", ".join(keepers) if keepers else "a consumer of an earlier configuration (the ledger marks it kept)"
        blockers.append(f"kept by {who}")
    if pins:
        tasks = ", ".join(f"{p['key']} ({p['state']})" for p in pins)
        blockers.append(f"pinned until these tasks finish: {tasks}")
    return {"now": not blockers, "blockers": blockers}


def explain_file(ledger: Ledger, config: Config, name: str) -> dict[str, Any]:
    """Everything ``explain`` shows about one file, as JSON-ready values."""
    row = find_file(ledger, config, name)
    recorded = ledger.keepers(row["id"])
    consumers = [consumer_verdict(c, row, recorded) for c in config.consumers]
    pins = queries.pinning_jobs(ledger, row["id"])
    keepers = [c["consumer"] for c in consumers if c["keeps"]]
    file = {k: row[k] for k in ("id", "relpath", "kind", "state", "url", "night", "field", "qid", "expected_size",
                                "actual_size", "disk_bytes", "reserved_bytes", "attempts", "last_error", "http_status")}  # fmt: skip
    file |= {"path": str(config.storage.root / row["relpath"]), "kept": bool(row["kept"]), "kept_by": recorded,
             "refusals": row["refusals"], "updated": _iso(row["updated"]),
             "fetched_at": _iso(row["fetched_at"]), "last_used": _iso(row["last_used"]), "retry_at": _iso(row["retry_at"])}  # fmt: skip
    return {
        "file": file,
        "history": [{"time": _iso(e["t"]), "level": e["level"], "kind": e["kind"], "message": e["message"]}
                    for e in queries.history(ledger, row["id"], row.get("producer_job"))],  # fmt: skip
        "consumers": consumers,
        "pinned_by": [{**p, "not_before": _iso(p["not_before"]), "started": _iso(p["started"]),
                       "finished": _iso(p["finished"])} for p in pins],  # fmt: skip
        "producer": producer_of(ledger, config, row),
        "erasable": erasable(row, keepers, pins),
    }


def show(config: Config, name: str, *, as_json: bool) -> int:
    """Print the explanation; exit code 0 (an unknown name raises UnknownFileError, exit code 1)."""
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        report = explain_file(ledger, config, name)
    if as_json:
        print(json.dumps(report, sort_keys=True))
    else:
        print("\n".join(report_lines(report)))
    return 0


def report_lines(report: dict[str, Any]) -> list[str]:
    """The text form of the explanation."""
    f = report["file"]
    size = format_size(f["disk_bytes"]) if f["state"] == "on_disk" else "not on disk"
    lines = [f"{f['relpath']} ({f['kind']}, file {f['id']}): {f['state']} since {f['updated']}, {size}"]
    lines.append(f"  fetched {f['fetched_at'] or 'never'}; attempts {f['attempts']}; refusals {f['refusals']}; last error {f['last_error'] or 'none'}"
                 + (f"; retry after {f['retry_at']}" if f["retry_at"] else ""))  # fmt: skip
    for c in report["consumers"]:
        lines.append(f"  consumer {c['consumer']}: {'keeps it' if c['keeps'] else 'does not keep it'} ({c['why']}; "
                     f"keeps {', '.join(c['rule']['kind'])})")  # fmt: skip
    if not report["consumers"]:
        lines.append("  no consumers configured")
    pins = report["pinned_by"]
    lines.append("  pinned by: " + (", ".join(f"{p['key']} ({p['state']})" for p in pins) if pins else "no task"))
    producer = report["producer"]
    if producer is None:
        lines.append(f"  downloaded from {f['url']}" if f["url"] else "  produced by: unknown (registered by reconcile)")
    else:
        lines.append(f"  produced by {producer['key']} ({producer['state']}, finished {producer['finished'] or 'not yet'})")
        lines += [f"    input {i['relpath']} ({i['kind']}, {i['state']}; {i['source']})" for i in producer["inputs"]]
    verdict = report["erasable"]
    lines.append("  erasable now: yes" if verdict["now"] else "  erasable now: no: " + "; ".join(verdict["blockers"]))
    if report["history"]:
        lines.append("  history:")
        lines += [f"    {e['time']} {e['level']} {e['kind']}: {e['message']}" for e in report["history"]]
    return lines


__all__ = ["UnknownFileError", "explain_file", "show"]
