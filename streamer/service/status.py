"""``streamer status``: the queue, the disk budget, rates and recent errors, from the ledger only.

It opens the ledger read-only, so it works while the daemon runs. ``--json`` prints one
object; its fields (stable; new fields may be added, none removed or renamed):

- ``version``, ``generated_at`` (ISO 8601 UTC), ``ledger`` (path);
- ``service``: ``running`` (bool), ``pid``, ``started``, ``mode`` ("daemon" or "backfill"),
  ``executor`` (kind, workers, load);
- ``budget``: ``budget_bytes``, ``high_watermark_bytes``, ``low_watermark_bytes``,
  ``used_bytes`` (files on disk by the ledger's account), ``reserved_bytes``, ``free_bytes``;
- ``minimum_budget_bytes``: the smallest workable budget, as last computed by the service;
- ``files``: ``{kind: {state: {"files", "disk_bytes", "reserved_bytes", "expected_bytes"}}}``;
- ``jobs``: ``{kind: {state: count}}``;
- ``rates``: ``downloads_last_hour``, ``downloaded_bytes_last_hour``, ``jobs_done_last_hour``;
- ``eta_seconds``: unfinished jobs over the last hour's rate (null without a rate);
- ``erasable``: ``files``, ``bytes`` on disk that no consumer keeps and no job pins;
- ``consumers``: per consumer, from the ledger's ``keeps`` rows (which consumer keeps which
  file): ``name``, ``keep``; ``on_disk_files``, ``on_disk_bytes`` (what it keeps on disk, allocated
  bytes); ``lacking_files``, ``lacking_bytes`` (kept, not on disk, still to be downloaded, made or
  fetched again; expected bytes, 0 where unknown); ``owed_files`` (kept, not on disk and not
  coming: the archive refused them or they failed verification, ``missing`` or ``corrupt``,
  retried later or parked; or products whose task is blocked or parked, e.g. by a refused
  input); ``refusals`` (the archive's refusals of its files, counted in the ledger, not from
  events, so pruning does not reset it); ``missing_files``, ``missing_bytes`` (every kept file
  not on disk: lacking plus owed, with expected bytes);
- ``refusals``: every refusal by the archive, of any file;
- ``calibration_fallbacks``: frames that used another night's masters (``job``, ``message``);
- ``last_errors``: the latest warnings and errors (``time``, ``kind``, ``message``);
- ``stuck``: why the service cannot move (null when it can); ``outage``: the archive
  outage indicator recorded by the downloader (null when none);
- ``disk_pause``: while the running service waits for room on the filesystem: ``line``
  ("paused: disk full (N free): ..."), ``paused`` (downloads and new tasks held after a
  full-disk error, else only downloads wait), ``free_bytes``, ``need_bytes``, ``since``,
  ``reason``, ``downloads_waiting``; null otherwise;
- ``budget.in_effect_bytes``: the budget the service works to, below ``budget_bytes`` when the
  filesystem holds less (null before a service recorded it).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from streamer import __version__, clock
from streamer.config import Config, format_size
from streamer.ledger import status as queries
from streamer.ledger.core import Ledger
from streamer.ledger.disk import BUDGET_META_KEY, PAUSE_META_KEY, pause_line
from streamer.ledger.downloads import OUTAGE_META_KEY

if TYPE_CHECKING:
    from rich.console import Console


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _service_running(info: dict[str, Any]) -> bool:
    """The recorded service has not said it stopped, and its process is still a streamer."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("stopped") is not None:
        return False
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()  # noqa: SIM115
    except OSError:
        return False
    return b"streamer" in cmdline


def collect(config: Config, ledger: Ledger) -> dict[str, Any]:
    """Everything status shows, as plain JSON-ready values."""
    now = clock.now()
    files: dict[str, dict[str, Any]] = defaultdict(dict)
    used = reserved = 0
    for (kind, state), figures in ledger.bytes_by_kind_and_state().items():
        files[kind][state] = figures
        used += figures["disk_bytes"]
        reserved += figures["reserved_bytes"]
    jobs: dict[str, dict[str, int]] = defaultdict(dict)
    for (kind, state), n in ledger.jobs_by_kind_and_state().items():
        jobs[kind][state] = n
    outage_state = json.loads(ledger.get_meta(OUTAGE_META_KEY) or "{}")
    minimum = ledger.get_meta("minimum_budget_bytes")
    service = _service(config, ledger)
    in_effect = ledger.get_meta(BUDGET_META_KEY)
    return {
        "version": __version__,
        "generated_at": _iso(now),
        "ledger": str(ledger.path),
        "service": service,
        "budget": _budget(config, used, reserved) | {"in_effect_bytes": int(in_effect) if in_effect else None},
        "minimum_budget_bytes": int(minimum) if minimum is not None else None,
        "files": files,
        "jobs": jobs,
        **_rates(ledger, now),
        "erasable": queries.erasable_totals(ledger),
        "consumers": _consumers(config, ledger),
        "refusals": queries.refusals_total(ledger),
        "calibration_fallbacks": [
            {"job": r["job_id"], "time": _iso(r["t"]), "message": r["message"]} for r in queries.calibration_events(ledger)
        ],
        "last_errors": [
            {"time": _iso(r["t"]), "level": r["level"], "kind": r["kind"], "message": r["message"]}
            for r in queries.recent_problems(ledger)
        ],
        "stuck": queries.stuck_reason(ledger),
        "outage": outage_state if outage_state.get("outage") else None,
        "disk_pause": _disk_pause(ledger) if service["running"] else None,
    }


def _disk_pause(ledger: Ledger) -> dict[str, Any] | None:
    """The running service's disk pause (``streamer.service.diskspace``), or None while nothing waits for room."""
    state = json.loads(ledger.get_meta(PAUSE_META_KEY) or "{}")
    line = pause_line(state)
    if line is None:
        return None
    return {"line": line, **{k: state.get(k) for k in ("paused", "free_bytes", "need_bytes", "reason", "downloads_waiting")},
            "since": _iso(state.get("since"))}  # fmt: skip


def _service(config: Config, ledger: Ledger) -> dict[str, Any]:
    info = json.loads(ledger.get_meta("service") or "{}")
    return {
        "running": _service_running(info),
        "pid": info.get("pid"),
        "started": _iso(info.get("started")),
        "mode": "backfill" if info.get("burst") else "daemon",
        "executor": info.get("executor", {"kind": config.compute.executor}),
    }


def _budget(config: Config, used: int, reserved: int) -> dict[str, int]:
    budget = config.storage.budget
    return {
        "budget_bytes": budget,
        "high_watermark_bytes": int(budget * config.storage.high_watermark),
        "low_watermark_bytes": int(budget * config.storage.low_watermark),
        "used_bytes": used,
        "reserved_bytes": reserved,
        "free_bytes": budget - used - reserved,
    }


def _rates(ledger: Ledger, now: float) -> dict[str, Any]:
    """The last hour's downloads and jobs, and the time left at that pace."""
    hour_ago = now - 3600
    downloads = queries.downloads_since(ledger, hour_ago)
    jobs_done_hour = queries.jobs_done_since(ledger, hour_ago)
    unfinished = queries.unfinished_jobs(ledger)
    return {
        "rates": {
            "downloads_last_hour": downloads["n"],
            "downloaded_bytes_last_hour": downloads["bytes"],
            "jobs_done_last_hour": jobs_done_hour,
        },
        "eta_seconds": (unfinished / jobs_done_hour * 3600) if jobs_done_hour and unfinished else (0 if not unfinished else None),
    }


def _consumers(config: Config, ledger: Ledger) -> list[dict[str, Any]]:
    out = []
    for consumer in config.consumers:
        figures = queries.consumer_figures(ledger, consumer.name)
        out.append({"name": consumer.name, "keep": list(consumer.keep), **figures})
    return out


#: File states shown as columns of the text status.
FILE_COLUMNS = ("on_disk", "wanted", "reserved", "downloading", "missing", "deleted")


def show(config: Config, *, as_json: bool) -> int:
    """Print the status; exit code 0."""
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        report = collect(config, ledger)
    if as_json:
        print(json.dumps(report, sort_keys=True))
        return 0
    _print_report(report)
    return 0


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console  # imported here: not for --json, which monitoring calls often
    from rich.table import Table
    console = Console(highlight=False, soft_wrap=True)
    service = report["service"]
    state = f"running (pid {service['pid']}, {service['mode']})" if service["running"] else "not running"
    console.print(f"[bold]ztf-streamer {report['version']}[/bold]  service {state}  ledger {report['ledger']}")
    budget = report["budget"]
    minimum = report["minimum_budget_bytes"]
    in_effect = budget["in_effect_bytes"]
    capped = f", {format_size(in_effect)} in effect: the filesystem holds no more" if in_effect and in_effect < budget["budget_bytes"] else ""
    console.print(
        f"disk: {format_size(budget['used_bytes'])} used + {format_size(budget['reserved_bytes'])} reserved "
        f"of {format_size(budget['budget_bytes'])}{capped} (high {format_size(budget['high_watermark_bytes'])}, "
        f"low {format_size(budget['low_watermark_bytes'])}); minimum workable "
        f"{format_size(minimum) if minimum is not None else 'not yet computed'}"
    )
    jobs = Table(title="tasks by stage and state")
    states = ("waiting", "ready", "running", "done", "failed", "parked", "blocked")
    jobs.add_column("stage")
    for s in states:
        jobs.add_column(s, justify="right")
    for kind, by_state in sorted(report["jobs"].items()):
        jobs.add_row(kind, *(str(by_state.get(s, 0)) for s in states))
    console.print(jobs)
    files = Table(title="files by kind")
    files.add_column("kind")
    for s in FILE_COLUMNS:
        files.add_column(s, justify="right")
    def cell(by_state: dict[str, Any], s: str) -> str:
        figures = by_state.get(s)
        if not figures:
            return "0"
        size = figures["disk_bytes"] if s == "on_disk" else figures["expected_bytes"]
        return f"{figures['files']} ({format_size(size)})"

    for kind, by_state in sorted(report["files"].items()):
        files.add_row(kind, *(cell(by_state, s) for s in FILE_COLUMNS))
    console.print(files)
    rates = report["rates"]
    eta = report["eta_seconds"]
    console.print(
        f"last hour: {rates['downloads_last_hour']} downloads ({format_size(rates['downloaded_bytes_last_hour'])}), "
        f"{rates['jobs_done_last_hour']} tasks done; ETA "
        + ("done" if eta == 0 else f"{eta / 60:.0f} min" if eta else "unknown")
    )
    console.print(f"erasable now: {report['erasable']['files']} files, {format_size(report['erasable']['bytes'])}")
    for consumer in report["consumers"]:
        console.print(
            f"consumer {consumer['name']} (keeps {', '.join(consumer['keep'])}): "
            f"{consumer['on_disk_files']} on disk ({format_size(consumer['on_disk_bytes'])}), "
            f"{consumer['lacking_files']} still to come ({format_size(consumer['lacking_bytes'])}), "
            f"{consumer['owed_files']} owed (refused by the archive, corrupt, or their task blocked; "
            f"{consumer['refusals']} refusals)"
        )
    if report["calibration_fallbacks"]:
        console.print("calibrations from another night:")
        for fallback in report["calibration_fallbacks"][:10]:
            console.print(f"  {fallback['message']}")
    _print_problems(console, report)


def _print_problems(console: Console, report: dict[str, Any]) -> None:
    """What holds the service back, and the last errors."""
    if report["stuck"]:
        console.print(f"[bold red]stuck:[/bold red] {report['stuck']}")
    if report["disk_pause"]:
        pause = report["disk_pause"]
        console.print(f"[bold yellow]{pause['line']}[/bold yellow]" + (f" ({pause['reason']})" if pause["reason"] else ""))
    if report["outage"]:
        console.print(f"[bold yellow]archive outage:[/bold yellow] {report['outage']}")
    if report["last_errors"]:
        console.print("last errors:")
        for error in report["last_errors"]:
            console.print(f"  {error['time']} {error['level']} {error['kind']}: {error['message']}")


__all__ = ["collect", "show"]
