"""A night planned before the archive lists it (IRSA's ingestion lag) is planned again by a later backfill.

The simulated archive first serves the night's directory without its data (the search answers
empty), then with it, as IRSA does some hours after a night ends. The meter is the simulator's
truth: as many catalogues as it made exposures.
"""

from __future__ import annotations

import datetime as dt
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


@pytest.mark.timeout(600)
def test_a_night_partly_ingested_when_planned_is_planned_again_by_the_next_backfill(tmp_path: Path) -> None:
    """Last night, planned while IRSA held only one of its two exposures, gets the other from a later backfill."""
    night = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)  # within IRSA's ingestion window
    archive = tmp_path / "archive"
    generate_night(
        archive, night, ccds=(13,), n_exposures=2, flats_per_led=2, n_biases=8, seed=6, shape="small",
        filters=("zr",), flat_filters=("zr",),
    )  # fmt: skip
    late = sorted(p.parent.name for p in (archive / "raw").rglob("*_o.fits.fz"))[-1]  # the exposure IRSA adds later
    aside = tmp_path / "not-yet-ingested"
    moved = [d for tree in ("raw", "sci") for d in (archive / tree).rglob(late) if d.is_dir()]
    assert len(moved) == 2, moved
    for directory in moved:
        (aside / directory.relative_to(archive)).parent.mkdir(parents=True, exist_ok=True)
        directory.rename(aside / directory.relative_to(archive))
    with serve_archive(archive) as url:
        port = int(url.rsplit(":", 1)[1])  # the second archive on the same address, as IRSA's is: the ledger keeps URLs
        config = config_for(tmp_path, archive, url, budget=50 * 10**9)
        first = run_cli(config, *backfill_args(night, night), timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert len(catalogues(store_of(config))) == 1
    for directory in moved:
        (aside / directory.relative_to(archive)).rename(directory)
    with serve_archive(archive, port=port) as url:
        config = config_for(tmp_path, archive, url, budget=50 * 10**9)  # the same store
        second = run_cli(config, *backfill_args(night, night), timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert "planning" in second.stderr
    with sqlite3.connect(store_of(config) / "ledger.sqlite") as conn:
        remade = [r[0] for r in conn.execute("SELECT message FROM events WHERE message LIKE '%made again%'")]
    assert any(m.startswith("master_flat:") for m in remade) and any(m.startswith("master_bias:") for m in remade), remade
    names = sorted(catalogues(store_of(config)))
    assert len(names) == 2 and any(late in name for name in names), names
