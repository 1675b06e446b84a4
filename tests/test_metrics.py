"""The metrics endpoint on a ledger built by hand: the listen key, the loopback default, the figures, ops/ files."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamer.config import load_config
from streamer.errors import ConfigError
from streamer.ledger import downloads
from streamer.ledger.core import Ledger
from streamer.service.metrics import build_registry, start_metrics

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path, text: str, listen: str | None) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text + (f'\n[metrics]\nlisten = "{listen}"\n' if listen is not None else ""))
    return path


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("9464", ("127.0.0.1", 9464)), (":9464", ("127.0.0.1", 9464)), ("0.0.0.0:9100", ("0.0.0.0", 9100)),
     ("[::1]:9464", ("::1", 9464)), ("metrics.example.org:80", ("metrics.example.org", 80))],
)  # fmt: skip
def test_listen_parses(tmp_path: Path, minimal_config_text: str, listen: str, expected: tuple[str, int]) -> None:
    assert load_config(_config(tmp_path, minimal_config_text, listen)).metrics.listen == expected


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:99999", "127.0.0.1:0", "host name:80", "1.2.3.4:port", ""])
def test_malformed_listen_is_refused_naming_the_key(tmp_path: Path, minimal_config_text: str, listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, minimal_config_text, listen))
    message = str(info.value)
    assert "metrics.listen" in message and "\n" not in message


def test_metrics_off_by_default_and_outside_the_config_hash(tmp_path: Path, minimal_config_text: str) -> None:
    plain = load_config(_config(tmp_path, minimal_config_text, None))
    assert plain.metrics.listen is None
    with_metrics = load_config(_config(tmp_path, minimal_config_text, "9464"))
    assert with_metrics.config_hash() == plain.config_hash()  # operational: products keep their provenance hash


def _ledger_with_a_download_and_a_task() -> Ledger:
    ledger = Ledger.memory()
    with ledger.transaction() as conn:
        raw = ledger.want_file(conn, relpath="raw/a.fits.fz", kind="raw", url="http://archive/a", expected_size=1000)
        ledger.want_file(conn, relpath="raw/b.fits.fz", kind="raw", url="http://archive/b", expected_size=2000)
        job = ledger.add_job(conn, kind="exposure", key="exposure:a", pins=[raw])
    assert ledger.reserve(raw, 1000, budget=10**6)
    downloads.mark_downloading(ledger, raw)
    downloads.mark_on_disk(ledger, raw, disk_bytes=4096, actual_size=1000, http_status=200)
    with ledger.transaction() as conn:
        ledger.set_job_state(conn, job, "ready")
        ledger.set_job_state(conn, job, "running", started=100.0)
        ledger.set_job_state(conn, job, "done", finished=107.0)
    return ledger


def _scrape_text(registry: object, host: str, port: int) -> tuple[str, list[tuple[str, int]]]:
    async def go() -> tuple[str, list[tuple[str, int]]]:
        runner = await start_metrics(registry, host, port)  # type: ignore[arg-type]
        try:
            addresses = [tuple(a[:2]) for a in runner.addresses]
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                return await response.text(), addresses  # type: ignore[return-value]
        finally:
            await runner.cleanup()

    return asyncio.run(go())


def test_server_binds_loopback_by_default_and_reports_the_ledger(tmp_path: Path, minimal_config_text: str) -> None:
    port = _free_port()
    config = load_config(_config(tmp_path, minimal_config_text, str(port)))
    assert config.metrics.listen is not None
    ledger = _ledger_with_a_download_and_a_task()
    text, addresses = _scrape_text(build_registry(config, ledger, lambda: 123), *config.metrics.listen)
    assert addresses == [("127.0.0.1", port)]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("streamer_disk_used_bytes", ())] == 4096
    assert samples[("streamer_disk_budget_bytes", ())] == 10 * 10**9
    assert samples[("streamer_disk_high_watermark_bytes", ())] == 9 * 10**9
    assert samples[("streamer_disk_overhead_bytes", ())] == 123
    assert samples[("streamer_files", (("kind", "raw"), ("state", "on_disk")))] == 1
    assert samples[("streamer_files", (("kind", "raw"), ("state", "wanted")))] == 1
    assert samples[("streamer_tasks", (("kind", "exposure"), ("state", "done")))] == 1
    assert samples[("streamer_downloads_total", (("outcome", "ok"),))] == 1
    assert samples[("streamer_downloaded_bytes_total", (("outcome", "ok"),))] == 1000
    assert samples[("streamer_archive_requests_total", ())] == 1
    # the task ran 7 s: outside the 5 s bucket, inside the 15 s one
    assert samples[("streamer_task_duration_seconds_bucket", (("kind", "exposure"), ("le", "5.0")))] == 0
    assert samples[("streamer_task_duration_seconds_bucket", (("kind", "exposure"), ("le", "15.0")))] == 1
    assert samples[("streamer_task_duration_seconds_sum", (("kind", "exposure"),))] == 7
    assert samples[("streamer_last_task_timestamp_seconds", ())] == 107
    assert samples[("streamer_archive_outage", ())] == 0
    assert ("streamer_last_plan_timestamp_seconds", ()) not in samples  # nothing planned yet


def test_a_taken_port_is_one_error_naming_the_key(tmp_path: Path, minimal_config_text: str) -> None:
    from streamer.errors import StreamerError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(_config(tmp_path, minimal_config_text, str(port)))
        with pytest.raises(StreamerError, match="metrics.listen"):
            _scrape_text(build_registry(config, Ledger.memory(), lambda: 0), "127.0.0.1", port)


def _exposed_names(tmp_path: Path, minimal_config_text: str) -> set[str]:
    ledger = _ledger_with_a_download_and_a_task()
    config = load_config(_config(tmp_path, minimal_config_text, None))
    text = build_registry(config, ledger, lambda: 0)
    from prometheus_client import generate_latest

    return {s.name for f in text_string_to_metric_families(generate_latest(text).decode()) for s in f.samples}


def test_dashboard_uses_only_exposed_metrics(tmp_path: Path, minimal_config_text: str) -> None:
    dashboard = json.loads((REPO / "ops" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bstreamer_[a-z_]+", expr)}
    assert used and used <= _exposed_names(tmp_path, minimal_config_text)


def test_alert_rules_use_only_exposed_metrics(tmp_path: Path, minimal_config_text: str) -> None:
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load((REPO / "ops" / "prometheus-alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {
        "StreamerDiskAboveHighWatermark", "StreamerStuck", "StreamerArchiveOutage", "StreamerNoTaskFinished"
    }  # fmt: skip
    used = {name for r in rules for name in re.findall(r"\bstreamer_[a-z_]+", r["expr"])}
    assert used and used <= _exposed_names(tmp_path, minimal_config_text)
