"""Detrended images through the real CLI on small simulated frames: ledger rows, kept or evicted, counted on disk."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import NIGHT, backfill_args, config_for, run_cli, status_json, store_of
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night

CCDS = (13,)
EXPOSURES = 2
UNLIMITED = 50 * 10**9
LEDGER_FILES = ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "ledger.sqlite-journal", "ledger.sqlite.lock")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    generate_night(out, NIGHT, ccds=CCDS, n_exposures=EXPOSURES, flats_per_led=2, n_biases=8, seed=5, shape="small", jobs=2)
    return out


@pytest.fixture(scope="module")
def base_url(archive: Path) -> Iterator[str]:
    with serve_archive(archive) as url:
        yield url


def _with_detrended(config: Path) -> Path:
    text = config.read_text()
    assert "\n[detrend]\n" in text
    config.write_text(text.replace("\n[detrend]\n", "\n[detrend]\nwrite_detrended = true\n", 1))
    return config


def _walk(store: Path) -> dict[str, int]:
    """Allocated bytes of every regular file under the store (the ledger's own files left out), by relpath."""
    found = {}
    for directory, _dirs, names in os.walk(store):
        for name in names:
            path = Path(directory) / name
            info = path.lstat()
            relpath = path.relative_to(store).as_posix()
            if relpath not in LEDGER_FILES:
                found[relpath] = info.st_blocks * 512
    return found


def _files(store: Path) -> dict[str, dict[str, object]]:
    with sqlite3.connect(store / "ledger.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return {r["relpath"]: dict(r) for r in conn.execute("SELECT * FROM files")}


def test_kept_detrended_images_are_ledger_rows_on_disk(tmp_path: Path, archive: Path, base_url: str) -> None:
    extra = '\n[[consumers]]\nname = "images"\nkeep = ["detrended"]\n'
    config = _with_detrended(config_for(tmp_path, archive, base_url, budget=UNLIMITED, extra=extra))
    result = run_cli(config, *backfill_args(ccds=CCDS))
    assert result.returncode == 0, result.stdout + result.stderr
    store = store_of(config)
    on_disk = _walk(store)
    detrended = sorted(p for p in on_disk if p.startswith("detrended/"))
    assert len(detrended) == 4 * EXPOSURES * len(CCDS)
    assert all(p.endswith("_detrended.fits.fz") for p in detrended)
    rows = _files(store)
    for relpath in detrended:
        row = rows[relpath]
        assert (row["kind"], row["state"], row["kept"]) == ("detrended", "on_disk", 1)
        assert row["producer_job"] is not None and row["disk_bytes"] == on_disk[relpath]
    # every file under the root is a ledger row on disk, and the ledger's total is the walk's
    assert all(rows.get(p, {}).get("state") == "on_disk" for p in on_disk), sorted(
        p for p in on_disk if rows.get(p, {}).get("state") != "on_disk"
    )
    report = status_json(config)
    assert report["budget"]["used_bytes"] == sum(on_disk.values())
    assert report["budget"]["reserved_bytes"] == 0
    assert report["files"]["detrended"]["on_disk"]["files"] == len(detrended)


def test_detrended_images_nobody_keeps_are_evicted_at_the_end(tmp_path: Path, archive: Path, base_url: str) -> None:
    config = _with_detrended(config_for(tmp_path, archive, base_url, budget=UNLIMITED))
    result = run_cli(config, *backfill_args(ccds=CCDS))
    assert result.returncode == 0, result.stdout + result.stderr
    store = store_of(config)
    on_disk = _walk(store)
    assert not any(p.startswith("detrended/") for p in on_disk)
    rows = _files(store)
    detrended = [r for r in rows.values() if r["kind"] == "detrended"]
    assert len(detrended) == 4 * EXPOSURES * len(CCDS)
    assert all(r["state"] == "deleted" and r["kept"] == 0 and r["actual_size"] for r in detrended)  # made, then evicted
    assert set(on_disk) == {p for p, r in rows.items() if r["state"] == "on_disk"}
    assert {p.split("/", 1)[0] for p in on_disk} == {"apcat"}
    assert status_json(config)["budget"]["used_bytes"] == sum(on_disk.values())
