"""Helpers of the end-to-end tests: a simulated archive served on loopback, the real CLI, disk sampling."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from streamer.config import Config, load_config
from streamer.demo import write_config

NIGHT = dt.date(2020, 9, 24)


def streamer_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "streamer.cli", "--config", str(config), *args]


def run_cli(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(streamer_cmd(config, *args), capture_output=True, text=True, timeout=timeout)


def backfill_args(start: dt.date = NIGHT, end: dt.date = NIGHT, ccds: Sequence[int] = ()) -> list[str]:
    args = ["backfill", "--start", start.isoformat(), "--end", end.isoformat()]
    for ccd in ccds:
        args += ["--ccd", str(ccd)]
    return args


def config_for(
    tmp: Path, archive: Path, base_url: str, *, budget: int, name: str = "config.toml", extra: str = "", workers: int = 2
) -> Path:
    store = tmp / (name.removesuffix(".toml") + "-store")
    return write_config(
        tmp / name, store=store, catalog_dir=archive / "refcat", base_url=base_url, budget=budget, extra=extra,
        workers=workers,
    )  # fmt: skip


def offline_config(tmp: Path) -> Config:
    """A loaded configuration whose store exists under ``tmp`` and whose archive is nowhere (port 9):
    for tests that drive the service's stages without downloading."""
    path = write_config(
        tmp / "config.toml", store=tmp / "store", catalog_dir=tmp / "refcat", base_url="http://127.0.0.1:9", budget=10**9
    )
    (tmp / "store").mkdir()
    return load_config(path)


def store_of(config: Path) -> Path:
    return config.parent / (config.name.removesuffix(".toml") + "-store")


def catalogues(store: Path) -> dict[str, list[dict[str, Any]]]:
    """Every aperture catalogue under the store, as rows (provenance metadata left out)."""
    out = {}
    for path in sorted((store / "apcat").rglob("*.parquet")):
        table = pq.read_table(path)
        out[path.relative_to(store).as_posix()] = table.to_pylist()
    return out


def status_json(config: Path) -> dict[str, Any]:
    result = run_cli(config, "status", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def allocated_bytes(root: Path) -> int:
    """Allocated bytes (st_blocks x 512) of the regular files under ``root``, by a walk of its own.

    The meter of the disk-budget tests, so it shares no code with the service's accounting: symlinks
    are neither followed nor counted, and a file or directory removed during the walk is skipped.
    """
    total = 0
    for directory, _subdirectories, names in os.walk(root, followlinks=False):
        for name in names:
            try:
                info = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_blocks * 512
    return total


class DiskSampler:
    """Samples :func:`allocated_bytes` under a directory every ``period`` seconds in a thread."""

    def __init__(self, root: Path, period: float = 0.2) -> None:
        self.root = root
        self.period = period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(allocated_bytes(self.root))
            self._stop.wait(self.period)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.samples.append(allocated_bytes(self.root))

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def unfinished_files(store: Path) -> list[Path]:
    """Partial downloads and temporaries of atomic writes under ``store`` (suffixes written here, not imported)."""
    return [p for p in store.rglob("*") if p.is_file() and p.name.endswith((".part", ".zpart", ".tmp"))]


def wait_for(predicate: Any, timeout: float, period: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return False


def env_without_config() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "STREAMER_CONFIG"}
