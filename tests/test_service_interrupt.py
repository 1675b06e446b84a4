"""A backfill stopped by SIGTERM before its end says so and exits 1, even when no job was planned yet."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from e2e import NIGHT, backfill_args, config_for, store_of, streamer_cmd, wait_for
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    generate_night(out, NIGHT, ccds=(13,), n_exposures=1, flats_per_led=1, n_biases=2, seed=5, shape="small", jobs=1)
    return out


def _service_started(ledger: Path) -> bool:
    """The service records itself once its signal handlers are in place."""
    if not ledger.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
            return db.execute("SELECT 1 FROM meta WHERE key = 'service'").fetchone() is not None
    except sqlite3.OperationalError:
        return False


def test_sigterm_during_planning_is_not_reported_complete(tmp_path: Path, archive: Path) -> None:
    stalls = tmp_path / "stall.toml"
    stalls.write_text("stall_rate = 1.0\n")  # every answer, searches included, stops before its end
    with serve_archive(archive, faults=str(stalls)) as url:
        config = config_for(tmp_path, archive, url, budget=10**10)
        process = subprocess.Popen(streamer_cmd(config, *backfill_args()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ledger = store_of(config) / "ledger.sqlite"
            assert wait_for(lambda: _service_started(ledger), timeout=60), "the service never started"
            assert process.poll() is None, "the backfill ended before it could be stopped"
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 1, stdout + stderr
    assert "backfill complete" not in stdout
    assert "backfill interrupted (SIGTERM)" in stdout
