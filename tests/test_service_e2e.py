"""The whole service against the simulated archive on loopback: real CLI, real SQLite, real process pool.

Small frames (260 x 256 quadrants) keep the default suite fast; the full-size runs are in
``test_service_full.py`` (marked slow).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from e2e import (
    NIGHT,
    DiskSampler,
    allocated_bytes,
    backfill_args,
    catalogues,
    config_for,
    run_cli,
    status_json,
    store_of,
    streamer_cmd,
    unfinished_files,
    wait_for,
)
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night

CCDS = (13,)
UNLIMITED = 50 * 10**9


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    generate_night(out, NIGHT, ccds=CCDS, n_exposures=4, flats_per_led=2, n_biases=8, seed=3, shape="small", jobs=2)
    return out


@pytest.fixture(scope="module")
def base_url(archive: Path) -> Iterator[str]:
    with serve_archive(archive) as url:
        yield url


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, archive: Path, base_url: str) -> dict[str, list[dict[str, object]]]:
    """Catalogues of an uninterrupted run with an unlimited budget."""
    tmp = tmp_path_factory.mktemp("reference")
    config = config_for(tmp, archive, base_url, budget=UNLIMITED)
    result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr
    rows = catalogues(store_of(config))
    assert len(rows) == 4 * len(CCDS)
    return rows


def _bytes_through(store: Path) -> int:
    with sqlite3.connect(store / "ledger.sqlite") as conn:
        return int(conn.execute("SELECT SUM(actual_size) FROM files").fetchone()[0])


def _raw_bytes(archive: Path) -> int:
    return sum(p.stat().st_size for p in (archive / "raw").rglob("*.fits.fz"))


def test_disk_meter_counts_allocated_bytes_and_not_links(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "small").write_bytes(b"x" * 10)
    (root / "a" / "b" / "large").write_bytes(random.Random(1).randbytes(300_000))
    (outside / "huge").write_bytes(bytes(5_000_000))
    (root / "link-to-file").symlink_to(outside / "huge")
    (root / "a" / "link-to-dir").symlink_to(outside, target_is_directory=True)
    used = allocated_bytes(root)
    # at least the bytes written, each file rounded up to whole blocks; nothing of the 5 MB behind the links
    assert 300_010 <= used <= 300_010 + 2 * 65_536
    assert allocated_bytes(tmp_path / "absent") == 0


def test_backfill_writes_catalogues_and_status_shows_it(reference: dict[str, list[dict[str, object]]], tmp_path: Path, archive: Path, base_url: str) -> None:
    assert all(len(rows) > 0 for rows in reference.values())
    config = config_for(tmp_path, archive, base_url, budget=UNLIMITED)
    assert run_cli(config, *backfill_args()).returncode == 0
    report = status_json(config)
    assert report["jobs"]["exposure"] == {"done": 4 * len(CCDS)}
    assert report["jobs"]["master_bias"] == {"done": len(CCDS)}
    assert report["minimum_budget_bytes"] > 0
    assert report["budget"]["used_bytes"] <= report["budget"]["budget_bytes"]
    # at the end of a backfill only what someone keeps remains: the catalogues
    kinds_on_disk = {kind for kind, states in report["files"].items() if states.get("on_disk", {}).get("files")}
    assert kinds_on_disk == {"apcat"}
    assert catalogues(store_of(config)) == reference


def test_tight_budget_never_exceeded_and_same_catalogues(
    reference: dict[str, list[dict[str, object]]], tmp_path: Path, archive: Path, base_url: str
) -> None:
    probe = config_for(tmp_path, archive, base_url, budget=UNLIMITED, name="probe.toml")
    assert run_cli(probe, *backfill_args()).returncode == 0
    minimum = status_json(probe)["minimum_budget_bytes"]
    # 1.25 x: before its masters exist, a new store estimates them from the raw flats, a little high
    budget = max(_raw_bytes(archive) // 4, int(1.25 * minimum))
    config = config_for(tmp_path, archive, base_url, budget=budget)
    store_of(config).mkdir()
    with DiskSampler(store_of(config)) as sampler:
        result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr
    # small frames: masters outweigh the raws, so the test is that everything that passed through
    # the store (raws, headers, masks, masters, catalogues) could not have fitted without eviction
    assert budget < _bytes_through(store_of(config)), "the budget must force eviction"
    assert sampler.peak <= budget, f"disk use peaked at {sampler.peak} B over the budget of {budget} B"
    assert len(sampler.samples) > 5
    assert catalogues(store_of(config)) == reference


def test_budget_below_minimum_is_refused_with_the_number(tmp_path: Path, archive: Path, base_url: str) -> None:
    config = config_for(tmp_path, archive, base_url, budget=200_000)
    result = run_cli(config, *backfill_args())
    assert result.returncode == 2
    assert "minimum workable budget" in result.stderr and "Traceback" not in result.stderr


def _wait_while_running(process: subprocess.Popen[str], predicate: Callable[[], bool], timeout: float) -> bool:
    """Whether ``predicate`` held while ``process`` was still running, within ``timeout`` seconds."""
    return wait_for(lambda: process.poll() is not None or predicate(), timeout, period=0.05) and process.poll() is None


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=60)


def test_sigterm_stops_within_30_s_and_the_next_start_continues(
    reference: dict[str, list[dict[str, object]]], tmp_path: Path, archive: Path, base_url: str
) -> None:
    config = config_for(tmp_path, archive, base_url, budget=UNLIMITED)
    store = store_of(config)
    ledger = store / "ledger.sqlite"
    process = subprocess.Popen(streamer_cmd(config, *backfill_args()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the first job done (a master) leaves the exposures to do: the signal lands mid-backfill
        assert _wait_while_running(process, lambda: _jobs_done(ledger) > 0, timeout=120), (
            f"the backfill exited (code {process.returncode}) before a job was done"
        )
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        _stop(process)
    assert elapsed < 30
    # a backfill stopped before its end says so and exits 1 (README: 0 only when every task is done)
    assert process.returncode == 1, stdout + stderr
    assert "backfill incomplete" in stdout, stdout + stderr
    assert "Traceback" not in stderr, stderr
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        jobs = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        on_disk = [r[0] for r in conn.execute("SELECT relpath FROM files WHERE state = 'on_disk'")]
    assert jobs.get("done", 0) > 0 and sum(jobs.values()) > jobs["done"], jobs  # stopped between the first and the last job
    assert "running" not in jobs, jobs  # the grace period let running tasks finish and be recorded
    assert all((store / relpath).is_file() for relpath in on_disk)
    result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr
    assert catalogues(store) == reference


def _jobs_done(ledger: Path) -> int:
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done'").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_second_writer_refused_while_status_works(tmp_path: Path, archive: Path, base_url: str) -> None:
    config = config_for(tmp_path, archive, base_url, budget=UNLIMITED)
    process = subprocess.Popen(streamer_cmd(config, *backfill_args()), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        ledger = store_of(config) / "ledger.sqlite"
        lock = store_of(config) / "ledger.sqlite.lock"
        assert _wait_while_running(process, lambda: ledger.exists() and lock.exists(), timeout=60), (
            f"the first backfill exited (code {process.returncode}) before it held the ledger"
        )
        second = run_cli(config, *backfill_args(), timeout=60)
        report = status_json(config)
        assert process.poll() is None, "the first backfill ended before the second one was tried"
        assert second.returncode == 1, second.stdout + second.stderr
        assert "in use by a running service" in second.stderr
        assert report["service"]["running"] is True
    finally:
        _stop(process)
    # the lock died with the killed service: a restart is not refused
    result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr


def _covers(sciimg: Path, ra: float, dec: float) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        header = fits.getheader(sciimg)
        x, y = WCS(header).world_to_pixel_values(ra, dec)
    return bool(-0.5 <= x < header["NAXIS1"] - 0.5 and -0.5 <= y < header["NAXIS2"] - 0.5)


def test_consumers_keep_exactly_their_files(tmp_path: Path, archive: Path, base_url: str) -> None:
    sciimgs = sorted(archive.rglob("*_sciimg.fits"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        ra, dec = WCS(fits.getheader(sciimgs[-1])).pixel_to_world_values(100.0, 120.0)
    covering = {p for p in sciimgs if _covers(p, float(ra), float(dec))}
    assert 0 < len(covering) < len(sciimgs)
    targets = tmp_path / "supernovae.csv"
    targets.write_text(f"ra,dec,radius_deg,start,end\n{float(ra)},{float(dec)},0.0003,{NIGHT},{NIGHT}\n")
    extra = (
        '\n[[consumers]]\nname = "headers"\nkeep = ["sciimg_header", "mskimg"]\nfields = [655]\n'
        f'\n[[consumers]]\nname = "scene"\nkeep = ["sciimg", "mskimg"]\ntargets = "{targets}"\n'
    )
    config = config_for(tmp_path, archive, base_url, budget=UNLIMITED, extra=extra)
    result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr
    store = store_of(config)
    kept = {p.relative_to(store).as_posix() for p in (store / "sci").rglob("*") if p.is_file()}
    expected = set()
    for sciimg in covering:
        relpath = sciimg.relative_to(archive).as_posix()
        expected |= {relpath, relpath.replace("_sciimg.fits", "_mskimg.fits.fz")}
    for sciimg in sciimgs:
        relpath = sciimg.relative_to(archive).as_posix()
        if "_000655_" in relpath:
            expected |= {relpath.replace("_sciimg.fits", "_sciimg.header.fits"), relpath.replace("_sciimg.fits", "_mskimg.fits.fz")}
    assert kept == expected
    assert not any((store / "raw").rglob("*.fits.fz"))
    assert not any((store / "masters").rglob("*.fits"))
    assert len(catalogues(store)) == 4 * len(CCDS)


def test_daemon_runs_its_ranges_and_stops_on_sigterm(
    reference: dict[str, list[dict[str, object]]], tmp_path: Path, archive: Path, base_url: str
) -> None:
    config = config_for(tmp_path, archive, base_url, budget=UNLIMITED)
    config.write_text(config.read_text() + f'\n[backfill]\nranges = [["{NIGHT}", "{NIGHT}"]]\nccds = [13]\n')
    process = subprocess.Popen(streamer_cmd(config, "run"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: len(catalogues(store_of(config))) == len(reference), timeout=300)
        assert status_json(config)["service"]["mode"] == "daemon"
    finally:
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        assert process.stderr is not None
        process.stderr.close()
    assert code == 0 and time.monotonic() - started < 30
    assert catalogues(store_of(config)) == reference


def test_missing_flats_use_the_nearest_night(tmp_path: Path, base_url: str) -> None:
    del base_url
    archive = tmp_path / "archive"
    second = NIGHT + dt.timedelta(days=1)
    generate_night(archive, NIGHT, ccds=(13,), n_exposures=2, flats_per_led=2, n_biases=8, seed=3, shape="small")
    generate_night(
        archive, second, ccds=(13,), n_exposures=3, flats_per_led=2, n_biases=8, seed=4, shape="small",
        flat_filters=("zr", "zi"),
    )  # fmt: skip
    with serve_archive(archive) as url:
        config = config_for(tmp_path, archive, url, budget=UNLIMITED)
        _focal_plane(config)
        result = run_cli(config, *backfill_args(NIGHT, second))
    assert result.returncode == 0, result.stdout + result.stderr
    report = status_json(config)
    fallbacks = [f["message"] for f in report["calibration_fallbacks"]]
    assert any("master flat for zg" in m and NIGHT.isoformat() in m and "its focal-plane factor" in m for m in fallbacks), fallbacks
    # the second night made no zg factors: its zg exposures take the first night's, with its flat
    zg_second = [t for p, t in catalogues(store_of(config)).items() if f"ztf_{second:%Y%m%d}" in p and "_zg_" in p]
    assert zg_second and all(row["focalplane_factor"] == 1.0 for table in zg_second for row in table)  # one CCD: 1


def _focal_plane(config: Path) -> None:
    text = config.read_text()
    assert "\n[detrend]\n" in text
    config.write_text(text.replace("\n[detrend]\n", '\n[detrend]\nflat_normalisation = "focalplane"\n', 1))


def test_a_nearest_night_master_evicted_by_an_earlier_backfill_is_made_again(tmp_path: Path) -> None:
    """The first backfill ends by erasing its masters; the second night, without zg flats, needs the
    first night's zg master: it is made again (its flats fetched again), not waited for or blocked."""
    archive = tmp_path / "archive"
    second = NIGHT + dt.timedelta(days=1)
    generate_night(archive, NIGHT, ccds=(13,), n_exposures=2, flats_per_led=2, n_biases=8, seed=3, shape="small", filters=("zg",))
    generate_night(
        archive, second, ccds=(13,), n_exposures=1, flats_per_led=2, n_biases=8, seed=4, shape="small",
        filters=("zg",), flat_filters=("zr",),
    )  # fmt: skip
    with serve_archive(archive) as url:
        config = config_for(tmp_path, archive, url, budget=UNLIMITED)
        _focal_plane(config)
        first = run_cli(config, *backfill_args(NIGHT, NIGHT))
        assert first.returncode == 0, first.stdout + first.stderr
        assert not any((store_of(config) / "masters").rglob("*.fits"))  # swept at the end of the first backfill
        result = run_cli(config, *backfill_args(second, second))
    assert result.returncode == 0, result.stdout + result.stderr
    report = status_json(config)
    assert report["jobs"]["exposure"] == {"done": 3}
    fallbacks = [f["message"] for f in report["calibration_fallbacks"]]
    assert any("master flat for zg" in m and NIGHT.isoformat() in m for m in fallbacks), fallbacks
    # the first night's focal-plane factors were swept too and are not made again: flagged, not guessed
    assert any("without a focal-plane factor" in m for m in fallbacks), fallbacks
    second_night = list((store_of(config) / "apcat").rglob(f"ztf_{second:%Y%m%d}*.parquet"))
    assert second_night
    for path in second_night:
        assert set(pq.read_table(path)["focalplane_factor"].to_pylist()) == {None}
        record = json.loads(pq.read_schema(path).metadata[b"streamer"])
        assert record["focalplane_factor"] is None and "no focal-plane factor for CCD 13" in record["focalplane_factor_note"]


def test_no_master_within_gap_blocks_with_a_reason(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    generate_night(
        archive, NIGHT, ccds=(13,), n_exposures=1, flats_per_led=2, n_biases=8, seed=3, shape="small",
        filters=("zg",), flat_filters=("zr",),
    )  # fmt: skip
    with serve_archive(archive) as url:
        config = config_for(tmp_path, archive, url, budget=UNLIMITED)
        result = run_cli(config, *backfill_args())
    assert result.returncode == 1
    report = status_json(config)
    assert report["jobs"]["exposure"] == {"blocked": 1}
    assert any("no master flat for zg within 10 days" in e["message"] for e in report["last_errors"])


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[object]:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster:
        yield cluster


def _dask_extra(address: str) -> str:
    return f'\n[compute]\nexecutor = "dask"\nscheduler = "{address}"\nworker_wait_s = 60\n'


def _config_with_compute(config: Path, compute: str) -> None:
    text = config.read_text().replace("[compute]\nworkers = 2\n", "")
    config.write_text(text + compute)


def test_dask_cluster_gives_the_same_catalogues(
    reference: dict[str, list[dict[str, object]]], dask_cluster: object, tmp_path: Path, archive: Path, base_url: str
) -> None:
    config = config_for(tmp_path, archive, base_url, budget=UNLIMITED)
    _config_with_compute(config, _dask_extra(dask_cluster.scheduler_address))  # type: ignore[attr-defined]
    result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr
    assert catalogues(store_of(config)) == reference
    assert status_json(config)["service"]["executor"]["kind"] == "dask"


def test_killing_a_dask_worker_mid_backfill(
    reference: dict[str, list[dict[str, object]]], tmp_path: Path, archive: Path, base_url: str
) -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster, Client(cluster, set_as_default=False) as client:
        config = config_for(tmp_path, archive, base_url, budget=UNLIMITED)
        _config_with_compute(config, _dask_extra(cluster.scheduler_address))
        process = subprocess.Popen(streamer_cmd(config, *backfill_args()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert wait_for(lambda: any(client.processing().values()), timeout=180), "no task reached the cluster"
        pids = client.run(os.getpid)
        busy = [addr for addr, keys in client.processing().items() if keys]
        os.kill(pids[busy[0]], signal.SIGKILL)
        # the kill is counted: the busy worker's process is gone (the nanny starts a new one)
        assert wait_for(lambda: not psutil.pid_exists(pids[busy[0]]), timeout=30), "the busy worker survived its kill"
        output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert catalogues(store_of(config)) == reference
    assert unfinished_files(store_of(config)) == []
    check = run_cli(config, "reconcile")
    assert check.returncode == 0, check.stdout + check.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _dask_process(*args: str) -> subprocess.Popen[bytes]:
    """A ``dask scheduler`` or ``dask worker`` of its own, as a cluster's supervisor would start it."""
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _dask_cluster_processes(address: str, port: int) -> list[subprocess.Popen[bytes]]:
    scheduler = _dask_process(
        "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"
    )
    workers = [
        _dask_process("distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1")
        for _ in range(2)
    ]
    return [scheduler, *workers]


def _end(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)


def test_killing_the_dask_scheduler_stops_cleanly_and_a_restart_continues(
    reference: dict[str, list[dict[str, object]]], tmp_path: Path, archive: Path, base_url: str
) -> None:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    config = config_for(tmp_path, archive, base_url, budget=UNLIMITED)
    _config_with_compute(config, _dask_extra(address))
    ledger = store_of(config) / "ledger.sqlite"
    cluster = _dask_cluster_processes(address, port)
    try:
        process = subprocess.Popen(streamer_cmd(config, *backfill_args()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert _wait_while_running(process, lambda: _jobs_running(ledger) > 0, timeout=180), (
                f"the backfill exited (code {process.returncode}) before a task ran on the cluster"
            )
            cluster[0].kill()  # SIGKILL of the scheduler while a task runs
            assert cluster[0].wait(timeout=30) == -signal.SIGKILL
            stdout, stderr = process.communicate(timeout=180)
        finally:
            _stop(process)
        # the client gives up reconnecting: one line, exit 1 (systemd restarts), no job counted as failed
        assert process.returncode == 1, stdout + stderr
        assert "lost the dask scheduler at" in stderr and "Traceback" not in stderr, stderr
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('parked', 'blocked')").fetchone()[0] == 0
            assert conn.execute("SELECT COALESCE(MAX(attempts), 0) FROM jobs WHERE state != 'done'").fetchone()[0] <= 1
        _end(cluster)
        cluster = _dask_cluster_processes(address, port)  # the supervisor brings the cluster back
        result = run_cli(config, *backfill_args())
    finally:
        _end(cluster)
    assert result.returncode == 0, result.stdout + result.stderr
    assert catalogues(store_of(config)) == reference
    assert unfinished_files(store_of(config)) == []
    check = run_cli(config, "reconcile")
    assert check.returncode == 0, check.stdout + check.stderr


def _jobs_running(ledger: Path) -> int:
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_demo_small(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "demo", "--workdir", str(tmp_path), "--shape", "small"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "aperture catalogues under" in result.stdout
    assert "service not running" in result.stdout  # the demo prints status after its backfill ended
    report = status_json(tmp_path / "config.toml")
    assert report["budget"]["used_bytes"] <= report["budget"]["budget_bytes"]
    assert len(catalogues(tmp_path / "store")) == 8
