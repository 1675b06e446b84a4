"""Download benchmark: the fetcher against curl over loopback from the simulated archive.

    python -m bench.download [--files 24] [--quadrant 1540x1536] [--parallel 4] [--small 1000]

1. Rate: ``--files`` synthetic raw-layout FITS files (9 HDUs, incompressible int16 data) are
   served by the simulator's server; curl (``--parallel --parallel-max N``) and the fetcher
   (verification, fsync and ledger on) download the same files with the same parallelism,
   alternately, ``--rounds`` times each. Reported: aggregate MB/s (best round), the ratio,
   and the fetcher's client CPU per file (the server runs in another process).
2. Memory: ``--small`` small files go through one fetcher; the peak RSS of the process is
   sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from astropy.io import fits

from streamer.archive.client import ArchiveClient, OutageGate, RetryPolicy
from streamer.config import ArchiveConfig, StorageConfig
from streamer.demo import serve_archive
from streamer.ledger.core import Ledger
from streamer.service.fetcher import Fetcher
from streamer.storage.naming import RawName, data_url


def write_synthetic_raws(root: Path, n: int, quadrant: tuple[int, int], seed: int) -> list[str]:
    """``n`` raw-layout files under ``root`` (archive layout); return their relpaths."""
    rng = np.random.default_rng(seed)
    relpaths = []
    rows, cols = quadrant
    block = rng.integers(-32768, 32767, size=(rows, cols), dtype=np.int16)
    overscan = rng.integers(-32768, 32767, size=(rows, 30), dtype=np.int16)
    for i in range(n):
        name = RawName(f"20200924{400000 + i:06d}", 655, "zr", 13, "o")
        path = root / name.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        hdus: list[Any] = [fits.PrimaryHDU(header=fits.Header({"IMGTYPE": "object", "BENCHNO": i}))]
        hdus += [fits.ImageHDU(np.roll(block, i + q, axis=0)) for q in range(4)]
        hdus += [fits.ImageHDU(overscan) for _ in range(4)]
        fits.HDUList(hdus).writeto(path, overwrite=True)
        relpaths.append(name.relpath)
    return relpaths


def run_curl(base_url: str, relpaths: list[str], out: Path, parallel: int) -> float:
    """Seconds for curl to fetch every file with ``parallel`` transfers at once."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = ["curl", "--silent", "--no-progress-meter", "--show-error", "--fail", "--parallel", "--parallel-max", str(parallel)]
    for i, relpath in enumerate(relpaths):
        args += ["-o", str(out / f"{i}.fits"), data_url(base_url, relpath)]
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start


async def run_fetcher(base_url: str, relpaths: list[str], work: Path, parallel: int) -> tuple[float, float]:
    """(seconds, client CPU seconds) for the fetcher to fetch and verify every file."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "store").mkdir(parents=True)
    ledger = Ledger.open(work / "ledger.sqlite")
    config = ArchiveConfig(base_url=base_url, max_connections=parallel)
    storage = StorageConfig(root=work / "store", budget=10**12)
    with ledger.transaction() as conn:
        ids = [
            ledger.want_file(conn, relpath=r, kind="raw", url=data_url(base_url, r)) for r in relpaths
        ]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    async with ArchiveClient(config, policy=RetryPolicy(3, rng=random.Random(0)), gate=OutageGate()) as client:
        fetcher = Fetcher(client, ledger, storage)
        outcomes = await asyncio.gather(*(fetcher.fetch(file_id) for file_id in ids))
    elapsed = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    ledger.close()
    bad = [o for o in outcomes if o.state != "on_disk"]
    if bad:
        raise SystemExit(f"fetcher failed: {bad[:3]}")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return elapsed, cpu


async def rss_run(base_url: str, relpaths: list[str], work: Path, parallel: int) -> tuple[float, float, float]:
    """(peak RSS MB, RSS before MB, seconds) while the fetcher takes ``relpaths`` to disk."""
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    start = time.perf_counter()
    try:
        await run_fetcher(base_url, relpaths, work, parallel)
    finally:
        done.set()
        await sampler
    return peak / 2**20, before / 2**20, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--quadrant", default="1540x1536", help="rows x cols of each quadrant HDU")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small", type=int, default=1000, help="files for the RSS run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if shutil.which("curl") is None:
        print("curl not found: install it (apt-get install curl)", file=sys.stderr)
        return 2
    rows, cols = (int(v) for v in args.quadrant.split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        tmp_path = Path(tmp)
        archive = tmp_path / "archive"
        big = write_synthetic_raws(archive, args.files, (rows, cols), args.seed)
        small = _small_files(archive, args.small, args.seed)
        total = sum((archive / r).stat().st_size for r in big)
        with serve_archive(archive) as base_url:
            curl_times, our_times, cpus = [], [], []
            for round_no in range(args.rounds):
                # Alternate who goes first, so that neither always meets a warmer or colder machine.
                if round_no % 2:
                    seconds, cpu = asyncio.run(run_fetcher(base_url, big, tmp_path / "ours", args.parallel))
                    curl_times.append(run_curl(base_url, big, tmp_path / "curl", args.parallel))
                else:
                    curl_times.append(run_curl(base_url, big, tmp_path / "curl", args.parallel))
                    seconds, cpu = asyncio.run(run_fetcher(base_url, big, tmp_path / "ours", args.parallel))
                our_times.append(seconds)
                cpus.append(cpu)
            peak, before, seconds_small = asyncio.run(rss_run(base_url, small, tmp_path / "rss", args.parallel))
    curl_rate = total / min(curl_times) / 1e6
    our_rate = total / min(our_times) / 1e6
    print(f"files: {args.files} x {total / args.files / 1e6:.1f} MB, parallel {args.parallel}, rounds {args.rounds}")
    print(f"curl:    best {curl_rate:.0f} MB/s  (rounds: {', '.join(f'{total / t / 1e6:.0f}' for t in curl_times)})")
    print(f"fetcher: best {our_rate:.0f} MB/s  (rounds: {', '.join(f'{total / t / 1e6:.0f}' for t in our_times)})"
          "  verified, fsynced, recorded")  # fmt: skip
    ratios = sorted(c / o for c, o in zip(curl_times, our_times, strict=True))
    print(f"ratio fetcher/curl: best/best {our_rate / curl_rate:.2f}, median of rounds {ratios[len(ratios) // 2]:.2f}")
    print(f"client CPU per file: {min(cpus) / args.files * 1e3:.0f} ms ({min(cpus) / (total / 1e6) * 1e3:.1f} ms per MB)")
    print(f"RSS with {args.small} small files: peak {peak:.0f} MB (before {before:.0f} MB), {seconds_small:.1f} s")
    return 0


def _small_files(archive: Path, n: int, seed: int) -> list[str]:
    """``n`` small raw-layout files (about 30 kB) of the night 2020-09-25."""
    rng = np.random.default_rng(seed + 1)
    relpaths = []
    quadrant = rng.integers(0, 2**15, size=(16, 16), dtype=np.int16)
    blob: bytes | None = None
    for i in range(n):
        name = RawName(f"20200925{100000 + i:06d}", 655, "zr", 13, "o")
        path = archive / name.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if blob is None:
            hdus: list[Any] = [fits.PrimaryHDU()] + [fits.ImageHDU(quadrant) for _ in range(4)]
            hdus += [fits.ImageHDU(quadrant[:, :8]) for _ in range(4)]
            tmp = archive / "small.fits"
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
            blob = tmp.read_bytes()
            tmp.unlink()
        path.write_bytes(blob)
        relpaths.append(name.relpath)
    return relpaths


if __name__ == "__main__":
    sys.exit(main())
