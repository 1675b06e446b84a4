"""Status after a finished backfill, figure by figure against the ledger and the simulated archive."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from e2e import NIGHT, backfill_args, config_for, run_cli, status_json, store_of
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small night backfilled to its end with an unlimited budget: (config, archive)."""
    tmp = tmp_path_factory.mktemp("status")
    archive = tmp / "archive"
    generate_night(archive, NIGHT, ccds=(13,), n_exposures=2, flats_per_led=2, n_biases=8, seed=7, shape="small", jobs=1)
    with serve_archive(archive) as url:
        config = config_for(tmp, archive, url, budget=10**10)
        result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr
    return config, archive


def _ledger_rows(config: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{store_of(config) / 'ledger.sqlite'}?mode=ro", uri=True)) as db:
        return db.execute(sql).fetchall()


def test_a_finished_backfill_is_not_shown_running(finished: tuple[Path, Path]) -> None:
    config, _archive = finished
    report = status_json(config)
    assert report["service"]["running"] is False
    assert report["service"]["mode"] == "backfill"


def test_the_last_hour_counts_every_download_even_of_files_since_evicted(finished: tuple[Path, Path]) -> None:
    config, archive = finished
    report = status_json(config)
    downloaded = _ledger_rows(config, "SELECT relpath, kind, state FROM files WHERE url != '' AND state IN ('on_disk', 'deleted')")
    assert downloaded, "the backfill downloaded nothing"
    assert any(state == "deleted" for _relpath, _kind, state in downloaded), "nothing was evicted: the test shows nothing"
    assert report["rates"]["downloads_last_hour"] == len(downloaded)
    raw_bytes = sum((archive / relpath).stat().st_size for relpath, kind, _state in downloaded if kind == "raw")
    assert report["rates"]["downloaded_bytes_last_hour"] >= raw_bytes > 0
