"""Symlinks planted under the storage root never carry a write outside it.

A symlinked ledger lock, ``.part`` or night directory points at a file (or directory) outside
the root; the service refuses with one line and the outside target stays as it was.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from astropy.io import fits

from archive_stub import Stub
from streamer.archive.client import ArchiveClient, OutageGate, RetryPolicy
from streamer.cli import main
from streamer.config import ArchiveConfig, StorageConfig
from streamer.ledger.core import Ledger
from streamer.service.fetcher import Fetcher

RAW = "raw/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz"
SCI = "sci/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits"
HEADER = "sci/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o_q3_sciimg.header.fits"
PRECIOUS = b"precious bytes that belong to someone else\n"

CONFIG = """\
[storage]
root = "{root}"
budget = "10 GB"

[archive]
base_url = "http://127.0.0.1:9"

[photometry]
catalog_dir = "{catalog}"
"""


def _fits_bytes(tmp: Path) -> bytes:
    rng = np.random.default_rng(5)
    hdus: list = [fits.PrimaryHDU(header=fits.Header({"IMGTYPE": "object"}))]
    hdus += [fits.CompImageHDU(rng.integers(0, 2**15, (32, 24)).astype(np.int32)) for _ in range(4)]
    hdus += [fits.CompImageHDU(rng.integers(0, 300, (32, 30)).astype(np.int32)) for _ in range(4)]
    path = tmp / "raw.fits"
    fits.HDUList(hdus).writeto(path)
    return path.read_bytes()


def _sci_bytes(tmp: Path) -> bytes:
    path = tmp / "sci.fits"
    fits.PrimaryHDU(np.zeros((40, 30), np.float32)).writeto(path)
    return path.read_bytes()


@pytest_asyncio.fixture
async def stub(tmp_path: Path) -> AsyncIterator[tuple[Stub, str]]:
    payload = tmp_path / "payload"
    payload.mkdir()
    archive = Stub(files={RAW: _fits_bytes(payload), SCI: _sci_bytes(payload)})
    server = TestServer(archive.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield archive, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def _outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_bytes(PRECIOUS)
    return target


async def _fetch_one(tmp_path: Path, base: str, relpath: str, kind: str) -> tuple[str, dict, Path]:  # type: ignore[type-arg]
    storage = StorageConfig(root=tmp_path / "store", budget=10**9)
    config = ArchiveConfig(base_url=base, max_attempts=2, min_rate_window_s=1.0, read_timeout_s=5.0)
    ledger = Ledger.open(tmp_path / "ledger.sqlite")
    url_path = relpath.replace(".header.fits", ".fits")
    with ledger.transaction() as conn:
        file_id = ledger.want_file(conn, relpath=relpath, kind=kind, url=f"{base}/ibe/data/ztf/products/{url_path}")
    policy = RetryPolicy(2, initial_s=0.01, max_s=0.02, rng=random.Random(1))
    async with ArchiveClient(config, policy=policy, gate=OutageGate(initial_delay_s=0.01)) as client:
        outcome = await Fetcher(client, ledger, storage).fetch(file_id)
    row = ledger.file(file_id)
    ledger.close()
    return outcome.state, row, storage.root


@pytest.mark.asyncio
@pytest.mark.parametrize(("relpath", "kind"), [(RAW, "raw"), (HEADER, "sciimg_header")])
async def test_a_symlinked_part_is_refused_and_its_target_untouched(
    stub: tuple[Stub, str], tmp_path: Path, relpath: str, kind: str
) -> None:
    _, base = stub
    target = _outside(tmp_path)
    part = tmp_path / "store" / (relpath + ".part")
    part.parent.mkdir(parents=True)
    part.symlink_to(target)
    state, row, _ = await _fetch_one(tmp_path, base, relpath, kind)
    assert target.read_bytes() == PRECIOUS
    assert state == "missing" and row["state"] == "missing" and row["reserved_bytes"] == 0
    assert "symlink" in row["last_error"] and "\n" not in row["last_error"]
    assert not (tmp_path / "store" / relpath).exists()


@pytest.mark.asyncio
async def test_a_symlinked_night_directory_sends_nothing_outside(stub: tuple[Stub, str], tmp_path: Path) -> None:
    _, base = stub
    target = _outside(tmp_path)
    night = tmp_path / "store" / "raw" / "2020" / "0924"
    night.parent.mkdir(parents=True)
    night.symlink_to(target.parent, target_is_directory=True)
    state, row, _ = await _fetch_one(tmp_path, base, RAW, "raw")
    assert sorted(p.name for p in target.parent.iterdir()) == ["precious.txt"]
    assert target.read_bytes() == PRECIOUS
    assert state == "missing" and "symlink" in row["last_error"] and "\n" not in row["last_error"]


@pytest.mark.asyncio
async def test_a_symlinked_final_file_is_not_adopted(stub: tuple[Stub, str], tmp_path: Path) -> None:
    archive, base = stub
    outside = tmp_path / "outside.fits"
    outside.write_bytes(archive.files[RAW])
    final = tmp_path / "store" / RAW
    final.parent.mkdir(parents=True)
    final.symlink_to(outside)
    state, row, _ = await _fetch_one(tmp_path, base, RAW, "raw")
    assert state == "missing" and "symlink" in row["last_error"]
    assert outside.read_bytes() == archive.files[RAW]


def test_a_symlinked_ledger_lock_is_refused_by_backfill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = _outside(tmp_path)
    root = tmp_path / "store"
    root.mkdir()
    (root / "ledger.sqlite.lock").symlink_to(target)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(root=root, catalog=tmp_path / "refcat"))
    code = main(["--config", str(config), "backfill", "--start", "2020-09-24", "--end", "2020-09-24"])
    captured = capsys.readouterr()
    assert code == 2
    assert target.read_bytes() == PRECIOUS
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "ledger.sqlite.lock" in lines[0] and "symlink" in lines[0]
    assert "Traceback" not in captured.out + captured.err
