"""``streamer demo``: simulate a night, serve it on loopback, backfill it under a small budget, report.

Everything happens under one working directory (a new temporary one by default):
``archive/`` (the simulated IRSA tree and its truth), ``store/`` (the service's storage
root: ledger, catalogues), ``config.toml``. The budget is set well below the night's raw
volume, so the evictor has to work for the backfill to finish.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from streamer.config import format_size, load_config
from streamer.errors import StreamerError

DEMO_NIGHT = dt.date(2020, 9, 24)
DEMO_BIASES = 8
DEMO_BIAS_SKIP = 2
DEMO_FLATS_PER_LED = 2
DEMO_FILTERS = "zg,zr"  # the science filters, and the only flats taken: a zi flat would be simulated and combined for nothing


def _streamer(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer.cli", *args]


@contextlib.contextmanager
def serve_archive(archive: Path, *, faults: str = "none", port: int = 0, arrival: bool = False) -> Iterator[str]:
    """Run ``streamer sim serve`` on loopback (``port`` 0: any free one; ``arrival``: its ``--arrival``);
    yield its base URL; stop it with SIGTERM."""
    options = ("--arrival",) if arrival else ()
    server = subprocess.Popen(
        _streamer("sim", "serve", "--root", str(archive), "--host", "127.0.0.1", "--port", str(port), "--faults", faults, *options),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        if not line.startswith("serving "):
            raise StreamerError(f"the simulated archive did not start (it said {line!r})")
        yield line.removeprefix("serving ")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_config(
    path: Path, *, store: Path, catalog_dir: Path, base_url: str, budget: int, workers: int = 2, extra: str = ""
) -> Path:
    """A configuration for a simulated archive on loopback."""
    path.write_text(
        f"""# written by `streamer demo`
[archive]
base_url = "{base_url}"
max_connections = 4

[storage]
root = "{store}"
budget = "{budget} B"
high_watermark = 0.9
low_watermark = 0.7

[compute]
workers = {workers}

[detrend]
# the demo simulates {DEMO_BIASES} biases a night instead of 20, so it skips fewer
bias_skip_first = {DEMO_BIAS_SKIP}

[photometry]
catalog_dir = "{catalog_dir}"

[[consumers]]
name = "ubercal"
keep = ["apcat"]
{extra}"""
    )
    return path


def run(*, workdir: str | None, ccds: Sequence[int], exposures: int, shape: str) -> int:
    """Run the demo; exit code of the backfill."""
    from streamer.service import app as service
    from streamer.service import status

    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streamer-demo-"))
    archive, store = work / "archive", work / "store"
    started = time.monotonic()
    print(f"[1/4] simulating night {DEMO_NIGHT} for CCDs {','.join(map(str, ccds))} ({shape} frames) in {archive}")
    subprocess.run(
        _streamer(
            "sim", "generate", "--out", str(archive), "--night", DEMO_NIGHT.isoformat(),
            "--ccds", ",".join(map(str, ccds)), "--exposures", str(exposures),
            "--flats-per-led", str(DEMO_FLATS_PER_LED), "--biases", str(DEMO_BIASES),
            "--filters", DEMO_FILTERS, "--flat-filters", DEMO_FILTERS,
            "--seed", "1", "--shape", shape, "--jobs", str(max(1, min(2, os.cpu_count() or 1))),
        ),
        check=True,
    )  # fmt: skip
    raw_bytes = _tree_bytes(archive / "raw")
    with serve_archive(archive) as base_url:
        print(f"[2/4] simulated IRSA serving at {base_url}")
        budget = max(int(raw_bytes * 0.6), _demo_minimum(shape))
        config_path = write_config(
            work / "config.toml", store=store, catalog_dir=archive / "refcat", base_url=base_url, budget=budget
        )
        config = load_config(config_path)
        print(
            f"[3/4] backfill {DEMO_NIGHT} with a budget of {format_size(budget)} "
            f"(the night's raws alone are {format_size(raw_bytes)})"
        )
        code = service.run_backfill(config, DEMO_NIGHT, DEMO_NIGHT, tuple(ccds))
    print("[4/4] status")
    status.show(config, as_json=False)
    catalogues = sorted((store / "apcat").rglob("*.parquet"))
    print(f"{len(catalogues)} aperture catalogues under {store / 'apcat'}; configuration {config_path}")
    print(f"demo finished in {time.monotonic() - started:.0f} s (exit code {code})")
    return code


def _demo_minimum(shape: str) -> int:
    return 1_600_000_000 if shape == "full" else 50_000_000
