"""A full disk on a real filesystem: small tmpfs mounts under the storage root or the ledger.

Mounting needs root (CI and the development machines run the tests as root); elsewhere these
tests skip and say why. Three cases through the real CLI against the simulated archive, each
compared with a clean run on an ordinary directory (same archive, same seed):

- the budget is larger than the filesystem: the service works to what the filesystem holds;
- another user's file fills the filesystem in the middle of the run (and keeps taking what is
  freed) until it is removed: downloads and dispatch pause, status says so, the run resumes;
- the ledger's own filesystem fills: the service stops with one line, the ledger intact, and a
  restart after space returns finishes the work.

In the first two cases the ledger lives on an ordinary directory, so what fills is the data's
filesystem alone; the third case fills the ledger's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import pickle
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from e2e import (
    NIGHT,
    allocated_bytes,
    backfill_args,
    catalogues,
    config_for,
    run_cli,
    status_json,
    store_of,
    streamer_cmd,
    wait_for,
)
from streamer.config import load_config
from streamer.demo import serve_archive, write_config
from streamer.errors import UsageError
from streamer.execution.jobs import Call, classify_failure
from streamer.execution.local import LocalExecutor
from streamer.ledger.core import Ledger
from streamer.rules.budget import budget_in_effect, disk_has_room, disk_margin_bytes
from streamer.rules.failures import WaitForDisk, failure_action
from streamer.service.context import Context
from streamer.service.diskspace import ledger_full
from streamer.service.records import Submitted, record
from streamer.sim.generate import generate_night
from streamer.storage.atomic import DiskFullError, is_disk_full, write_atomically

UNLIMITED = 50 * 10**9
MB = 10**6


@contextlib.contextmanager
def tmpfs(directory: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted at ``directory`` for the test, unmounted after it (skip where impossible)."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs these tests as root)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'mount failed'}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)


def _free(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


class Filler:
    """Another user's file: takes every free byte of its filesystem, and what is freed later, until stopped; then removed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.full = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while not self._stop.is_set():
                try:
                    while os.write(fd, bytes(64 * 1024)) > 0:
                        pass
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                self.full.set()
                self._stop.wait(0.05)
        finally:
            os.close(fd)

    def __enter__(self) -> Filler:
        self._thread.start()
        assert self.full.wait(30), "the filler never filled the filesystem"
        return self

    def stop_and_remove(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.stop_and_remove()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    generate_night(out, NIGHT, ccds=(13,), n_exposures=4, flats_per_led=2, n_biases=8, seed=3, shape="small", jobs=1)
    return out


@pytest.fixture(scope="module")
def base_url(archive: Path) -> Iterator[str]:
    with serve_archive(archive) as url:
        yield url


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, archive: Path, base_url: str) -> dict[str, list[dict[str, object]]]:
    """The catalogues of a clean run on an ordinary directory."""
    config = config_for(tmp_path_factory.mktemp("clean"), archive, base_url, budget=UNLIMITED)
    result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr
    rows = catalogues(store_of(config))
    assert len(rows) == 4 and all(rows.values())
    return rows


def _config(tmp: Path, archive: Path, base_url: str, *, store: Path, ledger: Path, budget: int) -> Path:
    path = write_config(tmp / "config.toml", store=store, catalog_dir=archive / "refcat", base_url=base_url, budget=budget)
    path.write_text(path.read_text().replace("[storage]\n", f'[storage]\nledger = "{ledger}"\n', 1))
    return path


def _ledger_rows(ledger: Path, sql: str) -> list[tuple[Any, ...]]:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=10)) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return []


def _done_products(ledger: Path) -> set[tuple[Any, ...]]:
    return set(_ledger_rows(ledger, "SELECT p.file_id, p.created FROM products p JOIN jobs j ON j.id = p.job_id WHERE j.state = 'done'"))


def _jobs_done(ledger: Path) -> int:
    rows = _ledger_rows(ledger, "SELECT COUNT(*) FROM jobs WHERE state = 'done'")
    return int(rows[0][0]) if rows else 0


def _assert_recorded_files_complete(store: Path, ledger: Path) -> None:
    """Every file the ledger has on disk is there, whole (its size as recorded), and no temporary is left."""
    on_disk = _ledger_rows(ledger, "SELECT relpath, actual_size FROM files WHERE state = 'on_disk'")
    assert on_disk
    for relpath, size in on_disk:
        assert (store / relpath).stat().st_size == size, relpath
    leftovers = [p for p in store.rglob("*") if p.is_file() and p.name.endswith((".tmp", ".part", ".zpart"))]
    assert leftovers == []


# --- the rule, on plain values and one real write -----------------------------------------------


def test_the_budget_in_effect_is_what_the_filesystem_holds_never_below_the_minimum() -> None:
    margin = disk_margin_bytes(100 * MB)
    assert margin == 2 * MB  # a fiftieth of 100 MB
    assert budget_in_effect(1000 * MB, own_bytes=10 * MB, free_bytes=50 * MB, filesystem_bytes=100 * MB, minimum=0) == 58 * MB
    assert budget_in_effect(30 * MB, own_bytes=10 * MB, free_bytes=50 * MB, filesystem_bytes=100 * MB, minimum=0) == 30 * MB
    assert budget_in_effect(1000 * MB, own_bytes=0, free_bytes=5 * MB, filesystem_bytes=100 * MB, minimum=20 * MB) == 20 * MB
    assert disk_has_room(3 * MB, 1 * MB, 100 * MB) and not disk_has_room(3 * MB - 1, 1 * MB, 100 * MB)


def test_a_full_disk_is_never_the_jobs_fault_whatever_its_attempts() -> None:
    for attempts in range(6):
        assert failure_action("disk_full", "no room", attempts_before=attempts, max_attempts=3) == WaitForDisk()


def test_a_full_ledger_is_found_in_a_group_or_a_chain_and_a_cycle_of_errors_ends() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    rollback = sqlite3.OperationalError("cannot rollback - no transaction is active")
    rollback.__context__ = full
    assert ledger_full(ExceptionGroup("stages", [ValueError("other"), rollback]))
    refused = UsageError("storage.budget is below the minimum")
    refused.__context__ = ExceptionGroup("stages", [refused])  # what `raise group.exceptions[0]` leaves
    assert not ledger_full(refused)


def _write_big(path: str) -> None:
    write_atomically(path, lambda handle: handle.write(bytes(3 * 2**20)))


def test_a_product_write_without_room_leaves_nothing_and_reaches_the_service_as_disk_full(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", 1024 * 1024) as fs:
        with pytest.raises(DiskFullError) as caught:
            _write_big(str(fs / "masters" / "bias.fits"))
        assert caught.value.errno == errno.ENOSPC
        assert [p for p in fs.rglob("*") if p.is_file()] == []  # the temporary is gone, nothing at the final name
        # from a worker process, as the executor hands it back to the record stage
        with ProcessPoolExecutor(1) as pool:
            remote = pool.submit(_write_big, str(fs / "masters" / "flat.fits")).exception(timeout=60)
        assert isinstance(remote, DiskFullError) and is_disk_full(remote)
        assert classify_failure(remote).kind == "disk_full"
        assert classify_failure(pickle.loads(pickle.dumps(OSError(errno.EDQUOT, "Disk quota exceeded")))).kind == "disk_full"
        # astropy re-raises a failed write as its own OSError, without an errno: a master written with it
        image = fits.HDUList([fits.PrimaryHDU(np.zeros((512, 1024), dtype=np.float32))])
        with pytest.raises(DiskFullError):
            write_atomically(fs / "masters" / "led_flat.fits", image.writeto)
        assert [p for p in fs.rglob("*") if p.is_file()] == []


def test_a_master_that_finds_no_room_goes_back_to_ready_uncounted_and_holds_new_work(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "config.toml", store=tmp_path / "store", catalog_dir=tmp_path / "refcat",
        base_url="http://127.0.0.1:9", budget=10**9,
    )  # fmt: skip
    (tmp_path / "store").mkdir()
    config = load_config(path)
    ledger = Ledger.memory()
    output = "masters/2020/0924/bias_c13.fits"
    with ledger.transaction() as conn:
        job_id = ledger.add_job(conn, kind="master_bias", key="master_bias:2020-09-24:c13", night="2020-09-24", ccdid=13)
        file_id = ledger.want_file(conn, relpath=output, kind="masters", night="2020-09-24")
        conn.execute("UPDATE files SET producer_job = ?, reserved_bytes = 5000 WHERE id = ?", (job_id, file_id))
        ledger.set_job_state(conn, job_id, "ready")
        ledger.set_job_state(conn, job_id, "running", attempts=3)
    job = ledger.rows("SELECT * FROM jobs WHERE id = ?", (job_id,))[0] | {"attempts": 2}  # as submitted
    partial = tmp_path / "store" / output
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"SIMPLE  =" + bytes(100))  # what a crashed write could leave at the final name
    executor = LocalExecutor(1)
    try:
        ctx = Context(config=config, ledger=ledger, executor=executor, burst=True)

        async def finish() -> None:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(DiskFullError(errno.ENOSPC, "bias_c13.fits: No space left on device"))
            record(ctx, Submitted(job=job, call=Call(function=print, kwargs={}, outputs=(output,)), future=future, generation=0))

        asyncio.run(finish())
    finally:
        executor.shutdown(cancel=True)
    row = ledger.rows("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,))[0]
    # before this rule the job was failed with its attempt counted, and parked after the last one
    assert row == {"state": "ready", "attempts": 2}
    assert ledger.scalar("SELECT reserved_bytes FROM files WHERE id = ?", (file_id,)) == 0
    assert ledger.scalar("SELECT state FROM files WHERE id = ?", (file_id,)) == "wanted"
    assert not partial.exists()
    assert ctx.disk.paused and "No space left" in ctx.disk.reason
    assert json.loads(ledger.get_meta("disk.pause") or "{}")["paused"] is True
    assert ledger.scalar("SELECT COUNT(*) FROM events WHERE kind = 'disk_full'") == 2  # the job's and the pause's


# --- through the CLI on real filesystems -----------------------------------------------------


def test_a_budget_larger_than_the_filesystem(
    reference: dict[str, list[dict[str, object]]], tmp_path: Path, archive: Path, base_url: str
) -> None:
    with tmpfs(tmp_path / "fs", 16 * MB) as fs:
        store, ledger = fs / "store", tmp_path / "ledger" / "ledger.sqlite"
        config = _config(tmp_path, archive, base_url, store=store, ledger=ledger, budget=UNLIMITED)
        process = subprocess.Popen(streamer_cmd(config, *backfill_args()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak, deadline = 0, time.monotonic() + 400
        while process.poll() is None and time.monotonic() < deadline:
            peak = max(peak, allocated_bytes(store))
            time.sleep(0.2)
        if process.poll() is None:
            process.kill()
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stdout + stderr[-3000:]
        assert "more than the filesystem of storage.root can hold" in stderr
        report = status_json(config)
        in_effect = report["budget"]["in_effect_bytes"]
        assert in_effect is not None and in_effect < 16 * 2**20 < report["budget"]["budget_bytes"]
        assert peak <= in_effect
        through = _ledger_rows(ledger, "SELECT SUM(actual_size) FROM files")[0][0]
        assert through > 16 * 2**20, "everything that passed through fits the filesystem: the test shows nothing"
        assert _ledger_rows(ledger, "SELECT COUNT(*) FROM jobs WHERE state != 'done'")[0][0] == 0
        _assert_recorded_files_complete(store, ledger)
        assert catalogues(store) == reference


def test_a_foreign_file_fills_the_filesystem_mid_run_and_is_removed_later(
    reference: dict[str, list[dict[str, object]]], tmp_path: Path, archive: Path, base_url: str
) -> None:
    with tmpfs(tmp_path / "fs", 40 * MB) as fs:
        store, ledger = fs / "store", tmp_path / "ledger" / "ledger.sqlite"
        config = _config(tmp_path, archive, base_url, store=store, ledger=ledger, budget=24 * MB)
        process = subprocess.Popen(streamer_cmd(config, *backfill_args()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: process.poll() is not None or _jobs_done(ledger) > 0, timeout=120)
            assert process.poll() is None, "the backfill ended before the disk filled"
            done_before = _done_products(ledger)
            with Filler(fs / "another-users-file") as filler:
                paused = wait_for(lambda: process.poll() is not None or _pause(ledger).get("paused"), timeout=120)
                assert paused and process.poll() is None, "the backfill did not pause"
                report = status_json(config)
                assert report["disk_pause"] is not None and report["disk_pause"]["line"].startswith("paused: disk full (")
                assert report["disk_pause"]["paused"] is True
                held_since = time.time()
                time.sleep(3.0)
                assert process.poll() is None
                started = _ledger_rows(ledger, f"SELECT key FROM jobs WHERE started > {held_since}")
                assert started == [], f"tasks started while the disk was full: {started}"
                filler.stop_and_remove()
            stdout, stderr = process.communicate(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=60)
        assert process.returncode == 0, stdout + stderr[-3000:]
        assert "paused: disk full" in stderr and "resumed:" in stderr
        kinds = [r[0] for r in _ledger_rows(ledger, "SELECT kind FROM events WHERE kind IN ('disk_full', 'disk_free') ORDER BY id")]
        assert kinds and kinds[-1] == "disk_free"
        assert done_before <= _done_products(ledger), "a product made before the disk filled was made again or lost"
        assert _ledger_rows(ledger, "SELECT COUNT(*) FROM jobs WHERE state != 'done'")[0][0] == 0
        _assert_recorded_files_complete(store, ledger)
        assert catalogues(store) == reference
        assert status_json(config)["disk_pause"] is None


def _pause(ledger: Path) -> dict[str, Any]:
    rows = _ledger_rows(ledger, "SELECT value FROM meta WHERE key = 'disk.pause'")
    return json.loads(rows[0][0]) if rows and rows[0][0] else {}


def test_a_full_ledger_filesystem_stops_cleanly_and_a_restart_continues(
    reference: dict[str, list[dict[str, object]]], tmp_path: Path, archive: Path, base_url: str
) -> None:
    with tmpfs(tmp_path / "ledgerfs", 16 * MB) as fs:
        store, ledger = tmp_path / "store", fs / "ledger.sqlite"
        config = _config(tmp_path, archive, base_url, store=store, ledger=ledger, budget=UNLIMITED)
        process = subprocess.Popen(streamer_cmd(config, *backfill_args()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: process.poll() is not None or _jobs_done(ledger) > 0, timeout=120)
            assert process.poll() is None, "the backfill ended before the ledger's filesystem filled"
            done_before = _done_products(ledger)
            with Filler(fs / "another-users-file"):
                stdout, stderr = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=60)
        assert process.returncode == 1, stdout + stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("streamer: error:")]
        assert len(errors) == 1 and "no room to write the ledger" in errors[0], stderr[-3000:]
        assert _ledger_rows(ledger, "PRAGMA integrity_check") == [("ok",)]
        assert done_before <= _done_products(ledger)
        restarted = run_cli(config, *backfill_args())
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr[-3000:]
        assert done_before <= _done_products(ledger)
        _assert_recorded_files_complete(store, ledger)
        assert catalogues(store) == reference
