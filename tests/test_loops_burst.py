"""Burst mode waits within bounds: a Retry-After of a year, retries of one operation, one outage, a dripping search.

Against small aiohttp servers on loopback; the meters are the servers' own request counts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from streamer.archive.client import (
    MAX_RETRY_AFTER_S,
    ArchiveClient,
    OutageGate,
    RetryPolicy,
    TransientError,
    classify_status,
)
from streamer.config import ArchiveConfig, config_from_dict
from streamer.ledger.core import Ledger
from streamer.service import planner
from streamer.service.context import Context
from streamer.service.plan import PlanError

YEAR_S = 365 * 86400


class Counting:
    """An archive that answers every request with ``status`` (and ``Retry-After``), or drips its search answer."""

    def __init__(self, status: int = 503, retry_after: str | None = None, drip: bool = False) -> None:
        self.status = status
        self.retry_after = retry_after
        self.drip = drip
        self.requests = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.drip:
            response = web.StreamResponse(headers={"Content-Type": "text/csv"})
            await response.prepare(request)
            await response.write(b"field,ccdid")
            while True:  # a byte now and then: never slow enough for a read timeout, never done
                await asyncio.sleep(0.2)
                await response.write(b" ")
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        return web.Response(status=self.status, headers=headers)


@pytest_asyncio.fixture
async def serving() -> AsyncIterator[Any]:
    servers: list[TestServer] = []

    async def start(archive: Counting) -> str:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", archive.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.close()


def _client(base: str, *, max_s: float = 0.01, gate: OutageGate | None = None) -> ArchiveClient:
    config = ArchiveConfig(base_url=base, max_attempts=8, read_timeout_s=5.0)
    policy = RetryPolicy(8, initial_s=0.01, max_s=max_s, rng=random.Random(3))
    return ArchiveClient(config, policy=policy, gate=gate or OutageGate(min_samples=1000))


async def _get(client: ArchiveClient, url: str) -> None:
    async def once() -> None:
        async with client.session.get(url) as response:
            if response.status != 200:
                raise classify_status(response.status, response.reason or "", response.headers)

    await client.retrying(once)


def test_a_retry_after_of_a_year_waits_at_most_the_bound() -> None:
    policy = RetryPolicy(8, rng=random.Random(1))
    assert policy.delay(1, retry_after=float(YEAR_S)) <= MAX_RETRY_AFTER_S
    assert policy.delay(1, retry_after=2.0) >= 2.0  # a short one is still honoured
    assert MAX_RETRY_AFTER_S <= 600


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_one_operation_waits_no_longer_than_its_bound(serving: Any) -> None:
    archive = Counting(429, retry_after="1")
    base = await serving(archive)
    async with _client(base, max_s=1.0) as client:
        client.bound_waiting(per_operation_s=1.5, per_outage_s=None)
        with pytest.raises(TransientError):
            await _get(client, base + "/data")
    # each answer asks for 1 s: one retry after 1 s, then the 0.5 s left would end the bound (unbounded: 8 requests)
    assert archive.requests == 2


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_an_outage_older_than_its_bound_is_not_waited_out(serving: Any) -> None:
    archive = Counting(503)
    base = await serving(archive)
    gate = OutageGate(min_samples=1000, initial_delay_s=3600.0)
    async with _client(base, gate=gate) as client:
        client.bound_waiting(per_operation_s=None, per_outage_s=5.0)
        gate.paused_until = time.monotonic() + 3600.0  # a pause of an hour is running...
        gate.since = time.monotonic() - 10.0  # ...in an outage older than the bound
        with pytest.raises(TransientError):
            await _get(client, base + "/data")
    assert archive.requests == 1  # tried once at once, not after the hour


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_dripping_search_ends_the_planning_of_a_backfill_in_one_line(
    serving: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = Counting(drip=True)
    base = await serving(archive)
    monkeypatch.setattr(planner, "BURST_PLAN_TIMEOUT_S", 1.0)
    config = config_from_dict(
        {
            "storage": {"root": str(tmp_path), "budget": "1 GB"},
            "photometry": {"catalog_dir": str(tmp_path)},
            "archive": {"base_url": base, "read_timeout_s": 30.0},
        }
    )
    executor: Any = None
    ctx = Context(config=config, ledger=Ledger.memory(), executor=executor, burst=True)
    async with _client(base) as client:
        ctx.client = client
        with pytest.raises(PlanError) as raised:
            await planner.plan_one_night(ctx, dt.date(2020, 9, 24), [13])
    assert "\n" not in str(raised.value) and "2020-09-24" in str(raised.value)
    assert archive.requests == 1
    assert ctx.ledger.get_meta("planned:2020-09-24:13") is None  # planned again by the next backfill
