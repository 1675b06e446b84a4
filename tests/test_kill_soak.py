"""kill -9 of the whole service, 20 times at seeded random moments and once at each chosen moment.

Each kill ends the backfill's process group (the service and its pool workers), as systemd's
``KillMode=control-group`` does. Chosen moments use the crash points of ``streamer.crashpoints``:
the killed process itself says which point it reached, so every kill is counted. After the last
restart the catalogues equal those of an uninterrupted run, nothing partial remains, ``reconcile``
is clean, and an independent ``st_blocks`` walk of the store, sampled every 0.2 s from before
the first start to after the last exit, never exceeded the budget.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e import (
    NIGHT,
    DiskSampler,
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
from streamer.crashpoints import ENVIRONMENT_VARIABLE
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night

UNLIMITED = 50 * 10**9


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    generate_night(out, NIGHT, ccds=(13,), n_exposures=16, flats_per_led=2, n_biases=8, seed=11, shape="small", jobs=2)
    return out


@pytest.fixture(scope="module")
def base_url(archive: Path) -> Iterator[str]:
    with serve_archive(archive) as url:
        yield url


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, archive: Path, base_url: str) -> tuple[dict[str, list[dict[str, object]]], int]:
    """Catalogues of an uninterrupted run with an unlimited budget, and the minimum budget it learned."""
    config = config_for(tmp_path_factory.mktemp("reference"), archive, base_url, budget=UNLIMITED)
    result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr
    rows = catalogues(store_of(config))
    assert len(rows) == 16
    return rows, int(status_json(config)["minimum_budget_bytes"])


def _tight_config(tmp_path: Path, archive: Path, base_url: str, minimum: int) -> tuple[Path, int]:
    # 1.25 x: before its masters exist, a new store estimates them from the raw flats, a little high
    budget = int(1.25 * minimum)
    config = config_for(tmp_path, archive, base_url, budget=budget)
    store_of(config).mkdir()
    return config, budget


def _start(config: Path, crash_at: str | None = None) -> subprocess.Popen[str]:
    """A backfill in a session of its own, so that its process group is the service and its workers only."""
    env = {k: v for k, v in os.environ.items() if k != ENVIRONMENT_VARIABLE}
    if crash_at is not None:
        env[ENVIRONMENT_VARIABLE] = crash_at
    return subprocess.Popen(
        streamer_cmd(config, *backfill_args()), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True,
    )  # fmt: skip


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL the whole process group of ``process`` (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _progress(ledger: Path) -> float:
    """The ledger's latest moment of progress: a file reaching the disk or evicted from it, or a job done
    (0 while the ledger cannot be read). Unlike a count of files on disk, eviction cannot make it fall."""
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as conn:
            files = conn.execute("SELECT MAX(updated) FROM files WHERE state IN ('on_disk', 'deleted')").fetchone()[0]
            jobs = conn.execute("SELECT MAX(finished) FROM jobs WHERE state = 'done'").fetchone()[0]
            return max(float(files or 0.0), float(jobs or 0.0))
    except sqlite3.Error:
        return 0.0


def _kill_after_progress(config: Path, ledger: Path, round_: int, *, delay: float) -> int:
    """Start a backfill, SIGKILL its group ``delay`` s after the ledger shows new progress; 1 if the kill,
    not a normal exit before it, ended the backfill."""
    before = _progress(ledger)
    process = _start(config)
    try:
        moved = wait_for(lambda: process.poll() is not None or _progress(ledger) > before, 120, period=0.05)
        assert moved and process.poll() is None, (
            f"round {round_}: the backfill exited (code {process.returncode}) or made no progress before the kill"
        )
        wait_for(lambda: process.poll() is not None, delay, period=0.01)
        _kill_group(process)
        return int(process.wait(timeout=60) == -signal.SIGKILL)
    finally:
        _kill_group(process)
        process.communicate(timeout=60)


def _check_after_last_restart(
    config: Path, budget: int, sampler: DiskSampler, expected: dict[str, list[dict[str, object]]],
    last: subprocess.CompletedProcess[str],
) -> None:  # fmt: skip
    """The invariants once the restart without a crash point (``last``) has ended."""
    assert last.returncode == 0, last.stdout + last.stderr
    store = store_of(config)
    assert catalogues(store) == expected
    assert unfinished_files(store) == []
    check = run_cli(config, "reconcile")
    assert check.returncode == 0 and "Traceback" not in check.stderr, check.stdout + check.stderr
    assert len(sampler.samples) > 10
    assert sampler.peak <= budget, f"the disk held {sampler.peak} B at its peak, over the budget of {budget} B"


def test_twenty_kills_at_seeded_moments(
    uninterrupted: tuple[dict[str, list[dict[str, object]]], int], tmp_path: Path, archive: Path, base_url: str
) -> None:
    expected, minimum = uninterrupted
    config, budget = _tight_config(tmp_path, archive, base_url, minimum)
    ledger = store_of(config) / "ledger.sqlite"
    rng = random.Random(20)
    planned, killed = 20, 0
    with DiskSampler(store_of(config)) as sampler:
        for round_ in range(planned):
            killed += _kill_after_progress(config, ledger, round_, delay=rng.uniform(0.0, 0.3))
        last = run_cli(config, *backfill_args())
    assert killed == planned, f"{killed} of {planned} kills reached a running backfill"
    _check_after_last_restart(config, budget, sampler, expected, last)


def _rows(store: Path) -> dict[str, str]:
    """relpath -> state of every file in the ledger."""
    with sqlite3.connect(f"file:{store / 'ledger.sqlite'}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT relpath, state FROM files").fetchall())


def _on_disk_but_not_recorded(store: Path) -> list[str]:
    return [r for r, state in _rows(store).items() if state != "on_disk" and (store / r).is_file()]


def _complete_part_without_final(store: Path) -> list[str]:
    return [r for r, state in _rows(store).items() if state == "downloading" and (store / (r + ".part")).is_file() and not (store / r).exists()]


def _deleting_still_present(store: Path) -> list[str]:
    return [r for r, state in _rows(store).items() if state == "deleting" and (store / r).is_file()]


def _temporary_of(suffix: str) -> Callable[[Path], list[str]]:
    def found(store: Path) -> list[str]:
        return [p.name for p in unfinished_files(store) if p.name.endswith(".tmp") and suffix in p.name]

    return found


#: Each chosen moment: the crash point that reaches it (``streamer.crashpoints.POINTS``), and what the
#: store must show after the kill to prove the kill landed there.
CHOSEN = {
    "a download's rename": ("rename#3", _complete_part_without_final),
    "a download renamed, not yet recorded": ("renamed#3", _on_disk_but_not_recorded),
    "a master bias's write": ("write:_bias.fits", _temporary_of("_bias.fits")),
    "a master flat's write": ("write:_flat.fits", _temporary_of("_flat.fits")),
    "between the ledger's deleting and the unlink": ("unlink#2", _deleting_still_present),
    "the recording of a finished task": ("record#2", _on_disk_but_not_recorded),
}


@pytest.mark.parametrize(("crash_at", "landed"), list(CHOSEN.values()), ids=list(CHOSEN))
def test_kill_at_a_chosen_moment(
    crash_at: str, landed: Callable[[Path], list[str]], uninterrupted: tuple[dict[str, list[dict[str, object]]], int],
    tmp_path: Path, archive: Path, base_url: str,
) -> None:  # fmt: skip
    expected, minimum = uninterrupted
    config, budget = _tight_config(tmp_path, archive, base_url, minimum)
    with DiskSampler(store_of(config)) as sampler:
        process = _start(config, crash_at)
        try:
            _stdout, stderr = process.communicate(timeout=300)
        finally:
            _kill_group(process)
        assert process.returncode == -signal.SIGKILL, stderr
        assert f"crash point {crash_at} reached" in stderr, stderr
        evidence = landed(store_of(config))
        assert evidence, f"after the kill at {crash_at} the store does not show the moment it was meant to catch"
        last = run_cli(config, *backfill_args())
    _check_after_last_restart(config, budget, sampler, expected, last)
