"""A full filesystem: the budget in effect, the disk pause, and a ledger that cannot write.

The budget is the service's own limit; the filesystem can hold less (a budget set above the free
space, other users' files, a quota). Three rules:

- At start, the service works to :func:`streamer.rules.budget.budget_in_effect`: ``storage.budget``
  capped by what the filesystem can hold for it (its files there plus the free space, less a margin).
- A full-disk error (ENOSPC or EDQUOT, from a download, a worker's product or a master) is the
  disk's fault, not the file's or the job's: the job goes back to ready without counting the
  attempt, the download keeps its reservation, and :class:`DiskPause` stops new downloads and new
  dispatch until ``os.statvfs`` of the storage root shows room for the largest waiting item plus the
  margin. A download that would not fit the free space waits the same way, alone.
- While anything waits, :func:`disk_watcher` frees erasable files for it and reads the free space
  again with a backoff (0.5 s doubling to 15 s); the pause ends when space returns.

The pause is said in the log, as ``disk_full`` and ``disk_free`` events, in systemd's STATUS and in
``streamer status`` ("paused: disk full (N free)", meta key ``disk.pause``). SQLite's "database or
disk is full" on the ledger itself ends the service instead (:func:`ledger_full`): one line, exit 1,
the ledger intact; a restart continues where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from streamer import clock
from streamer.config import format_size
from streamer.errors import StreamerError
from streamer.ledger import jobs as ledger_jobs
from streamer.ledger.core import Ledger
from streamer.ledger.disk import BUDGET_META_KEY, PAUSE_META_KEY
from streamer.rules.budget import budget_in_effect, disk_deficit_bytes, disk_has_room, next_disk_poll_s
from streamer.rules.eviction import choose_victims
from streamer.service.budget import minimum_budget
from streamer.storage.atomic import filesystem_bytes, free_bytes, is_disk_full
from streamer.storage.deleter import delete_files

if TYPE_CHECKING:
    from streamer.service.context import Context

log = logging.getLogger("streamer.service")

_CHAIN_LIMIT: Final = 64


class LedgerFullError(StreamerError):
    """The ledger's filesystem has no room: the service stopped; a restart continues once there is room."""


class DiskPause:
    """Downloads and dispatch waiting for room on the filesystem (see the module docstring).

    The fetcher's gate too (``wait_for_room`` and ``pause``, the interface of
    :class:`streamer.service.fetcher.DiskGate`). Used on the service's event loop only.
    """

    def __init__(self, ledger: Ledger, root: Path, on_change: Callable[[], None]) -> None:
        self.ledger = ledger
        self.root = root
        self.on_change = on_change
        self.paused = False
        self.reason = ""
        self.since = 0.0
        self.free = 0
        self.poll_s: float | None = None
        self._tripped_need = 0
        self._waiting: dict[int, int] = {}
        self._tokens = 0
        self._changed = asyncio.Event()

    @property
    def waiting(self) -> bool:
        """Whether anything waits for the disk: the pause, or a download without room."""
        return self.paused or bool(self._waiting)

    @property
    def need(self) -> int:
        """Bytes the largest waiting item needs."""
        return max([self._tripped_need, *self._waiting.values()])

    def deficit(self) -> int:
        return disk_deficit_bytes(self._read_free(), self.need, filesystem_bytes(self.root)) if self.waiting else 0

    def trip(self, reason: str, need: int = 0) -> None:
        """A write failed for want of room: downloads and new tasks wait until ``need`` bytes (and the margin) are free."""
        self._tripped_need = max(self._tripped_need, need)
        self.reason = reason
        if not self.paused:
            self.paused = True
            self.since = clock.now()
            self._read_free()
            log.warning("paused: disk full (%s free): %s; downloads and new tasks wait for room", format_size(self.free), reason)
            self.ledger.event("disk_full", f"paused: {reason}", level="warning")
        self.poll_s = None
        self._record()
        self._wake()

    def poll(self) -> bool:
        """Read the free space and end the pause when the largest waiting item has room; True while anything waits."""
        if self.paused and disk_has_room(self._read_free(), self.need, filesystem_bytes(self.root)):
            self.paused = False
            self._tripped_need = 0
            log.info("resumed: %s free on the filesystem after %.0f s of pause", format_size(self.free), clock.now() - self.since)
            self.ledger.event("disk_free", f"resumed: {format_size(self.free)} free")
            self.on_change()
        self._record()
        self._wake()
        return self.waiting

    # --- the fetcher's gate ------------------------------------------------------------------

    def pause(self, message: str, delay: float | None = None) -> None:
        """A download failed for want of room (``delay`` is not used: the pause lasts until there is room)."""
        del delay
        self.trip(message)

    def paused_for_s(self) -> float:
        return clock.now() - self.since if self.paused else 0.0

    async def wait_for_room(self, need: int) -> None:
        """Return once downloads may go on and ``need`` bytes (and the margin) are free."""
        token: int | None = None
        try:
            while self.paused or not disk_has_room(self._read_free(), need, filesystem_bytes(self.root)):
                if token is None:
                    if not self.waiting:
                        log.warning("%s free on the filesystem, a download needs %s: downloads wait for room",
                                    format_size(self.free), format_size(need))  # fmt: skip
                    self._tokens += 1
                    token = self._tokens
                    self._waiting[token] = need
                    self._record()
                    self._wake()
                await self.wait_changed(15.0)
        finally:
            if token is not None:
                self._waiting.pop(token, None)
                self._record()

    async def wait_changed(self, timeout: float) -> None:
        """Wait until the pause changes or the free space is read again, at most ``timeout`` seconds."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await changed.wait()

    # --- state ---------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What status shows (meta key ``disk.pause``)."""
        return {"waiting": self.waiting, "paused": self.paused, "free_bytes": self.free, "need_bytes": self.need,
                "since": self.since if self.paused else None, "reason": self.reason if self.paused else None,
                "downloads_waiting": len(self._waiting)}  # fmt: skip

    def _read_free(self) -> int:
        self.free = free_bytes(self.root)
        return self.free

    def _record(self) -> None:
        self.ledger.set_meta(PAUSE_META_KEY, json.dumps(self.describe()))

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


async def disk_watcher(ctx: Context) -> None:
    """While anything waits for the disk: free erasable files for it, and read the free space with a backoff."""
    from streamer.service.context import wait_event  # context builds the DiskPause: imported here, not at the top

    pause = ctx.disk
    while not ctx.stopping.is_set():
        if not pause.waiting:
            await pause.wait_changed(5.0)
            continue
        if evict_for_disk(ctx, pause.deficit()):
            pause.poll_s = None
        if not pause.poll():
            continue
        pause.poll_s = next_disk_poll_s(pause.poll_s)
        await wait_event(ctx.stopping, pause.poll_s)


def evict_for_disk(ctx: Context, deficit: int) -> int:
    """Free erasable files (the evictor's order) for ``deficit`` bytes; return the bytes freed."""
    if deficit <= 0:
        return 0
    victims = choose_victims(ctx.ledger.erasable(limit=200), deficit)
    freed = delete_files(ctx.ledger, ctx.config.storage.root, victims) if victims else 0
    if freed:
        log.info("freed %s of erasable files for the disk pause", format_size(freed))
        if ctx.space is not None:
            ctx.space.space_freed()
        ctx.poke()
    return freed


def fit_budget(ctx: Context) -> int:
    """The budget in effect for this run (:func:`~streamer.rules.budget.budget_in_effect`), said when below ``storage.budget``."""
    storage = ctx.config.storage
    own = sum(f["disk_bytes"] for (_kind, state), f in ctx.ledger.bytes_by_kind_and_state().items() if state in ("on_disk", "deleting"))
    minimum = minimum_budget(ctx.config, ctx.ledger) if ledger_jobs.job_count(ctx.ledger) else 0
    free, size = free_bytes(storage.root), filesystem_bytes(storage.root)
    budget = budget_in_effect(storage.budget, own_bytes=own + ctx.overhead(), free_bytes=free, filesystem_bytes=size, minimum=minimum)
    ctx.ledger.set_meta(BUDGET_META_KEY, str(budget))
    if budget < storage.budget:
        message = (
            f"storage.budget = {format_size(storage.budget)} is more than the filesystem of storage.root can hold "
            f"({format_size(free)} free of {format_size(size)}): working to a budget of {format_size(budget)}"
        )
        log.warning("%s", message)
        ctx.ledger.event("budget_capped", message, level="warning")
    return budget


def ledger_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or one it came from, or one in its group) is SQLite's "database or disk is full"
    or a full filesystem under the ledger's lock."""
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending and len(seen) < _CHAIN_LIMIT:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, sqlite3.Error) and (
            getattr(current, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(current)
        ):
            return True
        if is_disk_full(current):
            return True
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend((current.__cause__, current.__context__))
    return False
