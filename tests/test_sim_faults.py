"""Each fault kind, seen by a real aiohttp client over loopback, and the exact counts the server keeps."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import aiohttp
import pytest
from astropy.io import fits

from simhelpers import small_night
from streamer.errors import UsageError
from streamer.sim.faults import PROFILES, TRANSIENT_KINDS, FaultProfile, choose_fault, load_profile
from streamer.sim.generate import NightTruth
from streamer.sim.server import serve

DATA = "/ibe/data/ztf/products/"
SEARCH = "/ibe/search/ztf/products/raw"


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> NightTruth:
    return small_night(tmp_path_factory.mktemp("faulty"), n_biases=3, flats_per_led=0, n_exposures=2, filters=("zr",), flat_filters=())


def only(kind: str, **extra: object) -> FaultProfile:
    """Every first attempt of every path gets ``kind``; later attempts are clean."""
    return FaultProfile(kind, rate=1.0, kinds=(kind,), max_faulted_attempts=1, **extra)  # type: ignore[arg-type]


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
    async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, dict(response.headers), await response.read()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind, status", [("http_500", 500), ("http_503", 503), ("http_504", 504), ("http_429", 429)])
async def test_status_faults_then_success(night: NightTruth, kind: str, status: int) -> None:
    relpath = night.raw_relpaths("object")[0]
    async with serve(night.out, faults=only(kind)) as server, aiohttp.ClientSession() as session:
        first = await fetch(session, server.base_url + DATA + relpath)
        assert first[0] == status
        if kind == "http_429":
            assert first[1]["Retry-After"] == "1"
        second = await fetch(session, server.base_url + DATA + relpath)
        assert second[0] == 200 and second[2] == (night.out / relpath).read_bytes()
        search = await fetch(session, server.base_url + SEARCH, params={"WHERE": "ccdid=13", "ct": "csv"})
        assert search[0] == status
        counts = server.faults()
    assert counts["by_kind"] == {kind: 2}
    assert counts["by_path"][DATA + relpath] == {kind: 1}
    assert counts["attempts_by_path"][DATA + relpath] == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["reset", "truncated"])
async def test_cut_bodies_fail_the_client_then_succeed(night: NightTruth, kind: str) -> None:
    relpath = night.raw_relpaths("object")[0]
    content = (night.out / relpath).read_bytes()
    async with serve(night.out, faults=only(kind)) as server, aiohttp.ClientSession() as session:
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(server.base_url + DATA + relpath) as response:
                assert response.headers["Content-Length"] == str(len(content))
                async for chunk in response.content.iter_any():
                    received += chunk
        assert 0 < len(received) < len(content) and content.startswith(bytes(received))
        assert (await fetch(session, server.base_url + DATA + relpath))[2] == content
        assert server.faults()["by_kind"] == {kind: 1}


def opens_as_raw(body: bytes) -> bool:
    """What a careful client checks: the primary HDU, then 8 tile-compressed image HDUs that decompress."""
    try:
        with fits.open(io.BytesIO(body)) as hdus:
            if len(hdus) != 9 or not all(isinstance(hdus[i], fits.CompImageHDU) for i in range(1, 9)):
                return False
            return hdus[1].data is not None
    except (OSError, ValueError, AttributeError, IndexError, TypeError):
        return False


@pytest.mark.asyncio
async def test_corrupt_body_is_noticed_by_a_fits_reader(night: NightTruth) -> None:
    relpaths = night.raw_relpaths()
    async with serve(night.out, faults=only("corrupt"), fault_seed=3) as server, aiohttp.ClientSession() as session:
        for relpath in relpaths:
            content = (night.out / relpath).read_bytes()
            status, headers, body = await fetch(session, server.base_url + DATA + relpath)
            assert status == 200 and len(body) == len(content) == int(headers["Content-Length"]) and body != content
            assert not opens_as_raw(body)
            again = (await fetch(session, server.base_url + DATA + relpath))[2]
            assert again == content and opens_as_raw(again)
        assert server.faults()["by_kind"] == {"corrupt": len(relpaths)}


@pytest.mark.asyncio
async def test_html_page_with_status_200(night: NightTruth) -> None:
    relpath = night.raw_relpaths("bias")[0]
    async with serve(night.out, faults=only("html")) as server, aiohttp.ClientSession() as session:
        async with session.get(server.base_url + DATA + relpath) as response:
            assert response.status == 200 and response.content_type == "text/html"
            assert b"<html" in (await response.read()).lower()
        assert (await fetch(session, server.base_url + DATA + relpath))[2].startswith(b"SIMPLE  =")
        assert server.faults()["by_kind"] == {"html": 1}


@pytest.mark.asyncio
async def test_slow_drip_delivers_slowly_but_completely(night: NightTruth) -> None:
    relpath = night.raw_relpaths("bias")[0]
    content = (night.out / relpath).read_bytes()
    rate = len(content) * 4  # a quarter of a second for the whole file
    async with serve(night.out, faults=only("drip", drip_bytes_per_second=rate)) as server, aiohttp.ClientSession() as session:
        start = time.perf_counter()
        assert (await fetch(session, server.base_url + DATA + relpath))[2] == content
        dripped = time.perf_counter() - start
        start = time.perf_counter()
        assert (await fetch(session, server.base_url + DATA + relpath))[2] == content
        assert dripped > 0.2 > time.perf_counter() - start
        assert server.faults()["by_kind"] == {"drip": 1}


@pytest.mark.asyncio
async def test_stall_never_completes_and_the_server_still_stops(night: NightTruth) -> None:
    relpath = night.raw_relpaths("bias")[0]
    profile = FaultProfile("stalls", stall_rate=1.0)
    async with serve(night.out, faults=profile) as server:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=0.5)) as session:
            with pytest.raises(asyncio.TimeoutError):
                await fetch(session, server.base_url + DATA + relpath)
        assert server.faults()["by_kind"] == {"stall": 1}


@pytest.mark.asyncio
async def test_missing_is_permanent_but_still_listed(night: NightTruth) -> None:
    relpath = night.raw_relpaths("bias")[0]
    async with serve(night.out, faults=FaultProfile("gone", missing_fraction=1.0)) as server, aiohttp.ClientSession() as session:
        for _ in range(5):
            assert (await fetch(session, server.base_url + DATA + relpath))[0] == 404
        status, _, body = await fetch(session, server.base_url + SEARCH, params={"WHERE": "imgtype='bias'", "ct": "csv"})
        assert status == 200 and len(body.decode().splitlines()) == 1 + 3
        assert server.faults()["by_kind"] == {"missing": 5}


@pytest.mark.asyncio
async def test_flaky_always_succeeds_on_retry_and_counts_match_the_client(night: NightTruth) -> None:
    """Retry every request until it succeeds; the server's counts equal the client's failures (plus drips)."""
    urls = [DATA + p for p in night.relpaths]
    failures: dict[str, int] = {}

    async def get_until_good(session: aiohttp.ClientSession, base_url: str, path: str) -> int:
        expected = (night.out / path.removeprefix(DATA)).read_bytes()
        for attempt in range(10):
            try:
                async with session.get(base_url + path) as response:
                    body = await response.read()
                    if response.status == 200 and body == expected:
                        return attempt
            except aiohttp.ClientError:
                pass
            failures[path] = failures.get(path, 0) + 1
        raise AssertionError(f"{path} never succeeded")

    async with serve(night.out, faults="flaky", fault_seed=11) as server:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=4)) as session:
            attempts = await asyncio.gather(*(get_until_good(session, server.base_url, u) for u in urls))
        counts = server.faults()
    assert max(attempts) <= PROFILES["flaky"].max_faulted_attempts
    # a drip slows a request down without failing it
    failed_by_server = {p: sum(n for k, n in v.items() if k != "drip") for p, v in counts["by_path"].items()}
    assert counts["total"] - counts["by_kind"].get("drip", 0) == sum(failures.values()) > 0
    assert {p: n for p, n in failed_by_server.items() if n} == failures
    assert len(counts["by_kind"]) >= 4


def test_fault_choice_is_a_pure_function_of_seed_path_and_attempt() -> None:
    hostile = PROFILES["hostile"]
    keys = [f"/ibe/data/ztf/products/raw/x{i}.fits.fz" for i in range(400)]

    def choices(seed: int) -> list[str | None]:
        return [choose_fault(hostile, seed, k, a, is_data=True, is_fits=True, is_head=False) for k in keys for a in range(5)]

    assert choices(1) == choices(1) != choices(2)
    picked = choices(1)
    assert {"missing", "stall"} <= set(picked)
    assert set(TRANSIENT_KINDS) <= set(picked)
    missing = {k for k in keys if choose_fault(hostile, 1, k, 0, is_data=True, is_fits=True, is_head=False) == "missing"}
    assert all(choose_fault(hostile, 1, k, 7, is_data=True, is_fits=True, is_head=False) == "missing" for k in missing)
    flaky = PROFILES["flaky"]
    assert all(choose_fault(flaky, 1, k, 3, is_data=True, is_fits=True, is_head=False) is None for k in keys)
    assert all(choose_fault(flaky, 1, k, a, is_data=False, is_fits=False, is_head=True) not in ("reset", "corrupt", "drip") for k in keys for a in range(3))


def test_toml_profiles(tmp_path: Path) -> None:
    path = tmp_path / "rates.toml"
    path.write_text('rate = 0.5\nkinds = ["http_503", "reset"]\nignore_range = true\nmax_faulted_attempts = 2\n')
    profile = load_profile(str(path))
    assert (profile.rate, profile.kinds, profile.ignore_range, profile.max_faulted_attempts) == (0.5, ("http_503", "reset"), True, 2)
    path.write_text("rate = 2\n")
    with pytest.raises(UsageError, match="rate"):
        load_profile(str(path))
    path.write_text("speed = 1\n")
    with pytest.raises(UsageError, match="unknown keys speed"):
        load_profile(str(path))
    path.write_text('kinds = ["meteor"]\n')
    with pytest.raises(UsageError, match="kinds"):
        load_profile(str(path))
    with pytest.raises(UsageError, match="expected none, flaky, hostile"):
        load_profile("chaotic")


@pytest.mark.asyncio
async def test_faults_are_counted_only_when_delivered(night: NightTruth) -> None:
    """A request answered 404 or with the login page carries no fault, so counts match what clients saw."""
    relpath = night.raw_relpaths("bias")[0]
    absent = DATA + relpath.replace("_c13_", "_c09_")
    async with serve(night.out, faults=only("http_503"), require_login=True, password="pw") as server, aiohttp.ClientSession() as session:
        status, headers, _ = await fetch(session, server.base_url + DATA + relpath)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert server.faults()["total"] == 0 and server.faults()["attempts_by_path"] == {DATA + relpath: 1}
    async with serve(night.out, faults=only("http_503")) as server, aiohttp.ClientSession() as session:
        assert (await fetch(session, server.base_url + absent))[0] == 404
        assert server.faults()["total"] == 0
        status, _, _ = await fetch(session, server.base_url + SEARCH, params={"WHERE": "ccdid IN (", "ct": "csv"})
        assert status == 503
        status, _, body = await fetch(session, server.base_url + SEARCH, params={"WHERE": "ccdid IN (", "ct": "csv"})
        assert status == 400 and b'value="ERROR"' in body
        assert server.faults()["by_kind"] == {"http_503": 1}


@pytest.mark.asyncio
async def test_stall_on_a_small_search_answer_still_stalls(night: NightTruth) -> None:
    async with serve(night.out, faults=FaultProfile("stalls", stall_rate=1.0)) as server:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=0.5)) as session:
            with pytest.raises(asyncio.TimeoutError):
                await fetch(session, server.base_url + SEARCH, params={"WHERE": "ccdid=99", "ct": "csv"})
        assert server.faults()["by_kind"] == {"stall": 1}


@pytest.mark.asyncio
async def test_drip_is_bounded_in_time(night: NightTruth) -> None:
    relpath = night.raw_relpaths("object")[0]
    content = (night.out / relpath).read_bytes()
    profile = only("drip", drip_bytes_per_second=20_000, drip_max_seconds=0.3)
    async with serve(night.out, faults=profile) as server, aiohttp.ClientSession() as session:
        start = time.perf_counter()
        assert (await fetch(session, server.base_url + DATA + relpath))[2] == content
        assert 0.3 < time.perf_counter() - start < 0.3 + len(content) / 20_000 / 2
