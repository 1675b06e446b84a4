"""A fetcher process for the crash tests: recover, plan the night (idempotent), fetch what the plan leaves to download.

    python tests/fetch_child.py BASE_URL ROOT LEDGER NIGHT CCD [BUDGET]

Prints ``fetching`` once downloads start and ``done <states>`` at the end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import sys
from collections import Counter
from pathlib import Path

from fetch_helpers import fetch_ids

from streamer.archive.client import ArchiveClient, OutageGate, RetryPolicy
from streamer.config import config_from_dict
from streamer.ledger.core import Ledger
from streamer.ledger.downloads import outage_recorder
from streamer.service.fetcher import Fetcher
from streamer.service.plan import plan_night


async def main(base_url: str, root: Path, ledger_path: Path, night: dt.date, ccd: int, budget: str) -> None:
    config = config_from_dict(
        {
            "storage": {"root": str(root), "budget": budget},
            "photometry": {"catalog_dir": str(root / "refcat")},
            "archive": {"base_url": base_url, "max_attempts": 10, "min_rate_window_s": 2.0, "read_timeout_s": 10.0},
            "detrend": {"bias_skip_first": 2},
        }
    )
    ledger = Ledger.open(ledger_path)
    ledger.recover()
    policy = RetryPolicy(config.archive.max_attempts, initial_s=0.01, max_s=0.1, rng=random.Random(1))
    gate = OutageGate(recorder=outage_recorder(ledger), initial_delay_s=0.05)
    async with ArchiveClient(config.archive, policy=policy, gate=gate) as client:
        fetcher = Fetcher(client, ledger, config.storage)
        fetcher.remove_orphan_parts()
        summary = await plan_night(client, ledger, config, night, [ccd])
        print("fetching", flush=True)
        outcomes = await fetch_ids(fetcher, summary.to_download)
    ledger.close()
    print("done", json.dumps(Counter(o.state for o in outcomes)), flush=True)


if __name__ == "__main__":
    base, root, ledger, night, ccd = sys.argv[1:6]
    budget = sys.argv[6] if len(sys.argv) > 6 else "10 GB"
    asyncio.run(main(base, Path(root), Path(ledger), dt.date.fromisoformat(night), int(ccd), budget))
