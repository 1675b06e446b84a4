"""Status after a finished backfill, figure by figure against the ledger and the simulated archive."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from e2e import NIGHT, backfill_args, config_for, run_cli, status_json, store_of, streamer_cmd, wait_for
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


def test_status_during_a_backfill_matches_the_ledger_and_the_disk_figure_by_figure(tmp_path: Path) -> None:
    """The backfill's process group is stopped (SIGSTOP) mid-run, so the ledger and the disk hold
    still while ``status --json``, an SQL read of the rows and a walk of the disk are taken."""
    archive = tmp_path / "archive"
    generate_night(archive, NIGHT, ccds=(13,), n_exposures=4, flats_per_led=2, n_biases=8, seed=8, shape="small", jobs=1)
    with serve_archive(archive) as url:
        budget = 10**10
        config = config_for(tmp_path, archive, url, budget=budget)
        process = subprocess.Popen(streamer_cmd(config, *backfill_args()), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            def mid_run() -> bool:
                rows = _ledger_rows_or_none(config, "SELECT COUNT(*) FROM jobs WHERE state = 'done'")
                return process.poll() is not None or (rows is not None and int(rows[0][0]) >= 2)

            assert wait_for(mid_run, 180, period=0.05) and process.poll() is None, "the backfill ended before the status was taken"
            os.killpg(process.pid, signal.SIGSTOP)
            try:
                time.sleep(0.5)  # let a write already in the kernel land
                snapshot = _snapshot(config)
            finally:
                os.killpg(process.pid, signal.SIGCONT)
            _stdout, stderr = process.communicate(timeout=600)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    assert process.returncode == 0, stderr

    report = snapshot.report
    assert report["service"]["running"] is True and report["service"]["pid"] == process.pid
    assert report["service"]["mode"] == "backfill"
    done = sum(1 for _kind, state, _finished in snapshot.jobs if state == "done")
    assert 0 < done < len(snapshot.jobs), "not mid-run"
    _assert_figures(snapshot, budget)


def test_status_after_a_finished_backfill_matches_the_ledger_and_the_disk_figure_by_figure(finished: tuple[Path, Path]) -> None:
    config, _archive = finished
    snapshot = _snapshot(config)
    assert all(state == "done" for _kind, state, _finished in snapshot.jobs)
    _assert_figures(snapshot, 10**10)


@dataclasses.dataclass
class Snapshot:
    """``status --json`` with the ledger rows and the disk it was computed from."""

    report: dict[str, Any]
    files: list[tuple[Any, ...]]
    jobs: list[tuple[Any, ...]]
    pins: set[int]
    running_outputs: set[str]
    disk: dict[str, int]


def _snapshot(config: Path) -> Snapshot:
    return Snapshot(
        report=status_json(config),
        files=_ledger_rows(config, "SELECT relpath, kind, state, disk_bytes, reserved_bytes, kept, url, fetched_at, id FROM files"),
        jobs=_ledger_rows(config, "SELECT kind, state, finished FROM jobs"),
        pins={int(r[0]) for r in _ledger_rows(config, "SELECT file_id FROM pins")},
        running_outputs={
            str(r[0]) for r in _ledger_rows(
                config, "SELECT f.relpath FROM files f JOIN jobs j ON f.producer_job = j.id WHERE j.state = 'running'"
            )
        },
        disk=_walk(store_of(config)),
    )  # fmt: skip


def _assert_figures(snapshot: Snapshot, budget: int) -> None:
    """Each figure of ``status --json`` against the rows and the walk of the disk, computed here."""
    report, files, jobs, pins, running_outputs, disk = (
        snapshot.report, snapshot.files, snapshot.jobs, snapshot.pins, snapshot.running_outputs, snapshot.disk
    )  # fmt: skip
    # files by kind and state: the running totals against the rows themselves
    expected_files: dict[str, dict[str, dict[str, int]]] = {}
    for _relpath, kind, state, disk_bytes, reserved, *_rest in files:
        figures = expected_files.setdefault(str(kind), {}).setdefault(str(state), {"files": 0, "disk_bytes": 0, "reserved_bytes": 0})
        figures["files"] += 1
        figures["disk_bytes"] += int(disk_bytes)
        figures["reserved_bytes"] += int(reserved)
    shown = {k: {s: {f: v[f] for f in ("files", "disk_bytes", "reserved_bytes")} for s, v in states.items()} for k, states in report["files"].items()}
    assert shown == expected_files
    # jobs by kind and state
    expected_jobs: dict[str, dict[str, int]] = {}
    for kind, state, _finished in jobs:
        expected_jobs.setdefault(str(kind), {}).setdefault(str(state), 0)
        expected_jobs[str(kind)][str(state)] += 1
    assert report["jobs"] == expected_jobs
    # the budget: the ledger's account of the files on disk is what a walk of the disk finds for them
    on_disk = {str(r[0]): int(r[3]) for r in files if r[2] == "on_disk"}
    assert report["budget"]["used_bytes"] == sum(int(r[3]) for r in files) == sum(on_disk.values())
    assert {r: (disk.get(r), size) for r, size in on_disk.items() if disk.get(r) != size} == {}  # disk: walked while stopped
    reserved = sum(int(r[4]) for r in files)
    assert report["budget"]["reserved_bytes"] == reserved
    assert report["budget"]["budget_bytes"] == budget
    assert report["budget"]["free_bytes"] == budget - report["budget"]["used_bytes"] - reserved
    # every file found on disk is on_disk in the ledger, or one being written or deleted now (a download, a running task's output, a deletion)
    downloading = {str(r[0]) for r in files if r[2] in ("reserved", "downloading", "deleting")}
    unaccounted = {
        relpath for relpath in disk
        if relpath not in on_disk and relpath not in running_outputs and relpath not in downloading
        and not relpath.endswith((".part", ".zpart", ".tmp")) and not relpath.startswith("ledger.sqlite")
    }  # fmt: skip
    assert unaccounted == set()
    # the last hour: every archive file fetched (all of this run), every job done
    fetched = [r for r in files if r[6] and r[7] is not None]
    assert report["rates"]["downloads_last_hour"] == len(fetched) > 0
    done = sum(1 for _kind, state, _finished in jobs if state == "done")
    assert report["rates"]["jobs_done_last_hour"] == done
    unfinished = sum(1 for _kind, state, _finished in jobs if state not in ("done", "parked", "blocked"))
    assert report["eta_seconds"] == pytest.approx(unfinished / done * 3600)
    # erasable: on disk, kept by no consumer, pinned by no job, not a catalogue
    erasable = [r for r in files if r[2] == "on_disk" and not r[5] and r[1] != "apcat" and int(r[8]) not in pins]
    assert report["erasable"] == {"files": len(erasable), "bytes": sum(int(r[3]) for r in erasable)}
    assert report["disk_pause"] is None and report["stuck"] is None


def _walk(store: Path) -> dict[str, int]:
    """Every regular file under ``store`` (relative path -> allocated bytes), symlinks not followed."""
    out = {}
    for directory, _subdirectories, names in os.walk(store, followlinks=False):
        for name in names:
            path = Path(directory) / name
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                out[path.relative_to(store).as_posix()] = info.st_blocks * 512
    return out


def _ledger_rows_or_none(config: Path, sql: str) -> list[tuple[object, ...]] | None:
    try:
        return _ledger_rows(config, sql)
    except sqlite3.Error:
        return None
