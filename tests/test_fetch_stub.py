"""Fetcher behaviour against a scripted stub archive: retries, resume, verification, refusals, headers, login."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from astropy.io import fits
from astropy.wcs import WCS
from fetch_helpers import fetch_ids

from archive_stub import Stub
from streamer.archive.auth import AuthError, Credentials
from streamer.archive.client import ArchiveClient, OutageGate, RetryPolicy
from streamer.archive.transfer import read_stored_header
from streamer.config import ArchiveConfig, StorageConfig
from streamer.ledger.core import Ledger
from streamer.ledger.downloads import download_candidates, outage_recorder
from streamer.service.fetcher import Fetcher

RAW = "raw/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o.fits.fz"
SCI = "sci/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits"
MSK = "sci/2020/0924/431759/ztf_20200924431759_000655_zr_c13_o_q3_mskimg.fits"


def _raw_bytes(tmp: Path, seed: int = 1, shape: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    hdus: list = [fits.PrimaryHDU(header=fits.Header({"IMGTYPE": "object", "ILUM_LED": 7}))]
    hdus += [fits.CompImageHDU(rng.integers(0, 2**15, shape).astype(np.int32)) for _ in range(4)]
    hdus += [fits.CompImageHDU(rng.integers(0, 300, (shape[0], 30)).astype(np.int32)) for _ in range(4)]
    path = tmp / f"raw{seed}.fits"
    fits.HDUList(hdus).writeto(path)
    return path.read_bytes()


def _sci_bytes(tmp: Path) -> bytes:
    header = fits.Header()
    for key, value in {"WCSAXES": 2, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": 20.0,
                       "CRPIX1": 100.0, "CRPIX2": 90.0, "CD1_1": -2.8e-4, "CD1_2": 1e-6, "CD2_1": 2e-6,
                       "CD2_2": 2.8e-4}.items():  # fmt: skip
        header[key] = value
    for i in range(400):  # a long header, like IPAC's, spanning several blocks
        header[f"HIST{i:04d}"] = i
    path = tmp / "sci.fits"
    fits.PrimaryHDU(np.zeros((3000, 2000), np.float32), header=header).writeto(path)
    return path.read_bytes()


def _mask_bytes(tmp: Path) -> bytes:
    data = np.zeros((64, 48), np.int16)
    data[5:9, 3] = 4
    path = tmp / "msk.fits"
    fits.PrimaryHDU(data).writeto(path, checksum=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("payloads")
    return tmp, {RAW: _raw_bytes(tmp), SCI: _sci_bytes(tmp), MSK: _mask_bytes(tmp)}


@pytest_asyncio.fixture
async def stub(payloads: tuple[Path, dict[str, bytes]]) -> AsyncIterator[tuple[Stub, str]]:
    archive = Stub(files=dict(payloads[1]))
    server = TestServer(archive.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield archive, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def _setup(tmp_path: Path, base_url: str, *, budget: int = 10**9, **archive: object) -> tuple[ArchiveConfig, StorageConfig, Ledger]:
    settings: dict[str, object] = {"max_attempts": 5, "min_rate_window_s": 1.0, "read_timeout_s": 5.0, **archive}
    config = ArchiveConfig(base_url=base_url, **settings)  # type: ignore[arg-type]
    storage = StorageConfig(root=tmp_path / "store", budget=budget)
    storage.root.mkdir(exist_ok=True)
    return config, storage, Ledger.open(tmp_path / "ledger.sqlite")


def _client(config: ArchiveConfig, ledger: Ledger, credentials: Credentials | None = None) -> ArchiveClient:
    policy = RetryPolicy(config.max_attempts, initial_s=0.01, max_s=0.05, rng=random.Random(3))
    return ArchiveClient(config, credentials=credentials, policy=policy, gate=OutageGate(recorder=outage_recorder(ledger), initial_delay_s=0.05))


def _want(
    ledger: Ledger, base_url: str, relpath: str, kind: str, url_path: str | None = None, size: int | None = None,
    kept: bool = False,
) -> int:  # fmt: skip
    url = f"{base_url}/ibe/data/ztf/products/{url_path or relpath}"
    with ledger.transaction() as conn:
        return ledger.want_file(conn, relpath=relpath, kind=kind, url=url, expected_size=size, kept=kept)


@pytest.mark.asyncio
async def test_faults_are_retried_and_counted(stub: tuple[Stub, str], tmp_path: Path) -> None:
    archive, base = stub
    archive.faults[RAW] = ["500", "truncate", "html", "garbage", "429"]
    config, storage, ledger = _setup(tmp_path, base, max_attempts=8)
    file_id = _want(ledger, base, RAW, "raw")
    async with _client(config, ledger) as client:
        outcome = await Fetcher(client, ledger, storage).fetch(file_id)
    row = ledger.file(file_id)
    assert outcome.state == "on_disk" and row["state"] == "on_disk"
    assert (storage.root / RAW).read_bytes() == archive.files[RAW]
    assert row["attempts"] == archive.requests[("GET", RAW)] == 6
    assert row["disk_bytes"] >= row["actual_size"] == len(archive.files[RAW]) and row["reserved_bytes"] == 0
    assert not list(storage.root.rglob("*.part"))
    ledger.close()


@pytest.mark.asyncio
async def test_chunked_body_arrives_whole(stub: tuple[Stub, str], tmp_path: Path, payloads: tuple[Path, dict[str, bytes]]) -> None:
    """A body in HTTP chunks (no Content-Length), larger than one write, is stored byte for byte:
    the ends of the chunks are not the end of the body."""
    archive, base = stub
    archive.chunked = True
    archive.files[RAW] = _raw_bytes(payloads[0], seed=5, shape=(512, 512))
    assert len(archive.files[RAW]) > 2 * 2**20
    config, storage, ledger = _setup(tmp_path, base)
    file_id = _want(ledger, base, RAW, "raw")
    async with _client(config, ledger) as client:
        outcome = await Fetcher(client, ledger, storage).fetch(file_id)
    assert outcome.state == "on_disk"
    assert (storage.root / RAW).read_bytes() == archive.files[RAW]
    assert archive.requests[("GET", RAW)] == 1
    ledger.close()


@pytest.mark.asyncio
async def test_truncated_transfer_resumes_with_range(stub: tuple[Stub, str], tmp_path: Path) -> None:
    archive, base = stub
    archive.faults[RAW] = ["reset"]
    config, storage, ledger = _setup(tmp_path, base)
    file_id = _want(ledger, base, RAW, "raw")
    async with _client(config, ledger) as client:
        assert (await Fetcher(client, ledger, storage).fetch(file_id)).state == "on_disk"
    size = len(archive.files[RAW])
    assert archive.bytes_sent[RAW] < 1.6 * size  # the second request only sent the rest
    assert (storage.root / RAW).read_bytes() == archive.files[RAW]
    ledger.close()


@pytest.mark.asyncio
async def test_refused_file_ends_missing_with_status_and_retry_date(stub: tuple[Stub, str], tmp_path: Path) -> None:
    archive, base = stub
    archive.faults[RAW] = ["403"]
    config, storage, ledger = _setup(tmp_path, base)
    file_id = _want(ledger, base, RAW, "raw", kept=True)
    gone = _want(ledger, base, RAW.replace("431759", "431760"), "raw", kept=True)
    async with _client(config, ledger) as client:
        fetcher = Fetcher(client, ledger, storage)
        outcomes = await fetch_ids(fetcher, [file_id, gone])
    assert {o.state for o in outcomes} == {"missing"}
    row = ledger.file(file_id)
    assert row["http_status"] == 403 and "403" in row["last_error"] and row["retry_at"] is not None
    assert ledger.file(gone)["http_status"] == 404 and row["reserved_bytes"] == 0
    # Refused files are due again once their retry date has passed, not before.
    def due(now: float) -> list[int]:
        rows = download_candidates(ledger, limit=10, burst=False, now=now, max_missing=config.missing_max_attempts, exclude=())
        return [r["id"] for r in rows]

    assert due(row["retry_at"] - 60) == [] and due(row["retry_at"] + 1) == [file_id, gone]
    assert not list(storage.root.rglob("*.part"))
    ledger.close()


@pytest.mark.asyncio
async def test_stalled_transfer_is_aborted_and_retried(stub: tuple[Stub, str], tmp_path: Path) -> None:
    archive, base = stub
    archive.faults[RAW] = ["stall"]
    config, storage, ledger = _setup(tmp_path, base, min_rate_bytes_per_s=10_000)
    file_id = _want(ledger, base, RAW, "raw")
    async with _client(config, ledger) as client:
        outcome = await asyncio.wait_for(Fetcher(client, ledger, storage).fetch(file_id), 30)
    assert outcome.state == "on_disk" and "stalled" in (ledger.rows("SELECT message FROM events") or [{}])[0].get("message", "stalled")
    assert archive.requests[("GET", RAW)] == 2
    ledger.close()


@pytest.mark.asyncio
async def test_mask_is_stored_compressed_and_lossless(
    stub: tuple[Stub, str], tmp_path: Path, payloads: tuple[Path, dict[str, bytes]]
) -> None:
    archive, base = stub
    config, storage, ledger = _setup(tmp_path, base)
    file_id = _want(ledger, base, MSK + ".fz", "mskimg", url_path=MSK)
    async with _client(config, ledger) as client:
        assert (await Fetcher(client, ledger, storage).fetch(file_id)).state == "on_disk"
    with fits.open(storage.root / (MSK + ".fz")) as stored, fits.open(payloads[0] / "msk.fits") as served:
        assert stored[1].data.dtype.kind == "i" and np.array_equal(stored[1].data, served[0].data)
    ledger.close()


@pytest.mark.parametrize("honour_range", [True, False])
@pytest.mark.asyncio
async def test_header_only_fetch(
    stub: tuple[Stub, str], tmp_path: Path, honour_range: bool, payloads: tuple[Path, dict[str, bytes]]
) -> None:
    archive, base = stub
    archive.honour_range = honour_range
    config, storage, ledger = _setup(tmp_path, base)
    relpath = SCI.replace("_sciimg.fits", "_sciimg.header.fits")
    file_id = _want(ledger, base, relpath, "sciimg_header", url_path=SCI)
    async with _client(config, ledger) as client:
        outcome = await Fetcher(client, ledger, storage).fetch(file_id)
    assert outcome.state == "on_disk" and outcome.bytes_transferred < 64 * 1024
    assert archive.bytes_sent[SCI] < len(archive.files[SCI]) / 2  # the transfer stopped early
    header = read_stored_header(storage.root / relpath)
    full = fits.getheader(payloads[0] / "sci.fits")
    assert WCS(header).to_header_string() == WCS(full).to_header_string()
    assert (header["NAXIS1"], header["NAXIS2"]) == (2000, 3000)
    ledger.close()


@pytest.mark.asyncio
async def test_login_and_wrong_password(stub: tuple[Stub, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive, base = stub
    archive.password = "correct horse"
    config, storage, ledger = _setup(tmp_path, base)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthError, match="'ann'.*JOSSO_SESSIONID") as info:
        async with _client(config, ledger, Credentials("ann", "wrong one")):
            pass
    assert "wrong one" not in str(info.value)
    file_id = _want(ledger, base, RAW, "raw")
    archive.faults[RAW] = ["html"]  # an expired session: log in again once, then retry
    async with _client(config, ledger, Credentials("ann", "correct horse")) as client:
        assert (await Fetcher(client, ledger, storage).fetch(file_id)).state == "on_disk"
    assert archive.logins == 3
    dump = "\n".join(str(r) for r in ledger.rows("SELECT * FROM files")) + "\n".join(
        str(r) for r in ledger.rows("SELECT * FROM events")
    )
    for text in (caplog.text, dump):
        assert "correct horse" not in text and "wrong one" not in text
    ledger.close()


@pytest.mark.asyncio
async def test_outage_pauses_instead_of_burning_attempts(stub: tuple[Stub, str], tmp_path: Path, payloads: tuple[Path, dict[str, bytes]]) -> None:
    archive, base = stub
    relpaths = [RAW.replace("431759", f"43{i:04d}") for i in range(12)]
    for relpath in relpaths:
        archive.files[relpath] = payloads[1][RAW]
    archive.down_until = asyncio.get_running_loop().time() + 1.0
    config, storage, ledger = _setup(tmp_path, base, max_attempts=3)
    ids = [_want(ledger, base, r, "raw", size=len(payloads[1][RAW])) for r in relpaths]
    async with _client(config, ledger) as client:
        outcomes = await fetch_ids(Fetcher(client, ledger, storage), ids)
        assert client.gate.pauses >= 1 and not client.gate.in_outage
    assert {o.state for o in outcomes} == {"on_disk"}
    kinds = [r["kind"] for r in ledger.rows("SELECT kind FROM events ORDER BY id")]
    assert "archive_outage" in kinds and kinds[-1] == "archive_back"
    assert '"outage": false' in (ledger.get_meta("archive.outage") or "")
    requests = sum(n for (method, _), n in archive.requests.items() if method == "GET")
    assert sum(r["attempts"] for r in ledger.rows("SELECT attempts FROM files")) == requests > 12 + 3 * 4
    ledger.close()


@pytest.mark.asyncio
async def test_low_free_space_pauses_downloads(stub: tuple[Stub, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, base = stub
    config, storage, ledger = _setup(tmp_path, base)
    file_id = _want(ledger, base, RAW, "raw")
    real_usage = shutil.disk_usage
    calls = {"n": 0}

    def usage(path: object) -> object:
        calls["n"] += 1
        found = real_usage(path)  # type: ignore[arg-type]
        return found._replace(free=0) if calls["n"] <= 2 else found  # another process filled the disk, then left

    monkeypatch.setattr("streamer.service.fetcher.shutil.disk_usage", usage)
    async with _client(config, ledger) as client:
        fetcher = Fetcher(client, ledger, storage, disk_pause_s=0.05)
        assert (await fetcher.fetch(file_id)).state == "on_disk"
    events = ledger.rows("SELECT kind, message FROM events WHERE kind = 'disk_full'")
    assert len(events) == 2 and "free" in events[0]["message"] and calls["n"] == 3
    ledger.close()


@pytest.mark.asyncio
async def test_file_already_at_its_place_is_verified_not_downloaded(stub: tuple[Stub, str], tmp_path: Path) -> None:
    archive, base = stub
    config, storage, ledger = _setup(tmp_path, base)
    good, bad = RAW, RAW.replace("431759", "431760")
    archive.files[bad] = archive.files[RAW]
    for relpath, content in ((good, archive.files[RAW]), (bad, archive.files[RAW][:-2880])):
        (storage.root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (storage.root / relpath).write_bytes(content)
    ids = [_want(ledger, base, good, "raw"), _want(ledger, base, bad, "raw")]
    async with _client(config, ledger) as client:
        outcomes = await fetch_ids(Fetcher(client, ledger, storage), ids)
    assert [o.state for o in outcomes] == ["on_disk", "on_disk"]
    assert archive.requests[("GET", good)] == 0 and archive.requests[("GET", bad)] == 1
    assert (storage.root / bad).read_bytes() == archive.files[RAW]
    ledger.close()


@pytest.mark.asyncio
async def test_the_end_of_an_http_chunk_is_not_the_end_of_the_body() -> None:
    """aiohttp's ``readchunk`` answers (b"", True) when a chunk's end arrives after its bytes were
    read; the body goes on after it."""
    from types import SimpleNamespace
    from unittest.mock import Mock

    from aiohttp import StreamReader

    from streamer.archive.transfer import _RateGuard, _read_chunks

    content = StreamReader(Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    chunks = _read_chunks(SimpleNamespace(content=content), _RateGuard(0, 1.0))  # type: ignore[arg-type]
    content.begin_http_chunk_receiving()
    content.feed_data(b"SIMPLE")
    assert await chunks.__anext__() == b"SIMPLE"
    content.end_http_chunk_receiving()  # the end of the first chunk, after its bytes were read
    content.begin_http_chunk_receiving()
    content.feed_data(b"  = T")
    content.end_http_chunk_receiving()
    content.feed_eof()
    assert [chunk async for chunk in chunks] == [b"  = T"]
