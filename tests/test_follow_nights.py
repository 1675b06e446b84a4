"""A daemon in follow mode over 7 simulated nights that arrive one after another, run in minutes.

One clock moves everything: ``STREAMER_CLOCK_FILE`` (``streamer/clock.py``) is read by the daemon,
by ``streamer status`` and by the simulated archive, which is started with ``--arrival`` and so
lists an exposure only once the clock has reached it. The test jumps the clock from night to night:
to just before a night is due (nothing may be planned), then to just after (the night is planned,
processed and swept). The figures are checked by means of their own: the ledger's meta and events
read with sqlite3, the daemon's RSS from /proc, the disk by a walk, the kept raws from the
simulator's truth.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import NIGHT, config_for, run_cli, store_of, streamer_cmd, unfinished_files, wait_for
from streamer.demo import serve_archive
from streamer.sim.generate import NightTruth, generate_night

NIGHTS = [NIGHT + dt.timedelta(days=i) for i in range(7)]
CCD = 13
DELAY_HOURS = 6.0
RETENTION_DAYS = 2.0
MIRRORED_FIELD = 655
LEDGER_NAMES = ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "ledger.sqlite.lock")


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[NightTruth]]:
    archive = tmp_path_factory.mktemp("archive")
    truths = [
        generate_night(
            archive, night, ccds=(CCD,), n_exposures=2, flats_per_led=2, n_biases=8, seed=40 + i, shape="small",
            filters=("zr",), flat_filters=("zr",), jobs=2,
        )  # fmt: skip
        for i, night in enumerate(NIGHTS)
    ]
    return archive, truths


def due_at(night: dt.date) -> float:
    """When a follower with DELAY_HOURS plans the night, by the README's rule (its end is midnight UTC after it)."""
    end = dt.datetime.combine(night + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return end.timestamp() + DELAY_HOURS * 3600


class Clock:
    """The clock file: an offset in seconds from the system clock, replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, moment: float) -> None:
        part = self.path.with_suffix(".new")
        part.write_text(repr(moment - time.time()))
        os.replace(part, self.path)

    def now(self) -> float:
        return time.time() + float(self.path.read_text())


def read_ledger(store: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{store / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def planned_nights(store: Path, *, starting: bool = False) -> set[str]:
    """The nights with a plan in the ledger's meta; ``starting``: none while the daemon is still creating its ledger."""
    try:
        rows = read_ledger(store, "SELECT key FROM meta WHERE key LIKE 'planned:%'")
    except sqlite3.OperationalError:  # no file or no table yet
        if starting:
            return set()
        raise
    return {str(key).split(":")[1] for (key,) in rows}


def files_on_disk(store: Path) -> set[str]:
    """Every regular file under the store but the ledger's, by a walk that follows no symlink."""
    found = set()
    for directory, _dirs, names in os.walk(store, followlinks=False):
        for name in names:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink() and name not in LEDGER_NAMES:
                found.add(path.relative_to(store).as_posix())
    return found


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    clock = Clock(tmp_path / "clock")
    clock.set(due_at(NIGHTS[0]) - 3600)
    monkeypatch.setenv("STREAMER_CLOCK_FILE", str(clock.path))  # the archive, the daemon and status inherit it
    yield clock


def test_follow_mode_over_seven_nights(tmp_path: Path, nights: tuple[Path, list[NightTruth]], clock: Clock) -> None:
    archive, truths = nights
    with serve_archive(archive, arrival=True) as url:
        config = config_for(
            tmp_path, archive, url, budget=50 * 10**9,
            extra=(
                f'\n[[consumers]]\nname = "mirror"\nkeep = ["raw"]\nfields = [{MIRRORED_FIELD}]\n'
                f"\n[follow]\nenabled = true\ndelay_hours = {DELAY_HOURS}\npoll_minutes = 0.01\n"
                f"\n[service]\nevent_retention_days = {RETENTION_DAYS}\n"
            ),
        )  # fmt: skip
        store = store_of(config)
        daemon = subprocess.Popen(streamer_cmd(config, "run"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            figures = _follow(daemon.pid, config, store, truths, clock)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
            assert daemon.stderr is not None
            log = daemon.stderr.read()
            daemon.stderr.close()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    rss, status_s, ledger_sizes = figures
    print(f"daemon RSS per night (MB): {[round(r / 1e6, 1) for r in rss]}")
    print(f"slowest status per night (CPU s, wall s): {[(round(c, 2), round(w, 2)) for c, w in status_s]}")
    print(f"ledger size per night (kB): {[s // 1024 for s in ledger_sizes]}")
    assert max(rss[2:]) <= 1.10 * rss[1], f"RSS grew beyond 10 % after the second night: {rss}"
    assert max(c for c, _w in status_s) < 1.0, f"status took {status_s} (CPU s, wall s)"


def _follow(
    pid: int, config: Path, store: Path, truths: list[NightTruth], clock: Clock
) -> tuple[list[int], list[tuple[float, float]], list[int]]:
    rss: list[int] = []
    status_s: list[tuple[float, float]] = []
    ledger_sizes: list[int] = []
    catalogues_per_night = 0
    before = (NIGHTS[0] - dt.timedelta(days=1)).isoformat()  # the night due when the follower starts
    assert wait_for(lambda: before in planned_nights(store, starting=True), timeout=60)
    (counts,) = read_ledger(store, "SELECT value FROM meta WHERE key LIKE ?", f"planned:{before}:%")[0]
    assert sum(json.loads(counts).values()) == 0, "the archive has nothing of the night before the first"
    for i, night in enumerate(NIGHTS):
        clock.set(due_at(night) - 600)
        time.sleep(3.0)  # five looks of the follower (poll_minutes = 0.01)
        assert night.isoformat() not in planned_nights(store), f"{night} planned before it was due"
        clock.set(due_at(night) + 60)
        watch = NightWatch(config, store, night)
        assert wait_for(watch.settled, timeout=300, period=0.5), f"night {night} did not finish"
        status_s.append((watch.slowest_status_cpu_s, watch.slowest_status_wall_s))
        on_disk = files_on_disk(store)
        catalogues = {p for p in on_disk if p.startswith("apcat/")}
        if i == 0:
            catalogues_per_night = len(catalogues)
            assert catalogues_per_night > 0
        assert len(catalogues) == (i + 1) * catalogues_per_night
        mirrored = _mirrored(truths[: i + 1])
        assert on_disk - catalogues == mirrored, f"after {night}: on disk beyond what consumers keep"
        assert not unfinished_files(store)
        rss.append(rss_bytes(pid))
        ledger_sizes.append(sum(store.joinpath(n).stat().st_size for n in LEDGER_NAMES[:2] if store.joinpath(n).exists()))
        _check_events(store, clock.now(), first_night=NIGHTS[0], first=i == 0, last=i == len(NIGHTS) - 1)
    return rss, status_s, ledger_sizes


class NightWatch:
    """Whether a night is done: planned, every task done, and swept by the ledger's account. Each look
    runs ``streamer status --json`` and keeps its slowest answer, in CPU seconds of the status process
    (the machine is shared with the daemon and its workers) and in wall seconds."""

    def __init__(self, config: Path, store: Path, night: dt.date) -> None:
        self.config, self.store, self.night = config, store, night
        self.slowest_status_cpu_s = self.slowest_status_wall_s = 0.0

    def settled(self) -> bool:
        before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        result = run_cli(self.config, "status", "--json", timeout=60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only status has ended among the test's children
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        self.slowest_status_cpu_s = max(self.slowest_status_cpu_s, cpu)
        self.slowest_status_wall_s = max(self.slowest_status_wall_s, time.monotonic() - started)
        assert result.returncode == 0, result.stderr
        if self.night.isoformat() not in planned_nights(self.store):
            return False
        states = dict(read_ledger(self.store, "SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        # the daemon's sweep is over: no unkept file left on disk or being deleted, by the ledger
        # (what is on disk is then checked by a walk, against the truth)
        (unkept,) = read_ledger(
            self.store, "SELECT COUNT(*) FROM files WHERE state IN ('on_disk', 'deleting') AND kept = 0 AND kind != 'apcat'"
        )[0]
        return set(states) == {"done"} and unkept == 0


def _mirrored(truths: list[NightTruth]) -> set[str]:
    """The raw science frames of MIRRORED_FIELD of these nights (by IRSA's file names): what "mirror" keeps."""
    return {p for truth in truths for p in truth.raw_relpaths("object") if f"_{MIRRORED_FIELD:06d}_" in p}


def _check_events(store: Path, now: float, *, first_night: dt.date, first: bool, last: bool) -> None:
    """Events older than the retention are pruned: none older than it (and one prune period), and at the end
    none left of the first night's plan."""
    oldest = read_ledger(store, "SELECT MIN(t) FROM events")[0][0]
    assert oldest is not None and float(str(oldest)) >= now - RETENTION_DAYS * 86400 - 3600 - 60
    first_plans = read_ledger(store, "SELECT COUNT(*) FROM events WHERE message LIKE ?", f"night {first_night}: jobs%")[0][0]
    if first:
        assert first_plans > 0
    if last:
        assert first_plans == 0, "the first night's plan events outlived the retention"
