"""Content-Encoding: every request asks for identity; an encoded answer is a clear transient error."""

from __future__ import annotations

import gzip
import random
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from astropy.io import fits

from streamer.archive.client import ArchiveClient, OutageGate, RetryPolicy
from streamer.archive.search import SearchError, search_table
from streamer.config import ArchiveConfig, StorageConfig
from streamer.ledger.core import Ledger
from streamer.service.fetcher import Fetcher
from streamer.storage.naming import SEARCH_PATH

DATA = "/ibe/data/ztf/products/"
RAW = "raw/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz"
SCI = "sci/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits"
HEADER = "sci/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o_q3_sciimg.header.fits"
CSV = "filefracday,field\n20200924431759,655\n"


class GzipArchive:
    """Gzips every answer whose request accepts gzip (or every answer when ``always``); records Accept-Encoding."""

    def __init__(self, files: dict[str, bytes], *, always: bool = False) -> None:
        self.files = files
        self.always = always
        self.seen: list[tuple[str, str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", DATA + "{path:.+}", self.data)
        app.router.add_get(SEARCH_PATH + "{table}", self.search)
        return app

    def _encode(self, request: web.Request, body: bytes, headers: dict[str, str]) -> bytes:
        accepted = request.headers.get("Accept-Encoding", "")
        self.seen.append((request.method, request.path, accepted))
        if self.always or "gzip" in accepted:
            headers["Content-Encoding"] = "gzip"
            return gzip.compress(body, mtime=0)
        return body

    async def data(self, request: web.Request) -> web.Response:
        headers = {"Content-Type": "application/fits"}
        body = self._encode(request, self.files[request.match_info["path"]], headers)
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        return web.Response(body=body, headers=headers)

    async def search(self, request: web.Request) -> web.Response:
        headers = {"Content-Type": "text/csv"}
        return web.Response(body=self._encode(request, CSV.encode(), headers), headers=headers)


def _files(tmp: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(11)
    hdus: list = [fits.PrimaryHDU(header=fits.Header({"IMGTYPE": "object"}))]
    hdus += [fits.CompImageHDU(rng.integers(0, 2**15, (32, 24)).astype(np.int32)) for _ in range(4)]
    hdus += [fits.CompImageHDU(rng.integers(0, 300, (32, 30)).astype(np.int32)) for _ in range(4)]
    fits.HDUList(hdus).writeto(tmp / "raw.fits")
    fits.PrimaryHDU(np.zeros((40, 30), np.float32)).writeto(tmp / "sci.fits")
    return {RAW: (tmp / "raw.fits").read_bytes(), SCI: (tmp / "sci.fits").read_bytes()}


@pytest_asyncio.fixture(params=[False, True], ids=["gzip-when-asked", "gzip-always"])
async def archive(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[GzipArchive, str]]:
    payload = tmp_path / "payload"
    payload.mkdir()
    server_side = GzipArchive(_files(payload), always=request.param)
    server = TestServer(server_side.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield server_side, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def _client(base: str) -> ArchiveClient:
    config = ArchiveConfig(base_url=base, max_attempts=2, min_rate_window_s=1.0, read_timeout_s=5.0)
    return ArchiveClient(config, policy=RetryPolicy(2, initial_s=0.01, max_s=0.02, rng=random.Random(2)),
                         gate=OutageGate(initial_delay_s=0.01))  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(("relpath", "kind"), [(RAW, "raw"), (HEADER, "sciimg_header")])
async def test_downloads_ask_for_identity_and_refuse_encoded_bodies(
    archive: tuple[GzipArchive, str], tmp_path: Path, relpath: str, kind: str
) -> None:
    server_side, base = archive
    storage = StorageConfig(root=tmp_path / "store", budget=10**9)
    storage.root.mkdir()
    ledger = Ledger.open(tmp_path / "ledger.sqlite")
    url = f"{base}{DATA}{relpath.replace('.header.fits', '.fits')}"
    with ledger.transaction() as conn:
        file_id = ledger.want_file(conn, relpath=relpath, kind=kind, url=url)
    async with _client(base) as client:
        outcome = await Fetcher(client, ledger, storage).fetch(file_id)
    row = ledger.file(file_id)
    ledger.close()
    assert server_side.seen and all(accepted == "identity" for _, _, accepted in server_side.seen), server_side.seen
    if not server_side.always:
        assert outcome.state == "on_disk"
        if kind == "raw":
            assert (storage.root / RAW).read_bytes() == server_side.files[RAW]
    else:
        assert outcome.state == "missing" and "Content-Encoding 'gzip'" in row["last_error"]
        assert not (storage.root / relpath).exists()


@pytest.mark.asyncio
async def test_search_asks_for_identity_and_refuses_an_encoded_answer(archive: tuple[GzipArchive, str]) -> None:
    server_side, base = archive
    async with _client(base) as client:
        if server_side.always:
            with pytest.raises(SearchError, match="Content-Encoding 'gzip'"):
                await search_table(client, "raw", "field=655", ["filefracday", "field"])
        else:
            rows = await search_table(client, "raw", "field=655", ["filefracday", "field"])
            assert [row["field"] for row in rows] == [655]
    assert all(accepted == "identity" for _, _, accepted in server_side.seen)
