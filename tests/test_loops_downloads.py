"""Downloads that cannot succeed end, backed off and bounded, instead of being picked again for ever.

Each case runs the real CLI against the simulated archive on loopback: a file the archive
always serves damaged, a kept file deleted by hand and marked ``deleted`` by ``reconcile --fix``,
a directory where a raw goes, and a regular file where a night directory goes. The meters are
the simulator's own request counts, the ledger, and the lines the service logs.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import NIGHT, backfill_args, config_for, run_cli, store_of
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night

DATA = "/ibe/data/ztf/products/"
FITS_BLOCK = 2880
#: Bound on a backfill that must end: the old code never ended these runs.
RUN_TIMEOUT_S = 150.0
MAX_ATTEMPTS = 2
FAST_ARCHIVE = f"max_connections = 4\nmax_attempts = {MAX_ATTEMPTS}\nread_timeout_s = 10.0"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loops-archive")
    generate_night(
        out, NIGHT, ccds=(13,), n_exposures=2, flats_per_led=2, n_biases=8, seed=5, shape="small",
        filters=("zr",), flat_filters=("zr",),
    )  # fmt: skip
    return out


def science_raws(archive: Path) -> list[str]:
    return sorted(p.relative_to(archive).as_posix() for p in (archive / "raw").rglob("*_o.fits.fz"))


def damage_first_extension(path: Path) -> None:
    """Change the X of the first extension's XTENSION card: the primary header (the index) stays readable."""
    data = bytearray(path.read_bytes())
    offset = FITS_BLOCK
    while data[offset - FITS_BLOCK : offset].find(b"END" + b" " * 77) < 0:
        offset += FITS_BLOCK
    assert data[offset : offset + 8] == b"XTENSION"
    data[offset] = ord("#")
    path.write_bytes(bytes(data))


def requests_by_path(base_url: str) -> dict[str, int]:
    with urllib.request.urlopen(base_url + "/_sim/faults", timeout=30) as response:
        counts: dict[str, int] = json.loads(response.read())["attempts_by_path"]
    return counts


def file_rows(store: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(store / "ledger.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return {r["relpath"]: dict(r) for r in conn.execute("SELECT * FROM files")}


def config_with(tmp: Path, archive: Path, base_url: str, extra: str = "") -> Path:
    config = config_for(tmp, archive, base_url, budget=50 * 10**9, extra=extra)
    text = config.read_text().replace("max_connections = 4", FAST_ARCHIVE, 1)
    config.write_text(text)
    return config


def backfill(config: Path) -> subprocess.CompletedProcess[str]:
    """The backfill of the night; a run that does not end fails the test (TimeoutExpired)."""
    return run_cli(config, *backfill_args(), timeout=RUN_TIMEOUT_S)


@pytest.fixture
def served_copy(archive: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A private copy of the archive (a test may damage it), served on loopback."""
    copy = tmp_path / "archive"
    shutil.copytree(archive, copy)
    with serve_archive(copy) as url:
        yield copy, url


@pytest.mark.timeout(600)
def test_a_file_always_served_damaged_is_given_up_after_a_bounded_number_of_requests(
    served_copy: tuple[Path, str], tmp_path: Path
) -> None:
    copy, url = served_copy
    damaged = science_raws(copy)
    for relpath in damaged:
        damage_first_extension(copy / relpath)
    config = config_with(tmp_path, copy, url)
    result = backfill(config)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = file_rows(store_of(config))
    requests = requests_by_path(url)
    for relpath in damaged:
        row = rows[relpath]
        # a burst waits for no later retry: the file keeps a retry date, an hour on at least, for a daemon
        assert row["state"] == "corrupt" and row["retry_at"] > time.time() + 3000, row
        assert "verification failed" in row["last_error"] and row["reserved_bytes"] == 0
        # one download: the transfer's own MAX_ATTEMPTS GETs and at most a HEAD (the old code: hundreds, for ever)
        assert requests[DATA + relpath] <= MAX_ATTEMPTS + 1, requests[DATA + relpath]
        assert log_lines(result.stderr, relpath + ": corrupt") == 1, result.stderr[-3000:]
    assert f"{len(damaged)} files missing or corrupt" in result.stdout
    assert "Traceback" not in result.stderr


def log_lines(stderr: str, needle: str) -> int:
    return sum(1 for line in stderr.splitlines() if needle in line)


@pytest.mark.timeout(600)
def test_a_kept_file_deleted_by_hand_is_fetched_again(served_copy: tuple[Path, str], tmp_path: Path) -> None:
    """The documented way: delete it, ``reconcile --fix`` (the row becomes ``deleted``), backfill again."""
    copy, url = served_copy
    config = config_with(tmp_path, copy, url, extra='\n[[consumers]]\nname = "mirror"\nkeep = ["raw"]\n')
    assert backfill(config).returncode == 0
    store = store_of(config)
    relpath = science_raws(copy)[0]
    (store / relpath).unlink()
    run_cli(config, "reconcile", "--fix", timeout=120)
    assert file_rows(store)[relpath]["state"] == "deleted"
    before = requests_by_path(url).get(DATA + relpath, 0)
    result = backfill(config)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert file_rows(store)[relpath]["state"] == "on_disk"
    assert (store / relpath).read_bytes() == (copy / relpath).read_bytes()
    assert requests_by_path(url)[DATA + relpath] - before <= 2  # a HEAD at most, and one GET
    assert log_lines(result.stderr, relpath) <= 5, result.stderr[-3000:]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("obstacle", ["directory_at_raw", "file_at_night_directory"])
def test_an_unexpected_error_is_recorded_once_and_the_backfill_ends(
    served_copy: tuple[Path, str], tmp_path: Path, obstacle: str
) -> None:
    copy, url = served_copy
    config = config_with(tmp_path, copy, url)
    store = store_of(config)
    relpath = science_raws(copy)[0]
    final = store / relpath
    if obstacle == "directory_at_raw":
        final.mkdir(parents=True)
    else:
        final.parent.parent.mkdir(parents=True)
        final.parent.write_bytes(b"not a directory")
    result = backfill(config)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    row = file_rows(store)[relpath]
    assert row["state"] == "missing" and row["retry_at"] is not None and row["reserved_bytes"] == 0, row
    assert "Error" in row["last_error"] and "\n" not in row["last_error"]
    assert "Traceback" not in result.stderr
    assert log_lines(result.stderr, relpath) <= 3, result.stderr[-3000:]
    assert "1 files missing or corrupt" in result.stdout
