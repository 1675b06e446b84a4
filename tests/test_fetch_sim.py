"""Acceptance of the fetcher against the simulated archive over loopback (small shape, one CCD)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from fetch_helpers import fetch_ids

from streamer.archive.auth import AuthError, Credentials
from streamer.archive.client import ArchiveClient, OutageGate, RetryPolicy
from streamer.archive.search import RAW_COLUMNS, SearchError, search_night, search_table
from streamer.archive.transfer import read_stored_header
from streamer.config import Config, config_from_dict
from streamer.ledger.core import Ledger
from streamer.ledger.downloads import outage_recorder
from streamer.rules.retention import footprint_from_header
from streamer.service.fetcher import DownloadError, Fetcher, SpaceSignal
from streamer.service.plan import plan_night
from streamer.sim.faults import FaultProfile
from streamer.sim.generate import NightTruth, generate_night
from streamer.sim.server import serve

NIGHT = dt.date(2020, 9, 24)
CCD = 13
PASSWORD = "sim-pass word&1"


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> NightTruth:
    out = tmp_path_factory.mktemp("archive")
    return generate_night(out, NIGHT, ccds=(CCD,), n_exposures=3, flats_per_led=1, n_biases=6, seed=4, shape="small")


def _config(base_url: str, root: Path, *, budget: str = "10 GB", auth: dict[str, str] | None = None) -> Config:
    archive: dict[str, Any] = {
        "base_url": base_url, "max_attempts": 8, "min_rate_bytes_per_s": 10_000, "min_rate_window_s": 1.0,
        "read_timeout_s": 5.0, "connect_timeout_s": 5.0,
    }  # fmt: skip
    if auth:
        archive["auth"] = auth
    return config_from_dict(
        {
            "storage": {"root": str(root), "budget": budget},
            "photometry": {"catalog_dir": str(root / "refcat")},
            "archive": archive,
            "detrend": {"bias_skip_first": 2},
        },
        create_dirs=True,
    )


def _client(config: Config, ledger: Ledger, credentials: Credentials | None = None) -> ArchiveClient:
    policy = RetryPolicy(config.archive.max_attempts, initial_s=0.01, max_s=0.1, rng=random.Random(11))
    gate = OutageGate(recorder=outage_recorder(ledger), initial_delay_s=0.05, max_delay_s=0.5)
    return ArchiveClient(config.archive, credentials=credentials, policy=policy, gate=gate)


def _archive_path(url: str) -> str:
    return urlparse(url).path


def _check_files_match_archive(ledger: Ledger, root: Path, archive: Path) -> None:
    """Every file on disk is what the archive serves: raws byte for byte, masks pixel for pixel, headers card for card."""
    for row in ledger.rows("SELECT * FROM files WHERE state = 'on_disk'"):
        local = root / row["relpath"]
        served = archive / _archive_path(row["url"]).split("/ibe/data/ztf/products/", 1)[1]
        assert local.stat().st_size == row["actual_size"]
        if row["kind"] in ("raw", "sciimg"):
            assert local.read_bytes() == served.read_bytes(), row["relpath"]
        elif row["kind"] == "mskimg":
            with fits.open(local) as mine, fits.open(served) as theirs:
                assert np.array_equal(mine[1].data, theirs[0].data), row["relpath"]
        else:
            header, full = read_stored_header(local), fits.getheader(served)
            assert WCS(header).to_header_string() == WCS(full).to_header_string(), row["relpath"]


def _no_partials(root: Path) -> None:
    assert not [p for p in root.rglob("*") if p.name.endswith((".part", ".zpart"))]


async def _plan_and_fetch(config: Config, ledger: Ledger, **client_args: Any) -> list[Any]:
    async with _client(config, ledger, **client_args) as client:
        summary = await plan_night(client, ledger, config, NIGHT, [CCD])
        return await fetch_ids(Fetcher(client, ledger, config.storage), summary.to_download)


@pytest.mark.asyncio
async def test_flaky_night_downloads_completely_and_attempts_match_faults(night: NightTruth, tmp_path: Path) -> None:
    async with serve(night.out, faults="flaky", fault_seed=7) as server:
        config = _config(server.base_url, tmp_path / "store")
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            outcomes = await asyncio.wait_for(_plan_and_fetch(config, ledger), 120)
            faults = server.faults()
            assert {o.state for o in outcomes} == {"on_disk"}
            _check_files_match_archive(ledger, config.storage.root, night.out)
            _no_partials(config.storage.root)
            files = ledger.rows("SELECT * FROM files")
            kinds = {r["kind"] for r in files}
            assert kinds == {"raw", "mskimg", "sciimg_header"}
            # Each file's failed requests (attempts - 1) are exactly the faults injected on its path;
            # 'drip' is slow but complete, so it is no failure.
            for row in files:
                injected = faults["by_path"].get(_archive_path(row["url"]), {})
                failures = sum(n for kind, n in injected.items() if kind != "drip")
                assert row["attempts"] - 1 == failures, (row["relpath"], row["attempts"], injected)
            data_faults = sum(
                n for path, kinds_ in faults["by_path"].items() if "/ibe/data/" in path
                for kind, n in kinds_.items() if kind != "drip"
            )  # fmt: skip
            assert data_faults > 10 and sum(r["attempts"] - 1 for r in files) == data_faults
            leds = {r["filefracday"]: r["led"] for r in ledger.rows("SELECT * FROM exposures WHERE imgtype = 'flat'")}
            assert leds == {e.filefracday: e.led for e in night.exposures if e.imgtype == "flat"}
            biases = ledger.scalar("SELECT COUNT(*) FROM exposures WHERE imgtype = 'bias'")
            bias_files = ledger.scalar(
                "SELECT COUNT(*) FROM files f JOIN exposures e ON e.id = f.exposure_id WHERE e.imgtype = 'bias'"
            )
            assert (biases, bias_files) == (6, 6 - 2)  # every bias is recorded; the first two are not fetched


@pytest.mark.asyncio
async def test_hostile_refusals_end_missing_and_stalls_are_aborted(night: NightTruth, tmp_path: Path) -> None:
    profile = FaultProfile("hostile-test", rate=0.3, missing_fraction=0.1, stall_rate=0.05)
    async with serve(night.out, faults=profile, fault_seed=3) as server:
        config = _config(server.base_url, tmp_path / "store")
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            outcomes = await asyncio.wait_for(_plan_and_fetch(config, ledger), 150)
            faults = server.faults()
            refused = {p for p, kinds in faults["by_path"].items() if "missing" in kinds}
            assert refused and faults["by_kind"].get("stall", 0) > 0
            missing = ledger.rows("SELECT * FROM files WHERE state = 'missing'")
            assert {_archive_path(r["url"]) for r in missing} == refused
            for row in missing:
                assert row["http_status"] == 404 and "404" in row["last_error"] and row["retry_at"] is not None
            assert {o.state for o in outcomes} == {"on_disk", "missing"}
            _check_files_match_archive(ledger, config.storage.root, night.out)
            _no_partials(config.storage.root)
            assert ledger.committed_bytes() == ledger.scalar("SELECT SUM(disk_bytes) FROM files")


@pytest.mark.asyncio
async def test_budget_smaller_than_the_night_is_never_exceeded(night: NightTruth, tmp_path: Path) -> None:
    budget = 2_000_000
    night_bytes = sum((night.out / p).stat().st_size for p in night.relpaths if p.startswith("raw/"))
    assert night_bytes > 3 * budget
    root = tmp_path / "store"
    samples: list[int] = []
    done = asyncio.Event()

    def disk_use() -> int:
        total = 0
        for directory, _, names in os.walk(root):
            for name in names:
                try:
                    total += os.lstat(os.path.join(directory, name)).st_blocks * 512
                except FileNotFoundError:
                    continue  # renamed or deleted between the listing and the stat
        return total

    async def sample() -> None:
        while not done.is_set():
            samples.append(disk_use())
            await asyncio.sleep(0.003)

    async def consume(ledger: Ledger, space: SpaceSignal) -> int:
        """Stand-in for processing and eviction: check each file on disk, then delete it (two-phase)."""
        consumed = 0
        while not done.is_set() or ledger.scalar("SELECT COUNT(*) FROM files WHERE state = 'on_disk'"):
            rows = ledger.rows("SELECT * FROM files WHERE state = 'on_disk'")
            for row in rows:
                with ledger.transaction() as conn:
                    ledger.set_file_state(conn, row["id"], "deleting")
                (root / row["relpath"]).unlink()
                with ledger.transaction() as conn:
                    ledger.set_file_state(conn, row["id"], "deleted", disk_bytes=0)
                consumed += 1
            if rows:
                space.space_freed()
            await asyncio.sleep(0.01)
        return consumed

    async with serve(night.out, faults="none") as server:
        config = _config(server.base_url, root, budget=f"{budget} B")
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            space = SpaceSignal(poll_s=0.5)
            sampler = asyncio.create_task(sample())
            consumer = asyncio.create_task(consume(ledger, space))
            async with _client(config, ledger) as client:
                summary = await plan_night(client, ledger, config, NIGHT, [CCD])
                fetcher = Fetcher(client, ledger, config.storage, space=space)
                outcomes = await asyncio.wait_for(fetch_ids(fetcher, summary.to_download), 120)
            done.set()
            consumed = await consumer
            await sampler
    assert {o.state for o in outcomes} == {"on_disk"} and consumed == len(outcomes)
    assert len(samples) > 10 and max(samples) <= budget
    assert max(samples) > budget / 4  # the budget was really used


@pytest.mark.parametrize("ignore_range", [False, True])
@pytest.mark.asyncio
async def test_header_only_fetch_of_a_sciimg(night: NightTruth, tmp_path: Path, ignore_range: bool) -> None:
    profile = FaultProfile("norange" if ignore_range else "none", ignore_range=ignore_range)
    sci = next(p for p in night.relpaths if p.endswith("_q2_sciimg.fits"))
    async with serve(night.out, faults=profile) as server:
        config = _config(server.base_url, tmp_path / "store")
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            relpath = sci.replace("_sciimg.fits", "_sciimg.header.fits")
            with ledger.transaction() as conn:
                file_id = ledger.want_file(conn, relpath=relpath, kind="sciimg_header", url=f"{server.base_url}/ibe/data/ztf/products/{sci}")
            async with _client(config, ledger) as client:
                outcome = await Fetcher(client, ledger, config.storage).fetch(file_id)
    size = (night.out / sci).stat().st_size
    assert outcome.state == "on_disk" and outcome.bytes_transferred < 64 * 1024 < size
    header = read_stored_header(tmp_path / "store" / relpath)
    full = fits.getheader(night.out / sci)
    assert WCS(header).to_header_string() == WCS(full).to_header_string()
    assert (header["NAXIS1"], header["NAXIS2"]) == (full["NAXIS1"], full["NAXIS2"])
    # The evictor's footprint from the stored header agrees with the full WCS at the centre.
    footprint = footprint_from_header(header)
    ra, dec = WCS(full).all_pix2world([[full["NAXIS1"] / 2, full["NAXIS2"] / 2]], 1)[0]
    x, y = footprint.pixel_of(ra, dec) or (0.0, 0.0)
    assert abs(x - full["NAXIS1"] / 2) < 2 and abs(y - full["NAXIS2"] / 2) < 2


@pytest.mark.asyncio
async def test_login_wrong_credentials_and_no_secret_anywhere(
    night: NightTruth, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # flaky: the 'html' faults (a login page with status 200) make the client log in again.
    async with serve(night.out, faults="flaky", fault_seed=5, require_login=True, username="ztfuser", password=PASSWORD) as server:
        config = _config(server.base_url, tmp_path / "store")
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            with pytest.raises(AuthError, match="'ztfuser' refused") as refused:
                await _plan_and_fetch(config, ledger, credentials=Credentials("ztfuser", "not the password"))
            assert "not the password" not in str(refused.value)
            outcomes = await _plan_and_fetch(config, ledger, credentials=Credentials("ztfuser", PASSWORD))
            assert outcomes and {o.state for o in outcomes} == {"on_disk"}
            assert server.faults()["by_kind"].get("html", 0) > 0
            assert "session expired; logged in again as ztfuser" in caplog.text
            dump = "\n".join(
                repr(ledger.rows(f"SELECT * FROM {table}")) for table in ("files", "events", "meta", "exposures")
            )
    for secret in (PASSWORD, "not the password", "sim-pass"):
        assert secret not in caplog.text and secret not in dump


@pytest.mark.asyncio
async def test_planning_twice_changes_nothing_and_skips_files_on_disk(night: NightTruth, tmp_path: Path) -> None:
    async with serve(night.out, faults="none") as server:
        config = _config(server.base_url, tmp_path / "store")
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            async with _client(config, ledger) as client:
                first = await plan_night(client, ledger, config, NIGHT, [CCD])
                requests = server.faults()["requests"]
                dump = [ledger.rows("SELECT * FROM exposures"), ledger.rows("SELECT * FROM files")]
                again = await plan_night(client, ledger, config, NIGHT, [CCD])
                assert [ledger.rows("SELECT * FROM exposures"), ledger.rows("SELECT * FROM files")] == dump
                assert again.to_download == first.to_download and first.on_disk == 0
                # The second plan only searched: the LEDs were not read again.
                assert server.faults()["requests"] - requests == 2 * 4
                fetcher = Fetcher(client, ledger, config.storage)
                await fetch_ids(fetcher, first.to_download)
                third = await plan_night(client, ledger, config, NIGHT, [CCD])
    assert third.to_download == () and third.on_disk == third.files


@pytest.mark.asyncio
async def test_sigkill_during_downloads_then_restart_completes(night: NightTruth, tmp_path: Path) -> None:
    rng = random.Random(20201)
    root, ledger_path = tmp_path / "store", tmp_path / "ledger.sqlite"
    child = [sys.executable, str(Path(__file__).with_name("fetch_child.py"))]
    slow = FaultProfile("slow", rate=0.6, kinds=("drip",), drip_bytes_per_second=300_000, max_faulted_attempts=100)
    async with serve(night.out, faults=slow) as server:
        args = [server.base_url, str(root), str(ledger_path), NIGHT.isoformat(), str(CCD)]
        kills = 0
        for _ in range(3):
            process = await asyncio.create_subprocess_exec(*child, *args, stdout=asyncio.subprocess.PIPE)
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line.strip() == b"fetching"
            await asyncio.sleep(rng.uniform(0.1, 1.2))
            if process.returncode is None:
                process.kill()
                kills += 1
            await process.wait()
        assert kills == 3
        with Ledger.open(ledger_path) as ledger:
            partial = ledger.scalar("SELECT COUNT(*) FROM files WHERE state = 'on_disk'")
            total = ledger.scalar("SELECT COUNT(*) FROM files")
        assert partial < total  # the kills interrupted the night
        final = await asyncio.create_subprocess_exec(*child, *args, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(final.communicate(), 120)
        assert final.returncode == 0 and b"done" in out
    with Ledger.open(ledger_path) as ledger:
        rows = ledger.rows("SELECT * FROM files")
        assert {r["state"] for r in rows} == {"on_disk"}
        _check_files_match_archive(ledger, root, night.out)
        on_disk = {r["relpath"] for r in rows}
        assert ledger.scalar("SELECT SUM(reserved_bytes) FROM files") == 0
    _no_partials(root)
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert present == on_disk


@pytest.mark.slow
@pytest.mark.asyncio
async def test_full_size_flaky_night(tmp_path: Path) -> None:
    """Full-size (3080 x 3072) files: the real header size, real compressed raws, flaky archive."""
    truth = generate_night(
        tmp_path / "archive", NIGHT, ccds=(CCD,), n_exposures=2, flats_per_led=1, n_biases=3, seed=9, shape="full"
    )
    async with serve(truth.out, faults="flaky", fault_seed=2) as server:
        config = _config(server.base_url, tmp_path / "store")
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            async with _client(config, ledger) as client:
                summary = await plan_night(client, ledger, config, NIGHT, [CCD])
                fetcher = Fetcher(
                    client, ledger, config.storage, expected_shapes={"raw": (3080, 3072), "mskimg": (3080, 3072)}
                )
                outcomes = await asyncio.wait_for(fetch_ids(fetcher, summary.to_download), 900)
            assert {o.state for o in outcomes} == {"on_disk"}
            headers = [o for o in outcomes if o.relpath.endswith(".header.fits")]
            assert headers and max(o.bytes_transferred for o in headers) < 64 * 1024
            _check_files_match_archive(ledger, config.storage.root, truth.out)
            _no_partials(config.storage.root)


@pytest.mark.asyncio
async def test_search_errors_are_clear_and_flaky_searches_are_retried(night: NightTruth, tmp_path: Path) -> None:
    async with serve(night.out, faults="flaky", fault_seed=1) as server:
        config = _config(server.base_url, tmp_path / "store")
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            async with _client(config, ledger) as client:
                with pytest.raises(SearchError, match="nosuch.*HTTP 400"):
                    await search_table(client, "raw", "nosuch = 1", RAW_COLUMNS)
                rows = []
                for seed_night in (NIGHT, NIGHT + dt.timedelta(days=1)):
                    rows.append(await search_night(client, "raw", seed_night, [CCD], RAW_COLUMNS, max_span_days=0.1))
            faults = server.faults()
    assert len(rows[0]) == len(night.raw_relpaths()) and rows[1] == []
    assert sum(n for path, kinds in faults["by_path"].items() if "/ibe/search/" in path for n in kinds.values()) > 0


@pytest.mark.parametrize("obstacle", ["directory_at_part", "directory_at_raw", "file_at_night_directory"])
@pytest.mark.asyncio
async def test_unexpected_error_releases_the_reservation_and_backs_off(night: NightTruth, tmp_path: Path, obstacle: str) -> None:
    """An OSError the fetcher does not expect ends the file missing with a retry date, never downloading with bytes held."""
    async with serve(night.out, faults="none") as server:
        config = _config(server.base_url, tmp_path / "store")
        root = config.storage.root
        with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
            async with _client(config, ledger) as client:
                summary = await plan_night(client, ledger, config, NIGHT, [CCD])
                raw = next(ledger.file(i) for i in summary.to_download if ledger.file(i)["kind"] == "raw")
                final = root / raw["relpath"]
                if obstacle == "directory_at_part":
                    (final.parent / (final.name + ".part")).mkdir(parents=True)
                elif obstacle == "directory_at_raw":
                    final.mkdir(parents=True)
                else:
                    final.parent.parent.mkdir(parents=True)
                    final.parent.write_bytes(b"not a directory")
                before = time.time()
                with pytest.raises(DownloadError) as raised:
                    await Fetcher(client, ledger, config.storage).fetch(raw["id"])
                again = await Fetcher(client, ledger, config.storage).fetch(raw["id"])  # not before its retry date
            row = ledger.file(raw["id"])
            committed = ledger.committed_bytes()
    assert "\n" not in str(raised.value) and raw["relpath"] in str(raised.value)
    assert row["state"] == "missing" and row["reserved_bytes"] == 0 and row["attempts"] == 1
    assert row["retry_at"] is not None and row["retry_at"] >= before + 3600
    assert row["last_error"] and "Error" in row["last_error"]
    assert committed == 0 and (again.state, again.requests) == ("missing", 0)
