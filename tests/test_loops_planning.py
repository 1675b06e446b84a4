"""A night planned before the archive lists it (IRSA's ingestion lag) is planned again by a later backfill.

The simulated archive first serves the night's directory without its data (the search answers
empty), then with it, as IRSA does some hours after a night ends. The meter is the simulator's
truth: as many catalogues as it made exposures.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from e2e import NIGHT, backfill_args, catalogues, config_for, run_cli, store_of
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night

N_EXPOSURES = 2


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replan-archive")
    generate_night(
        out, NIGHT, ccds=(13,), n_exposures=N_EXPOSURES, flats_per_led=2, n_biases=8, seed=5, shape="small",
        filters=("zr",), flat_filters=("zr",),
    )  # fmt: skip
    return out


def _meta(store: Path, prefix: str) -> str | None:
    """The value of the one meta key that starts with ``prefix`` (None when there is none)."""
    with sqlite3.connect(store / "ledger.sqlite") as conn:
        found = conn.execute("SELECT value FROM meta WHERE key LIKE ?", (prefix + "%",)).fetchall()
    assert len(found) <= 1, found
    return None if not found else str(found[0][0])


@pytest.mark.timeout(600)
def test_a_night_planned_empty_is_planned_again_by_the_next_backfill(archive: Path, tmp_path: Path) -> None:
    copy = tmp_path / "archive"
    shutil.copytree(archive, copy)
    aside = tmp_path / "not-yet-ingested"
    aside.mkdir()
    for tree in ("raw", "sci"):
        (copy / tree).rename(aside / tree)
    with serve_archive(copy) as url:
        config = config_for(tmp_path, copy, url, budget=50 * 10**9)
        first = run_cli(config, *backfill_args(), timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert catalogues(store_of(config)) == {}
    key = f"{NIGHT.isoformat()}:"
    empty = _meta(store_of(config), f"empty_plan:{key}")
    assert empty is not None and json.loads(empty)["plans"] == 1, empty
    for tree in ("raw", "sci"):
        (aside / tree).rename(copy / tree)
    with serve_archive(copy) as url:
        config = config_for(tmp_path, copy, url, budget=50 * 10**9)  # the same store, the archive on a new port
        second = run_cli(config, *backfill_args(), timeout=300)
        third = run_cli(config, *backfill_args(), timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert len(catalogues(store_of(config))) == N_EXPOSURES
    assert json.loads(_meta(store_of(config), f"empty_plan:{key}") or "{}")["plans"] == 0
    # a night whose plan has jobs is not planned again
    assert third.returncode == 0 and "planning" not in third.stderr
