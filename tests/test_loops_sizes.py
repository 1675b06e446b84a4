"""A file size no file can have, recorded by an older version from a lying HEAD, cannot hold the budget up for ever.

Such a size made the minimum workable budget a petabyte, so every later backfill exited 2
(and systemd does not restart on 2). Now a backfill drops it (the size is asked again), and so
does ``reconcile --fix``, which also records the minimum again for ``status``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from e2e import NIGHT, backfill_args, config_for, run_cli, status_json, store_of
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night

PETABYTE = 2**50
BUDGET = 50 * 10**9


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sizes-archive")
    generate_night(
        out, NIGHT, ccds=(13,), n_exposures=2, flats_per_led=2, n_biases=8, seed=5, shape="small",
        filters=("zr",), flat_filters=("zr",),
    )  # fmt: skip
    return out


def _lie_about_a_size(store: Path) -> str:
    """What an older version recorded from a HEAD announcing a petabyte, and the minimum it then recorded."""
    with sqlite3.connect(store / "ledger.sqlite") as conn:
        (relpath,) = conn.execute(
            "SELECT relpath FROM files WHERE kind = 'raw' AND relpath LIKE '%\\_o.fits.fz' ESCAPE '\\' ORDER BY id"
        ).fetchone()
        conn.execute("UPDATE files SET expected_size = ? WHERE relpath = ?", (PETABYTE, relpath))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'minimum_budget_bytes'", (str(PETABYTE),))
    return str(relpath)


def _expected_size(store: Path, relpath: str) -> int | None:
    with sqlite3.connect(store / "ledger.sqlite") as conn:
        value = conn.execute("SELECT expected_size FROM files WHERE relpath = ?", (relpath,)).fetchone()[0]
    return None if value is None else int(value)


@pytest.mark.timeout(600)
def test_a_recorded_absurd_size_is_dropped_by_reconcile_fix_and_by_the_next_backfill(archive: Path, tmp_path: Path) -> None:
    with serve_archive(archive) as url:
        config = config_for(tmp_path, archive, url, budget=BUDGET)
        first = run_cli(config, *backfill_args(), timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr[-3000:]
        store = store_of(config)
        relpath = _lie_about_a_size(store)
        assert status_json(config)["minimum_budget_bytes"] == PETABYTE
        fixed = run_cli(config, "reconcile", "--fix", timeout=120)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert _expected_size(store, relpath) is None
        assert 0 < status_json(config)["minimum_budget_bytes"] < BUDGET
        _lie_about_a_size(store)
        again = run_cli(config, *backfill_args(), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert _expected_size(store, relpath) is None
    assert 0 < status_json(config)["minimum_budget_bytes"] < BUDGET
