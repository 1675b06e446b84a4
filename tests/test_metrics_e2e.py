"""The Prometheus endpoint of a real service run on small simulated frames, against ``streamer status``.

The service runs as ``streamer run`` with the night as its configured backfill range: it does the
backfill, removes what no consumer keeps and then idles, so the last scrape and status are taken while nothing can move and must
agree exactly. During the run figures move between two reads, so there only counts that never
go down are checked, sandwiched: scrape <= status taken after it <= the next scrape.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e import NIGHT, config_for, status_json, streamer_cmd, wait_for
from streamer.demo import DEMO_BIAS_SKIP, serve_archive
from streamer.sim.generate import generate_night

UNLIMITED = 50 * 10**9
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    generate_night(out, NIGHT, ccds=(13,), n_exposures=3, flats_per_led=2, n_biases=8, seed=5, shape="small", jobs=2)
    return out


@pytest.fixture(scope="module")
def base_url(archive: Path) -> Iterator[str]:
    with serve_archive(archive) as url:
        yield url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples | None:
    """Every sample at /metrics keyed by (name, sorted labels); None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            text = response.read().decode()
    except OSError:
        return None
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def by_labels(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    return {tuple(v for _k, v in labels): value for (n, labels), value in samples.items() if n == name}


def done_tasks(samples: Samples) -> float:
    return sum(v for (_kind, state), v in by_labels(samples, "streamer_tasks").items() if state == "done")


def fetched_files(samples: Samples) -> float:
    return by_labels(samples, "streamer_downloads_total").get(("ok",), 0)


def test_metrics_agree_with_status(tmp_path: Path, archive: Path, base_url: str) -> None:
    port = free_port()
    extra = f'\n[backfill]\nranges = [["{NIGHT}", "{NIGHT}"]]\nccds = [13]\n\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    config = config_for(tmp_path, archive, base_url, budget=UNLIMITED, extra=extra)
    t0 = time.time()
    process = subprocess.Popen(streamer_cmd(config, "run"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: scrape(port) is not None, timeout=180), "the metrics endpoint never answered"
        finished = False
        rounds = 0
        while not finished:
            before = scrape(port)
            report = status_json(config)
            after = scrape(port)
            assert before is not None and after is not None
            done = sum(states.get("done", 0) for states in report["jobs"].values())
            assert done_tasks(before) <= done <= done_tasks(after)
            assert fetched_files(before) <= fetched_files(after)
            unfinished = sum(n for states in report["jobs"].values() for s, n in states.items() if s != "done")
            in_flight = sum(report["files"].get(kind, {}).get(s, {}).get("files", 0)
                            for kind in report["files"] for s in ("reserved", "downloading"))  # fmt: skip
            swept = report["erasable"]["files"] == 0  # a daemon whose work is done removes what no one keeps
            finished = bool(report["jobs"]) and unfinished == 0 and in_flight == 0 and swept
            rounds += 1
            assert rounds < 300 and process.poll() is None, "the run did not finish"
            time.sleep(0.5)
        # idle now: nothing moves, so scrape, status, scrape must agree exactly
        first, report, last = scrape(port), status_json(config), scrape(port)
        assert first is not None and last is not None
        _compare_at_rest(first, report, archive, t0)
        _compare_at_rest(last, report, archive, t0)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert scrape(port) is None, "the metrics endpoint still answers after the service stopped"


def _compare_at_rest(samples: Samples, report: dict[str, object], archive: Path, t0: float) -> None:
    budget = report["budget"]
    assert isinstance(budget, dict)
    single = {name: value for (name, labels), value in samples.items() if not labels}
    assert single["streamer_disk_used_bytes"] == budget["used_bytes"] > 0
    assert single["streamer_disk_reserved_bytes"] == budget["reserved_bytes"]
    assert single["streamer_disk_budget_bytes"] == budget["budget_bytes"] == UNLIMITED
    assert single["streamer_disk_high_watermark_bytes"] == budget["high_watermark_bytes"]
    assert single["streamer_disk_low_watermark_bytes"] == budget["low_watermark_bytes"]
    assert single["streamer_disk_minimum_budget_bytes"] == report["minimum_budget_bytes"]
    erasable = report["erasable"]
    assert isinstance(erasable, dict)
    assert single["streamer_erasable_bytes"] == erasable["bytes"] and single["streamer_erasable_files"] == erasable["files"]
    files = report["files"]
    assert isinstance(files, dict)
    expected_files = {(k, s): f["files"] for k, states in files.items() for s, f in states.items()}
    assert by_labels(samples, "streamer_files") == expected_files
    expected_disk = {(k, s): f["disk_bytes"] for k, states in files.items() for s, f in states.items()}
    assert by_labels(samples, "streamer_files_disk_bytes") == expected_disk
    jobs = report["jobs"]
    assert isinstance(jobs, dict)
    assert by_labels(samples, "streamer_tasks") == {(k, s): n for k, states in jobs.items() for s, n in states.items()}
    assert by_labels(samples, "streamer_task_duration_seconds_count") == {(k,): states["done"] for k, states in jobs.items()}
    # downloads, against the archive itself: every raw of the night but the skipped first biases came once
    raws = sorted((archive / "raw").rglob("*.fits.fz"))
    skipped = sorted(p for p in raws if p.name.endswith("_b.fits.fz"))[:DEMO_BIAS_SKIP]
    raws = [p for p in raws if p not in skipped]
    assert files["raw"]["deleted"]["files"] == len(raws) and "on_disk" not in files["raw"]  # fetched, used, swept
    downloaded = {kind for kind in files if kind in ("raw", "sciimg", "sciimg_header", "mskimg")}
    fetched = fetched_files(samples)
    assert fetched == sum(files[k].get(state, {}).get("files", 0) for k in downloaded for state in ("on_disk", "deleted"))
    assert by_labels(samples, "streamer_downloaded_bytes_total")[("ok",)] >= sum(p.stat().st_size for p in raws)
    assert single["streamer_archive_requests_total"] >= fetched
    assert single["streamer_archive_outage"] == 0 and single["streamer_stuck"] == 0
    now = time.time()
    for what in ("plan", "download", "task"):
        assert t0 <= single[f"streamer_last_{what}_timestamp_seconds"] <= now, what
    rates = report["rates"]
    assert isinstance(rates, dict)
    assert rates["downloads_last_hour"] == fetched
