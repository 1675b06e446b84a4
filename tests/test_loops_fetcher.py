"""A file that fails as a whole is retried after growing delays and parked after a bounded number of failures.

The fetcher runs against the simulated archive on loopback, whose copy of one raw is damaged
(every answer fails verification) or which answers normally while a directory sits where the
file goes. Between two fetches the file's retry date is moved to the past, as the passing of
time would; the delays expected are those the rule documents.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from test_loops_downloads import DATA, damage_first_extension

from e2e import NIGHT
from streamer.archive.client import ArchiveClient, OutageGate, RetryPolicy
from streamer.config import ArchiveConfig, StorageConfig
from streamer.ledger.core import Ledger
from streamer.ledger.downloads import download_candidates
from streamer.rules.download_retry import FILE_RETRY_S, MAX_FILE_FAILURES
from streamer.service.fetcher import DownloadError, Fetcher
from streamer.sim.generate import NightTruth, generate_night
from streamer.sim.server import serve

MAX_ATTEMPTS = 2


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> NightTruth:
    out = tmp_path_factory.mktemp("loops-fetcher")
    return generate_night(
        out, NIGHT, ccds=(13,), n_exposures=1, flats_per_led=0, n_biases=1, seed=6, shape="small",
        filters=("zr",), flat_filters=(),
    )  # fmt: skip


async def _fetch_until_parked(archive: Path, tmp_path: Path, relpath: str, *, obstacle: bool) -> dict[str, Any]:
    storage = StorageConfig(root=tmp_path / "store", budget=10**9)
    if obstacle:
        (storage.root / relpath).mkdir(parents=True)
    retry_in: list[float | None] = []
    states: list[str] = []
    async with serve(archive) as server:
        config = ArchiveConfig(base_url=server.base_url, max_attempts=MAX_ATTEMPTS, read_timeout_s=5.0)
        policy = RetryPolicy(MAX_ATTEMPTS, initial_s=0.01, max_s=0.02, rng=random.Random(2))
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            with ledger.transaction() as conn:
                file_id = ledger.want_file(conn, relpath=relpath, kind="raw", url=server.base_url + DATA + relpath, kept=True)
            async with ArchiveClient(config, policy=policy, gate=OutageGate(initial_delay_s=0.01)) as client:
                fetcher = Fetcher(client, ledger, storage)
                for _ in range(MAX_FILE_FAILURES + 1):
                    before = time.time()
                    try:
                        states.append((await fetcher.fetch(file_id)).state)
                    except DownloadError:
                        states.append("error")
                    row = ledger.file(file_id)
                    retry_in.append(None if row["retry_at"] is None else row["retry_at"] - before)
                    # not due before its retry date, in a daemon or in a burst
                    for burst in (False, True):
                        due = download_candidates(ledger, limit=5, burst=burst, now=time.time(), max_missing=100, exclude=())
                        assert file_id not in {r["id"] for r in due}
                    if row["retry_at"] is not None:
                        with ledger.transaction() as conn:
                            ledger.set_file_state(conn, file_id, row["state"], retry_at=time.time() - 1)
            row = ledger.file(file_id)
            events = ledger.rows("SELECT kind FROM events WHERE file_id = ? AND kind = 'download_failed'", (file_id,))
        requests = server.faults()["attempts_by_path"].get(DATA + relpath, 0)
    return {"row": row, "retry_in": retry_in, "states": states, "requests": requests, "failures": len(events)}


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_a_file_always_served_damaged_backs_off_then_is_parked(night: NightTruth, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(night.out, archive)
    relpath = night.raw_relpaths("object")[0]
    damage_first_extension(archive / relpath)
    found = await _fetch_until_parked(archive, tmp_path, relpath, obstacle=False)
    assert found["states"] == ["corrupt"] * (MAX_FILE_FAILURES + 1)
    delays = found["retry_in"][: MAX_FILE_FAILURES - 1]
    for delay, expected in zip(delays, FILE_RETRY_S, strict=False):
        assert expected - 5 <= delay <= expected + 5
    assert delays == sorted(delays) and delays[0] >= 3600 - 5
    assert found["retry_in"][MAX_FILE_FAILURES - 1 :] == [None, None]  # parked, and a fetch of a parked file asks nothing
    assert found["failures"] == MAX_FILE_FAILURES
    row = found["row"]
    assert row["state"] == "corrupt" and "verification failed" in row["last_error"] and row["reserved_bytes"] == 0
    # one HEAD, then MAX_ATTEMPTS GETs per failure; nothing after it was parked
    assert found["requests"] == 1 + MAX_FILE_FAILURES * MAX_ATTEMPTS


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_an_unexpected_error_backs_off_then_is_parked(night: NightTruth, tmp_path: Path) -> None:
    relpath = night.raw_relpaths("object")[0]
    found = await _fetch_until_parked(night.out, tmp_path, relpath, obstacle=True)
    assert found["states"] == ["error"] * MAX_FILE_FAILURES + ["missing"]
    delays = found["retry_in"][: MAX_FILE_FAILURES - 1]
    assert delays == sorted(delays) and delays[0] >= 3600 - 5
    assert found["retry_in"][MAX_FILE_FAILURES - 1 :] == [None, None]
    row = found["row"]
    assert row["state"] == "missing" and "IsADirectoryError" in row["last_error"] and "\n" not in row["last_error"]
    assert found["failures"] == MAX_FILE_FAILURES and row["reserved_bytes"] == 0
