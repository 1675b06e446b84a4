"""The simulated IRSA server over loopback: search, data with Range, login, path safety, and the CLI."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from simhelpers import small_night
from streamer import cli
from streamer.errors import UsageError
from streamer.sim.faults import FaultProfile
from streamer.sim.generate import NightTruth
from streamer.sim.index import RAW_COLUMNS, SCI_COLUMNS
from streamer.sim.server import arrived, serve, serve_in_thread

SEARCH = "/ibe/search/ztf/products/"
DATA = "/ibe/data/ztf/products/"


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> NightTruth:
    return small_night(tmp_path_factory.mktemp("served"), ccds=(13, 14), n_biases=2, flats_per_led=1, n_exposures=2, flat_filters=("zg",))


async def _search(base_url: str, table: str, **params: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(base_url + SEARCH + table, params=params) as response:
        return response.status, response.content_type, await response.text()


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.asyncio
async def test_search_bias_returns_all_columns(night: NightTruth) -> None:
    async with serve(night.out) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        status, content_type, text = await _search(server.base_url, "raw", WHERE="imgtype='bias'", ct="csv")
    assert status == 200 and content_type == "text/csv"
    rows = _rows(text)
    assert list(rows[0]) == list(RAW_COLUMNS)
    biases = [e for e in night.exposures if e.imgtype == "bias"]
    assert sorted((r["filefracday"], r["ccdid"]) for r in rows) == sorted((e.filefracday, str(c)) for e in biases for c in (13, 14))
    assert {r["imgtypecode"] for r in rows} == {"b"} and {r["filtercode"] for r in rows} == {"bi"}
    by_ffd = {e.filefracday: e for e in biases}
    for row in rows:
        assert float(row["obsjd"]) == by_ffd[row["filefracday"]].obsjd
        assert int(row["expid"]) == by_ffd[row["filefracday"]].expid


@pytest.mark.asyncio
async def test_search_between_in_and_columns(night: NightTruth) -> None:
    flats = [e for e in night.exposures if e.imgtype == "flat"]
    low, high = flats[1].obsjd, flats[2].obsjd
    async with serve(night.out) as server:
        _, _, text = await _search(server.base_url, "raw", WHERE=f"obsjd BETWEEN {low} AND {high}", COLUMNS="filefracday,ccdid", ct="csv")
        _, _, only_14 = await _search(server.base_url, "raw", WHERE="ccdid IN (14) AND imgtypecode='o'", ct="csv")
        _, _, both = await _search(server.base_url, "raw", WHERE="ccdid IN (13,14)", ct="csv")
        _, _, sci = await _search(server.base_url, "sci", WHERE="ccdid = 13 AND qid = 2", ct="csv")
    rows = _rows(text)
    assert list(rows[0]) == ["filefracday", "ccdid"]
    assert sorted(r["filefracday"] for r in rows) == sorted(e.filefracday for e in flats[1:3] for _ in (13, 14))
    assert len(_rows(only_14)) == 2 and {r["ccdid"] for r in _rows(only_14)} == {"14"}
    assert len(_rows(both)) == len(night.raw_relpaths())
    sci_rows = _rows(sci)
    assert list(sci_rows[0]) == list(SCI_COLUMNS)
    assert len(sci_rows) == 2 and {r["rcid"] for r in sci_rows} == {"49"}
    assert all(float(r["cd11"]) < 0 and r["crpix1"] for r in sci_rows)


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["imgtype='bias' AND (", "imgtype = bias", "nosuchcolumn = 1", "ccdid IN 13", "'a"])
async def test_malformed_where_answers_an_xml_error(night: NightTruth, where: str) -> None:
    async with serve(night.out) as server:
        status, content_type, text = await _search(server.base_url, "raw", WHERE=where, ct="csv")
    assert status == 400 and content_type == "text/xml"
    assert text.startswith("<?xml") and 'value="ERROR"' in text


@pytest.mark.asyncio
async def test_unknown_table_and_format_are_xml_errors(night: NightTruth) -> None:
    async with serve(night.out) as server:
        status, content_type, _ = await _search(server.base_url, "nope", ct="csv")
        assert (status, content_type) == (404, "text/xml")
        status, content_type, _ = await _search(server.base_url, "raw", ct="votable")
        assert (status, content_type) == (400, "text/xml")
        status, content_type, text = await _search(server.base_url, "sci", POS="55.0,33.3", SIZE="0.1", ct="csv")
        assert (status, content_type) == (400, "text/xml") and "POS" in text


@pytest.mark.asyncio
async def test_data_full_head_and_ranges(night: NightTruth) -> None:
    relpath = night.raw_relpaths("object")[0]
    content = (night.out / relpath).read_bytes()
    async with serve(night.out) as server, aiohttp.ClientSession() as session:
        url = server.base_url + DATA + relpath
        async with session.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(content))
            assert response.headers["Accept-Ranges"] == "bytes"
            assert await response.read() == content
        async with session.head(url) as response:
            assert response.status == 200 and response.headers["Content-Length"] == str(len(content))
        async with session.get(url, headers={"Range": "bytes=0-23039"}) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 0-23039/{len(content)}"
            assert await response.read() == content[:23040]
        async with session.get(url, headers={"Range": "bytes=-100"}) as response:
            assert response.status == 206 and await response.read() == content[-100:]
        async with session.get(url, headers={"Range": "bytes=1000-"}) as response:
            assert response.status == 206 and await response.read() == content[1000:]
        async with session.get(url, headers={"Range": f"bytes={len(content)}-"}) as response:
            assert response.status == 416
        async with session.get(server.base_url + DATA + relpath.replace("_o.fits", "_b.fits")) as response:
            assert response.status == 404


@pytest.mark.asyncio
async def test_a_profile_can_ignore_range(night: NightTruth) -> None:
    relpath = night.raw_relpaths("bias")[0]
    size = (night.out / relpath).stat().st_size
    async with (
        serve(night.out, faults=FaultProfile("norange", ignore_range=True)) as server,
        aiohttp.ClientSession() as session,
        session.get(server.base_url + DATA + relpath, headers={"Range": "bytes=0-2879"}) as response,
    ):
        assert response.status == 200 and len(await response.read()) == size
        assert "Accept-Ranges" not in response.headers


@pytest.mark.asyncio
async def test_paths_escaping_the_root_are_refused(night: NightTruth, tmp_path: Path) -> None:
    outside = tmp_path / "secret.fits"
    outside.write_bytes(b"SIMPLE  = secret")
    link_dir = night.out / "raw" / "2020" / "0924" / "999999"
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / "ztf_20200924999999_000000_bi_c13_b.fits.fz"
    link.symlink_to(outside)
    try:
        async with serve(night.out) as server, aiohttp.ClientSession() as session:
            for raw_path in (
                DATA + "../../../../etc/passwd",
                DATA + "raw/..%2F..%2F..%2Fetc%2Fpasswd",
                DATA + "raw%2F2020%2F0924",
                DATA + "raw/%2e%2e/%2e%2e/x",
                DATA + "raw/..%5C..%5Cx",
            ):
                async with session.get(URL(server.base_url + raw_path, encoded=True)) as response:
                    assert response.status in (403, 404), raw_path
                    assert b"secret" not in await response.read()
            async with session.get(server.base_url + DATA + link.relative_to(night.out).as_posix()) as response:
                assert response.status == 403
                assert b"secret" not in await response.read()
            status, _, text = await _search(server.base_url, "raw", WHERE="filefracday = 20200924999999", ct="csv")
            assert status == 200 and len(_rows(text)) == 0
    finally:
        link.unlink()
        link_dir.rmdir()


@pytest.mark.asyncio
async def test_login_and_require_login(night: NightTruth) -> None:
    relpath = night.raw_relpaths("bias")[0]
    async with serve(night.out, require_login=True, password="s3cret") as server:
        url = server.base_url + DATA + relpath
        login = server.base_url + "/account/signon/login.do"
        # a cookie jar keeps cookies of an IP-address host only when told it is safe
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(url) as response:
                assert response.status == 200 and response.content_type == "text/html"
            async with session.get(login, params={"josso_cmd": "login", "josso_username": "ztfuser", "josso_password": "wrong"}) as response:
                assert response.status == 200 and "JOSSO_SESSIONID" not in response.cookies
            async with session.get(url) as response:
                assert response.content_type == "text/html"
            async with session.get(login, params={"josso_cmd": "login", "josso_username": "ztfuser", "josso_password": "s3cret"}) as response:
                assert response.status == 200 and "JOSSO_SESSIONID" in response.cookies
            async with session.get(url) as response:
                assert response.status == 200 and (await response.read()).startswith(b"SIMPLE  =")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.post(login, data={"josso_cmd": "login", "josso_username": "ztfuser", "josso_password": "s3cret"}) as response:
                assert "JOSSO_SESSIONID" in response.cookies
            async with session.get(url) as response:
                assert (await response.read()).startswith(b"SIMPLE  =")


def test_serve_in_thread_for_synchronous_callers(night: NightTruth) -> None:
    import urllib.request

    with serve_in_thread(night.out, faults="none") as server:
        with urllib.request.urlopen(server.base_url + SEARCH + "raw?WHERE=ccdid%3D13&ct=csv", timeout=10) as response:
            assert len(_rows(response.read().decode())) == len(night.raw_relpaths()) // 2
        assert server.faults()["total"] == 0
    with pytest.raises(UsageError, match="--root"), serve_in_thread(night.out / "nope"):
        pass


def test_cli_serves_and_stops_on_sigterm(night: NightTruth) -> None:
    import urllib.request

    with subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "sim", "serve", "--root", str(night.out), "--faults", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("serving http://127.0.0.1:")
            base_url = line.split()[1]
            with urllib.request.urlopen(base_url + "/_sim/faults", timeout=10) as response:
                assert b'"total": 0' in response.read()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=15)
            assert process.returncode == 0
            assert "indexed" in stderr
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.mark.parametrize(
    "arguments, message",
    [(["--root", "/nonexistent-dir"], "--root"), (["--faults", "wild"], "--faults"), (["--require-login"], "STREAMER_SIM_PASSWORD")],
)
def test_cli_usage_errors(
    night: NightTruth, arguments: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STREAMER_SIM_PASSWORD", raising=False)
    argv = ["--root", str(night.out)] if "--root" not in arguments else []
    assert cli.main(["sim", "serve", *argv, *arguments]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1 and captured.out == ""


@pytest.mark.asyncio
async def test_arrival_lists_an_exposure_once_the_clock_reaches_it(
    night: NightTruth, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    times = sorted({e.obsjd for e in night.exposures})
    middle_jd = (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
    clock_file = tmp_path / "clock"
    monkeypatch.setenv("STREAMER_CLOCK_FILE", str(clock_file))
    seen = []
    async with serve(night.out, arrival=True) as server:
        for jd in (times[0] - 1.0, middle_jd, times[-1] + 1e-4):
            clock_file.with_suffix(".new").write_text(repr((jd - 2440587.5) * 86400.0 - time.time()))  # now = jd
            os.replace(clock_file.with_suffix(".new"), clock_file)  # a new inode: the clock reads it again
            status, _type, text = await _search(server.base_url, "raw", WHERE="ccdid=13", ct="csv")
            assert status == 200
            seen.append(sorted(r["filefracday"] for r in _rows(text)))
    expected = [sorted(e.filefracday for e in night.exposures if e.obsjd <= jd) for jd in (times[0] - 1.0, middle_jd, times[-1] + 1e-4)]
    assert seen == expected and seen[0] == [] and 0 < len(seen[1]) < len(seen[2]) == len(night.exposures)


def test_a_calibration_product_arrives_when_its_night_ends() -> None:
    end_of_night_jd = 2459117.5  # 2020-09-25 00:00 UTC, the end of the night of 2020-09-24
    row = {"nightdate": "2020-09-24"}
    assert not arrived("cal", row, end_of_night_jd - 1e-6) and arrived("cal", row, end_of_night_jd)
