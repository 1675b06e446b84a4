"""What the stages of the service share: configuration, ledger, executor, and the in-memory state of one run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from streamer import clock
from streamer.config import Config
from streamer.execution.base import Executor
from streamer.ledger.core import Ledger
from streamer.rules.eviction import Watermarks
from streamer.service.diskspace import DiskPause
from streamer.service.systemd import Notifier

log = logging.getLogger("streamer.service")

#: Bytes counted for the ledger beyond its files' blocks (SQLite grows its WAL between two checks).
LEDGER_SLACK_BYTES = 64 * 1024


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11, ``wait_for`` loses a cancellation
    that arrives as the event is set, and a task that should end keeps looping. It always yields to
    the event loop once, so a loop woken by its own change cannot starve signals and results.
    """
    await asyncio.sleep(0)  # Event.wait() on a set event returns without yielding to the loop
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


class Finished(Exception):
    """Raised inside the task group to end the service."""


@dataclass
class Context:
    """One running service over one ledger: shared by every stage, changed only on the event loop."""

    config: Config
    ledger: Ledger
    executor: Executor
    burst: bool
    notifier: Notifier = field(default_factory=Notifier)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    planning_done: asyncio.Event = field(default_factory=asyncio.Event)
    #: A planner pass is under way (its files and jobs are not all recorded yet).
    planning: bool = False
    #: Work ended since the daemon's last sweep of erasable files (see ``evictor.daemon_idle``).
    sweep_due: bool = False
    running_jobs: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    downloading: set[int] = field(default_factory=set)
    stuck_reason: str | None = None
    stopped_by: str | None = None
    output_bytes_wanted: int = 0
    started: float = field(default_factory=clock.now)
    fetcher: Any = None
    client: Any = None
    space: Any = None
    #: The budget in effect: ``storage.budget``, or less where the filesystem holds less (``diskspace.fit_budget``).
    budget: int = 0
    disk: DiskPause = field(init=False)

    def __post_init__(self) -> None:
        self.budget = self.budget or self.config.storage.budget
        self.disk = DiskPause(self.ledger, self.config.storage.root, self.poke)

    @property
    def marks(self) -> Watermarks:
        storage = self.config.storage
        return Watermarks(self.budget, storage.high_watermark, storage.low_watermark)

    def poke(self) -> None:
        """Wake the stages: something they wait for may have changed."""
        self.changed.set()

    async def wait_change(self, timeout: float) -> None:
        await wait_event(self.changed, timeout)
        self.changed.clear()

    def stop(self, signum: int | None = None) -> None:
        """Stop taking work; running tasks get ``shutdown_grace_s`` to finish."""
        if not self.stopping.is_set():
            name = signal.Signals(signum).name if signum else "request"
            self.stopped_by = name
            log.info("stopping (%s): no new work; waiting for running tasks", name)
            self.notifier.stopping()
            self.stopping.set()
            self.changed.set()

    def overhead(self) -> int:
        """Bytes under the root that no file row accounts for: the ledger itself."""
        ledger_path = self.config.storage.ledger_path
        if not ledger_path.is_relative_to(self.config.storage.root):
            return 0
        total = 0
        for suffix in ("", "-wal", "-shm", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{ledger_path}{suffix}").st_blocks * 512
        return total + LEDGER_SLACK_BYTES

    def used_bytes(self) -> int:
        """Disk use by the ledger's account: files on disk, reservations, and the ledger itself."""
        return self.ledger.committed_bytes() + self.overhead()
