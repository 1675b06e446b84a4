"""Test helpers around the Fetcher: fetch given files concurrently, or what the download order lists."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from streamer.ledger.core import Ledger
from streamer.ledger.downloads import download_candidates
from streamer.service.fetcher import Fetcher, FetchOutcome


async def fetch_ids(fetcher: Fetcher, file_ids: Iterable[int]) -> list[FetchOutcome]:
    """Fetch each file once, concurrently (outcomes in the order of ``file_ids``)."""
    return list(await asyncio.gather(*(fetcher.fetch(file_id) for file_id in file_ids)))


async def fetch_candidates(fetcher: Fetcher, ledger: Ledger, *, limit: int = 1000) -> list[FetchOutcome]:
    """Fetch the files that :func:`download_candidates` lists now (pinned by unfinished jobs, or kept)."""
    rows = download_candidates(
        ledger, limit=limit, burst=False, now=time.time(), max_missing=fetcher.missing_max_attempts, exclude=()
    )
    return await fetch_ids(fetcher, [row["id"] for row in rows])
