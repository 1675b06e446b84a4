"""Sizes from the archive: a HEAD of 0 bytes is unknown, not a size; an absurd size is refused, not reserved."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from astropy.io import fits

from streamer.archive.client import ArchiveClient, OutageGate, RetryPolicy
from streamer.config import ArchiveConfig, StorageConfig
from streamer.ledger.core import Ledger
from streamer.service.fetcher import Fetcher

DATA = "/ibe/data/ztf/products/"
RAW = "raw/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz"


def _raw_bytes(tmp: Path) -> bytes:
    rng = np.random.default_rng(13)
    hdus: list = [fits.PrimaryHDU(header=fits.Header({"IMGTYPE": "object"}))]
    hdus += [fits.CompImageHDU(rng.integers(0, 2**15, (32, 24)).astype(np.int32)) for _ in range(4)]
    hdus += [fits.CompImageHDU(rng.integers(0, 300, (32, 30)).astype(np.int32)) for _ in range(4)]
    fits.HDUList(hdus).writeto(tmp / "raw.fits", overwrite=True)
    return (tmp / "raw.fits").read_bytes()


async def _fetch(tmp_path: Path, head_length: str, *, planned_size: int | None = None) -> tuple[str, dict, bytes]:  # type: ignore[type-arg]
    body = _raw_bytes(tmp_path)
    heads: list[str] = []

    async def data(request: web.Request) -> web.Response:
        if request.method == "HEAD":
            heads.append(head_length)
            return web.Response(headers={"Content-Length": head_length, "Content-Type": "application/fits"})
        return web.Response(body=body, headers={"Content-Type": "application/fits"})

    app = web.Application()
    app.router.add_route("*", DATA + "{path:.+}", data)
    storage = StorageConfig(root=tmp_path / "store", budget=10**9)
    storage.root.mkdir()
    ledger = Ledger.open(tmp_path / "ledger.sqlite")
    async with TestServer(app, host="127.0.0.1") as server:
        base = f"http://127.0.0.1:{server.port}"
        with ledger.transaction() as conn:
            file_id = ledger.want_file(conn, relpath=RAW, kind="raw", url=base + DATA + RAW, expected_size=planned_size)
        config = ArchiveConfig(base_url=base, max_attempts=2, min_rate_window_s=1.0, read_timeout_s=5.0)
        policy = RetryPolicy(2, initial_s=0.01, max_s=0.02, rng=random.Random(4))
        async with ArchiveClient(config, policy=policy, gate=OutageGate(initial_delay_s=0.01)) as client:
            outcome = await Fetcher(client, ledger, storage).fetch(file_id)
    row = ledger.file(file_id)
    ledger.close()
    assert heads, "the size was asked with HEAD"
    return outcome.state, row, body


@pytest.mark.timeout(60)
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("head_length", "reason"),
    [("0", "Content-Length 0"), (str(2**50), "more than"), (str(4 * 2**30 + 1), "more than")],
)
async def test_an_unusable_head_size_is_not_recorded(tmp_path: Path, head_length: str, reason: str) -> None:
    state, row, _ = await _fetch(tmp_path, head_length)
    assert state == "missing" and reason in row["last_error"], row["last_error"]
    assert row["expected_size"] is None and row["reserved_bytes"] == 0
    assert not (tmp_path / "store" / RAW).exists()


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_an_absurd_planned_size_is_asked_again(tmp_path: Path) -> None:
    body_size = len(_raw_bytes(tmp_path))
    state, row, body = await _fetch(tmp_path, str(body_size), planned_size=2**50)
    assert state == "on_disk" and row["expected_size"] == body_size
    assert (tmp_path / "store" / RAW).read_bytes() == body
