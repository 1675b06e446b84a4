"""Downloads as the service keeps account of them: reserved, transferred, recorded.

The way of one file (one ledger transaction per state change, see :mod:`streamer.ledger.downloads`)::

    wanted --reserve (waits for space)--> reserved --> downloading
      --transfer (streamer.archive.transfer: .part, Range resume, verify, fsync, rename)-->
      on_disk (disk_bytes = st_blocks * 512, actual_size = bytes stored)

Permanent refusals (404, 403) end ``missing`` with the reason, the status and a retry date
(``archive.missing_retry_hours`` later, none once ``archive.missing_max_attempts`` refusals are
used up). Transient failures are retried by the client's policy; a file that fails otherwise
every time ends ``missing`` with a retry date. A download that fails as a whole (the body
failed verification every time: ``corrupt``; any other error, an OSError such as a directory
where the file goes: ``missing``, raised as :class:`DownloadError`) is retried after the
growing delays of :mod:`streamer.rules.download_retry` and parked (no retry date) after its
last failure; each is logged in one line. Which files to fetch, in which order, is
:func:`streamer.ledger.downloads.download_candidates`; a ``deleted`` file it lists is wanted again.

Status indicators: the meta key ``archive.outage`` (JSON from
:meth:`~streamer.archive.client.OutageGate.status`, with ``"outage": true`` while downloads are
paused) and the events ``archive_outage``, ``archive_back`` and ``disk_full``.

Backpressure: a download whose reservation does not fit the budget waits on
:class:`SpaceSignal` until the evictor calls :meth:`SpaceSignal.space_freed`. Low free space on
the filesystem, ENOSPC or EDQUOT pause all downloads (the ``.part`` removed: its bytes are the room
that lacks); the service gives them one pause with dispatch (``streamer.service.diskspace``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from streamer import clock
from streamer.archive.client import ArchiveClient, FailureCount, PermanentError, TransientError
from streamer.archive.transfer import (
    HEADER_RESERVATION,
    MAX_FILE_BYTES,
    TransferCounts,
    disk_bytes,
    download,
    download_header,
    head_size,
    part_path,
    reservation_for,
    verify_in_place,
)
from streamer.config import StorageConfig
from streamer.errors import StreamerError
from streamer.ledger import downloads
from streamer.ledger.core import Ledger
from streamer.rules.download_retry import MAX_FILE_FAILURES, RetryFile, after_download_failure
from streamer.storage.atomic import is_disk_full
from streamer.storage.naming import NamingError
from streamer.storage.nofollow import UnsafePathError, make_dirs_below
from streamer.storage.paths import check_archive_relpath, local_path

log = logging.getLogger(__name__)

DOWNLOADABLE_STATES: Final = downloads.FETCH_NOW_STATES + downloads.RETRY_STATES


class DownloadError(StreamerError):
    """A download failed in a way the fetcher did not expect; the file was set ``missing`` with a retry date."""


@dataclass(frozen=True)
class FetchOutcome:
    """What became of one file: its final state and what this call did."""

    file_id: int
    relpath: str
    state: str
    requests: int = 0
    bytes_transferred: int = 0
    error: str | None = None
    http_status: int | None = None


class SpaceSignal:
    """Backpressure between downloads and the evictor.

    A download whose reservation does not fit waits in :meth:`wait_for_space`;
    ``bytes_wanted`` says how much the waiting downloads need and ``space_wanted`` is
    set while any waits, so the evictor can ``await signal.space_wanted.wait()``. The
    evictor calls :meth:`space_freed` after freeing bytes (it is also safe to call at
    any other time). Waiters also re-check every ``poll_s`` seconds.
    """

    def __init__(self, *, poll_s: float = 5.0) -> None:
        self.poll_s = poll_s
        self.space_wanted = asyncio.Event()
        self._freed = asyncio.Event()
        self._waiting: dict[int, int] = {}

    @property
    def bytes_wanted(self) -> int:
        return sum(self._waiting.values())

    @property
    def waiting_files(self) -> frozenset[int]:
        """Ids of the downloads waiting for budget now."""
        return frozenset(self._waiting)

    def space_freed(self) -> None:
        """Wake every download waiting for space (call from the service's event loop)."""
        self._freed.set()
        self._freed = asyncio.Event()

    async def wait_for_space(self, file_id: int, n_bytes: int) -> None:
        self._waiting[file_id] = n_bytes
        self.space_wanted.set()
        freed = self._freed
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):  # not wait_for: it can lose a cancellation on 3.11
                    await freed.wait()
        finally:
            self._waiting.pop(file_id, None)
            if not self._waiting:
                self.space_wanted.clear()


class DiskGate:
    """Pauses downloads while the filesystem itself lacks room (another process, ENOSPC, a quota).

    The budget is the service's own limit; this is the disk's. A pause doubles while it lasts, up to an hour.
    """

    def __init__(self, ledger: Ledger, root: Path, *, min_free_bytes: int, pause_s: float) -> None:
        self.ledger = ledger
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.pause_s = pause_s
        self._paused_until = 0.0

    def paused_for_s(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())

    async def wait_for_room(self, need: int) -> None:
        """Return once ``need`` bytes (and the safety margin) are free on the filesystem."""
        delay = self.pause_s
        while True:
            remaining = self._paused_until - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)
                continue
            free = shutil.disk_usage(self.root).free
            if free >= need + self.min_free_bytes:
                return
            self.pause(f"only {free} bytes free on the filesystem, {need} needed", delay)
            delay = min(delay * 2, 3600.0)

    def pause(self, message: str, delay: float | None = None) -> None:
        delay = self.pause_s if delay is None else delay
        self._paused_until = time.monotonic() + delay
        log.warning("%s; pausing downloads for %.0f s", message, delay)
        self.ledger.event("disk_full", f"{message}; downloads paused for {delay:.0f} s", level="warning")


def remove_orphan_parts(ledger: Ledger, root: Path) -> int:
    """Delete ``.part``/``.zpart`` files under the root whose file is not being downloaded."""
    removed = 0
    for directory in ("raw", "sci"):
        base = root / directory
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            if path.is_symlink() or not path.is_file() or not path.name.endswith((".part", ".zpart")):
                continue
            final_name = path.name.rsplit(".", 1)[0]
            relpath = path.with_name(final_name).relative_to(root).as_posix()
            row = ledger.file_by_relpath(relpath)
            if row is None or row["state"] not in ("reserved", "downloading") or path.name.endswith(".zpart"):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def prepare_directories(root: Path, relpath: str, final: Path) -> None:
    """Make the directories of a download below the root (made first if need be), refusing any symlink on the way."""
    root.mkdir(parents=True, exist_ok=True)
    make_dirs_below(root, relpath)
    if final.is_symlink():
        raise UnsafePathError(f"{relpath!r}: the file is a symlink")


def known_size(row: dict[str, Any]) -> int | None:
    """A file's recorded expected size when it is plausible (1 byte to MAX_FILE_BYTES), else None (ask HEAD)."""
    size = row["expected_size"]
    return size if size is not None and 0 < size <= MAX_FILE_BYTES else None


def failure_recorder(
    ledger: Ledger, row: dict[str, Any], *, requests: list[int] | None = None
) -> Callable[[TransientError, FailureCount], None]:
    """The ``on_failure`` callback of a transfer: each failed request counts against the file (and in ``requests``)."""

    def record(err: TransientError, count: FailureCount) -> None:
        downloads.record_failed_request(ledger, row["id"], err)
        if requests is not None:
            requests[0] += 1
        log.info("%s: %s (retrying, failure %d)", row["relpath"], err.reason, count.total)

    return record


def mark_on_disk(ledger: Ledger, row: dict[str, Any], final: Path, *, status: int) -> None:
    """A verified file at its final path: on disk, with its allocated and real sizes."""
    downloads.mark_on_disk(ledger, row["id"], disk_bytes=disk_bytes(final), actual_size=final.stat().st_size, http_status=status)


async def wait_out_full_disk(fetcher: Fetcher, file_id: int, relpath: str, message: str) -> FetchOutcome:
    """The filesystem refused a write (DiskFull, ENOSPC, EDQUOT): the file stays reserved, its ``.part`` (the room
    that lacks) removed, and downloads pause; return once there is room (the download loop then takes it again)."""
    part_path(local_path(fetcher.root, relpath)).unlink(missing_ok=True)
    if fetcher.ledger.file(file_id)["state"] == "downloading":
        downloads.pause_download(fetcher.ledger, file_id, message)
    fetcher.disk.pause(f"{relpath}: {message}")
    await fetcher.disk.wait_for_room(HEADER_RESERVATION)
    return FetchOutcome(file_id, relpath, str(fetcher.ledger.file(file_id)["state"]), error=message)


def failed_as_whole(
    ledger: Ledger, row: dict[str, Any], reason: str, status: int | None, *, state: str, requests: int = 0,
    count_request: bool = False,
) -> FetchOutcome:  # fmt: skip
    """Record a download that failed as a whole, with the retry date of its failure count (none: parked); log one line."""
    failures = downloads.download_failures(ledger, row["id"]) + 1
    action = after_download_failure(failures)
    retry_s = action.delay_s if isinstance(action, RetryFile) else None
    downloads.record_download_failure(
        ledger, row["id"], row["relpath"], reason, status, state=state, retry_s=retry_s, count_request=count_request
    )
    when = "parked" if retry_s is None else f"retry in {retry_s:.0f} s"
    log.warning("%s: %s, failure %d of %d (%s): %s", row["relpath"], state, failures, MAX_FILE_FAILURES, when, reason)
    final_state = downloads.file_state(ledger, row["id"])
    return FetchOutcome(row["id"], row["relpath"], final_state, requests + int(count_request), 0, reason, status)


class Fetcher:
    """Takes the ledger's files to disk within the disk budget.

    One Fetcher per service, running on the service's event loop (it writes the ledger).
    ``fetch(file_id)`` takes one file to its final state; at most ``archive.max_connections``
    transfers run at once however many fetches are started.
    """

    def __init__(
        self,
        client: ArchiveClient,
        ledger: Ledger,
        storage: StorageConfig,
        *,
        space: SpaceSignal | None = None,
        overhead: Callable[[], int] | int = 0,
        expected_shapes: dict[str, tuple[int, int]] | None = None,
        min_free_bytes: int = 64 * 2**20,
        disk_pause_s: float = 30.0,
        missing_retry_s: float | None = None,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.root = storage.root
        self.budget = storage.budget
        self.space = space or SpaceSignal()
        self._overhead = overhead
        self.expected_shapes = expected_shapes or {}
        self.disk = DiskGate(ledger, storage.root, min_free_bytes=min_free_bytes, pause_s=disk_pause_s)
        archive = client.config
        self.missing_retry_s = archive.missing_retry_hours * 3600 if missing_retry_s is None else missing_retry_s
        self.missing_max_attempts = archive.missing_max_attempts
        self.slots = asyncio.Semaphore(archive.max_connections)

    # --- public API ---------------------------------------------------------------------------

    def remove_orphan_parts(self) -> int:
        return remove_orphan_parts(self.ledger, self.root)

    async def fetch(self, file_id: int) -> FetchOutcome:
        """Take one file to a final state (on_disk, missing, corrupt) or report why it was left.

        Whatever goes wrong, the file does not stay ``reserved``/``downloading`` with bytes held:
        an error other than a StreamerError (or a cancellation) sets it ``missing`` with a retry
        date (none after its last failure), its reservation released, logs one line, and is
        raised as :class:`DownloadError`.
        """
        row = self.ledger.file(file_id)
        try:
            return await self._fetch(file_id)
        except StreamerError:
            raise
        except Exception as err:
            message = " ".join(f"{type(err).__name__}: {err}".split())
            if is_disk_full(err):  # the filesystem's fault, not the file's: it waits for room
                return await wait_out_full_disk(self, file_id, row["relpath"], message)
            failed_as_whole(self.ledger, row, f"unexpected error: {message}", None, state="missing", count_request=True)
            raise DownloadError(f"{row['relpath']}: {message}") from None

    async def probe_size(self, file_id: int) -> int:
        """The size of a planned file from a HEAD request, recorded as its expected size."""
        return await self._head_size(self.ledger.file(file_id), FailureCount())

    # --- one file -----------------------------------------------------------------------------

    async def _fetch(self, file_id: int) -> FetchOutcome:
        row = self.ledger.file(file_id)
        relpath = row["relpath"]
        try:
            final = local_path(self.root, check_archive_relpath(relpath))
        except NamingError as err:
            return self._give_up(row, f"unsafe or unknown path: {err}", None, retryable=False)
        state = row["state"]
        if state not in DOWNLOADABLE_STATES:
            return FetchOutcome(file_id, relpath, state)
        if state in downloads.RETRY_STATES and (row["retry_at"] is None or row["retry_at"] > clock.now()):
            return FetchOutcome(file_id, relpath, state, error=row["last_error"], http_status=row["http_status"])
        if state == "deleted":
            downloads.want_again(self.ledger, file_id)
            row = self.ledger.file(file_id)
        try:
            prepare_directories(self.root, relpath, final)
            if final.exists() and await self._adopt_existing(row, final):
                return FetchOutcome(file_id, relpath, "on_disk")
            if row["kind"] == "sciimg_header":
                return await self._fetch_header_file(row, final)
            return await self._fetch_file(row, final)
        except UnsafePathError as err:  # a symlink planted under the root: nothing is written through it
            return self._give_up(self.ledger.file(file_id), f"unsafe path: {err}", None, retryable=False)
        except PermanentError as err:
            return self._give_up(self.ledger.file(file_id), err.reason, err.status, count_request=err.status is not None)
        except TransientError as err:  # the size request (HEAD) failed every time
            return self._give_up(self.ledger.file(file_id), f"gave up: {err.reason}", err.status)

    def _overhead_bytes(self) -> int:
        return self._overhead() if callable(self._overhead) else self._overhead

    async def _adopt_existing(self, row: dict[str, Any], final: Path) -> bool:
        """A complete file already at the final path (a crash after rename, or reconcile): verify and record it."""
        complete = await asyncio.to_thread(
            verify_in_place, final, row["kind"], expected_size=row["expected_size"], shape=self._shape_for(row)
        )
        if not complete:
            return False
        downloads.adopt_on_disk(self.ledger, row["id"], disk_bytes=disk_bytes(final), actual_size=final.stat().st_size)
        part_path(final).unlink(missing_ok=True)
        return True

    def _shape_for(self, row: dict[str, Any]) -> tuple[int, int] | None:
        return self.expected_shapes.get(row["kind"])

    async def _head_size(self, row: dict[str, Any], count: FailureCount) -> int:
        """The size of a file from a HEAD request (retried like any request); recorded as expected_size."""
        size = await head_size(self.client, row["url"], count=count, on_failure=failure_recorder(self.ledger, row))
        downloads.record_expected_size(self.ledger, row["id"], size)
        return size

    async def _reserve(self, row: dict[str, Any], n_bytes: int) -> None:
        """Reserve ``n_bytes`` against the budget, waiting (backpressure) until it fits."""
        if row["state"] == "reserved" and row["reserved_bytes"] >= n_bytes:
            return
        announced = False
        while not downloads.reserve_download(
            self.ledger, row["id"], n_bytes, budget=self.budget, overhead=self._overhead_bytes()
        ):
            if n_bytes + self._overhead_bytes() > self.budget:
                raise PermanentError(f"needs {n_bytes} bytes, more than the whole budget ({self.budget})")
            if not announced:
                log.info("%s: waiting for %d bytes of budget", row["relpath"], n_bytes)
                announced = True
            await self.space.wait_for_space(row["id"], n_bytes)

    async def _fetch_file(self, row: dict[str, Any], final: Path) -> FetchOutcome:
        count = FailureCount()
        size = known_size(row) or await self._head_size(row, count)
        reservation = reservation_for(row["kind"], size)
        counts = TransferCounts()
        await self.disk.wait_for_room(reservation)
        await self._reserve(self.ledger.file(row["id"]), reservation)
        async with self.slots:
            downloads.mark_downloading(self.ledger, row["id"])
            try:
                await download(
                    self.client, row["url"], final, kind=row["kind"], size=size, shape=self._shape_for(row),
                    counts=counts, count=count, on_failure=failure_recorder(self.ledger, row),
                )  # fmt: skip
            except TransientError as err:
                part_path(final).unlink(missing_ok=True)
                reason = f"gave up after {count.total} failures: {err.reason}"
                if err.verification:
                    return failed_as_whole(self.ledger, row, reason, err.status, state="corrupt", requests=counts.requests)
                return self._give_up(self.ledger.file(row["id"]), reason, err.status, requests=counts.requests)
            except PermanentError as err:
                part_path(final).unlink(missing_ok=True)
                return self._give_up(
                    self.ledger.file(row["id"]), err.reason, err.status, requests=counts.requests - 1,
                    count_request=err.status is not None,
                )  # fmt: skip
            mark_on_disk(self.ledger, row, final, status=200)
        return FetchOutcome(row["id"], row["relpath"], "on_disk", counts.requests, counts.bytes_transferred)

    def _give_up(
        self, row: dict[str, Any], reason: str, status: int | None, *, requests: int = 0, count_request: bool = False,
        retryable: bool = True,
    ) -> FetchOutcome:  # fmt: skip
        """Record a file as missing (with a retry date while refusals remain); release its bytes.

        ``count_request``: the refused request was not yet counted in ``attempts`` (permanent errors).
        """
        downloads.record_missing(
            self.ledger, row["id"], row["relpath"], reason, status, retry_s=self.missing_retry_s,
            max_refusals=self.missing_max_attempts, retryable=retryable, count_request=count_request,
        )  # fmt: skip
        log.warning("%s: missing: %s", row["relpath"], reason)
        return FetchOutcome(row["id"], row["relpath"], "missing", requests + int(count_request), 0, reason, status)

    # --- header-only files ----------------------------------------------------------------------

    async def _fetch_header_file(self, row: dict[str, Any], final: Path) -> FetchOutcome:
        await self.disk.wait_for_room(HEADER_RESERVATION)
        await self._reserve(self.ledger.file(row["id"]), HEADER_RESERVATION)
        requests = [0]
        async with self.slots:
            downloads.mark_downloading(self.ledger, row["id"])
            try:
                transferred = await download_header(
                    self.client, row["url"], final, on_failure=failure_recorder(self.ledger, row, requests=requests)
                )
            except TransientError as err:
                return self._give_up(self.ledger.file(row["id"]), f"gave up: {err.reason}", err.status)
            except PermanentError as err:
                return self._give_up(self.ledger.file(row["id"]), err.reason, err.status, count_request=True)
        mark_on_disk(self.ledger, row, final, status=206)
        return FetchOutcome(row["id"], row["relpath"], "on_disk", requests[0] + 1, transferred)
