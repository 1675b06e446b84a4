"""Streaming downloads: reserved, retried, resumable, verified, durable, and then recorded.

The way of one file (one ledger transaction per state change)::

    wanted --reserve (waits for space)--> reserved --> downloading
      --stream to <final>.part (Range resume on 206, restart on 200)--> verify (structure, checksums)
      --fsync, rename, fsync dir--> on_disk (disk_bytes = st_blocks * 512, actual_size = bytes stored)

Ledger fields: ``attempts`` counts the failed requests for the file's URL (HEAD, GET, header
reads, the flat LED read at planning) plus the one that brought it to disk, so for a file on
disk ``attempts - 1`` is its number of failed requests; ``last_error`` and ``http_status`` hold the
last failure (reasons carry no query strings and no secrets). Permanent refusals (404, 403) end
``missing`` with the reason, the status and a ``retry_at`` (``archive.missing_retry_hours``
later; ``retry_at`` NULL once ``archive.missing_max_attempts`` refusals, counted as
``file_missing`` events, are used up). Transient failures are retried by the client's policy;
a file whose body fails verification every time ends ``corrupt``, one that fails otherwise every
time ends ``missing`` with a retry date. ``Fetcher.due_files()`` lists what to fetch now.

Status indicators: the meta key ``archive.outage`` (JSON from
:meth:`~streamer.archive.client.OutageGate.status`, with ``"outage": true`` while downloads are
paused) and the events ``archive_outage``, ``archive_back`` and ``disk_full``.

Backpressure: a download whose reservation does not fit the budget waits on
:class:`SpaceSignal` until the evictor calls :meth:`SpaceSignal.space_freed`. Low free space on
the filesystem, ENOSPC or EDQUOT pause all downloads and keep the ``.part`` for a resume.

Kinds: ``raw`` and ``sciimg`` are stored as served; ``mskimg`` is verified as served, then
stored tile-compressed (lossless) at its relpath (``..._mskimg.fits.fz``); ``sciimg_header`` is
a header-only read of the sciimg URL stored as a header-only FITS file
(``..._sciimg.header.fits``, read it back with :func:`read_stored_header`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import aiohttp
import numpy as np
from astropy.io import fits

from streamer.config import StorageConfig
from streamer.errors import StreamerError
from streamer.ledger.core import Ledger
from streamer.archive.client import (
    ArchiveClient,
    ArchiveError,
    FailureCount,
    PermanentError,
    SessionExpired,
    TransientError,
    classify_status,
    transient_from_exception,
)
from streamer.archive.naming import NamingError, parse_relpath
from streamer.archive.verify import BLOCK, VerificationError, header_end, verify_fits

log = logging.getLogger(__name__)

ALLOC_UNIT: Final = 4096
RESERVE_SLACK: Final = 2 * ALLOC_UNIT
HEADER_RESERVATION: Final = 128 * 1024
WRITE_CHUNK: Final = 1 << 20
HEADER_FIRST_BLOCKS: Final = 10
RESUME_OVERLAP: Final = 4 * 2880
HEADER_MAX_BYTES: Final = 2880 * 2000
DOWNLOADABLE_STATES: Final = ("wanted", "reserved", "downloading", "missing", "corrupt")
DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
MISSING_EVENT: Final = "file_missing"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DiskFull(Exception):
    """The filesystem refused a write (ENOSPC, EDQUOT) or has too little free space."""


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


def allocation_for(n_bytes: int) -> int:
    """Bytes to reserve for a file of ``n_bytes``: rounded up to 4096, plus slack for metadata blocks."""
    return -(-n_bytes // ALLOC_UNIT) * ALLOC_UNIT + RESERVE_SLACK


def header_relpath(sciimg_relpath: str) -> str:
    """Where the header of a sciimg is stored: ``..._sciimg.fits`` -> ``..._sciimg.header.fits``."""
    if not sciimg_relpath.endswith("_sciimg.fits"):
        raise NamingError(f"path {sciimg_relpath!r}: expected a ..._sciimg.fits path")
    return sciimg_relpath[: -len(".fits")] + ".header.fits"


def mask_relpath(mskimg_relpath: str) -> str:
    """Where a mask is stored (tile-compressed): ``..._mskimg.fits`` -> ``..._mskimg.fits.fz``."""
    if not mskimg_relpath.endswith("_mskimg.fits"):
        raise NamingError(f"path {mskimg_relpath!r}: expected a ..._mskimg.fits path")
    return mskimg_relpath + ".fz"


def check_local_relpath(relpath: str) -> str:
    """Validate a local relpath (an archive path, a stored mask or a stored header); return it."""
    archive_path = relpath
    if relpath.endswith("_sciimg.header.fits"):
        archive_path = relpath[: -len(".header.fits")] + ".fits"
    parse_relpath(archive_path)  # rejects absolute paths, '..' and names that are not ZTF products
    return relpath


def local_path(root: Path, relpath: str) -> Path:
    """``<root>/<relpath>`` after checking that nothing can escape the root."""
    check_local_relpath(relpath)
    path = root.joinpath(*PurePosixPath(relpath).parts)
    if os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) != os.path.abspath(root):
        raise NamingError(f"path {relpath!r}: outside the storage root")
    return path


def part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


def _compressed_part(final: Path) -> Path:
    return final.with_name(final.name + ".zpart")


def disk_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(source: Path, final: Path) -> None:
    with open(source, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(source, final)
    _fsync_dir(final.parent)


def compress_mask(source: Path, target: Path) -> None:
    """Write an int16 mask image as a losslessly tile-compressed FITS file (RICE_1 on integers is exact)."""
    with fits.open(source, memmap=False) as hdul:
        index = next(i for i, h in enumerate(hdul) if h.data is not None)
        data = np.asarray(hdul[index].data)
        header = hdul[index].header.copy()
    for key in ("SIMPLE", "EXTEND", "CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True)
    compressed = fits.CompImageHDU(data=data, header=header, compression_type="RICE_1")
    fits.HDUList([fits.PrimaryHDU(), compressed]).writeto(target, overwrite=True, checksum=True)
    with open(target, "rb+") as handle:
        os.fsync(handle.fileno())


def write_header_file(header_bytes: bytes, target: Path) -> None:
    """Store an image's primary header as a header-only FITS file (NAXIS = 0, the image size kept as ONAXISn)."""
    header = fits.Header.fromstring(header_bytes.decode("ascii"))
    naxis = int(header.get("NAXIS", 0))
    dims = [int(header.get(f"NAXIS{i}", 0)) for i in range(1, naxis + 1)]
    primary = fits.PrimaryHDU(header=header)
    primary.header["NAXIS"] = 0
    for i in range(1, naxis + 1):
        primary.header.remove(f"NAXIS{i}", ignore_missing=True)
    for i, dim in enumerate(dims, start=1):
        primary.header[f"ONAXIS{i}"] = (dim, f"NAXIS{i} of the image this header was read from")
    if "WCSAXES" not in primary.header and naxis:
        primary.header["WCSAXES"] = naxis
    fits.HDUList([primary]).writeto(target, overwrite=True, output_verify="silentfix")
    with open(target, "rb+") as handle:
        os.fsync(handle.fileno())


def read_stored_header(path: Path) -> fits.Header:
    """The header of a stored header file with the image's NAXISn restored (for WCS and footprints)."""
    header = fits.getheader(path)
    dims = []
    while f"ONAXIS{len(dims) + 1}" in header:
        dims.append(int(header[f"ONAXIS{len(dims) + 1}"]))
    if dims:
        header["NAXIS"] = len(dims)
        position = header.index("NAXIS")
        for i, dim in enumerate(dims, start=1):
            header.insert(position + i, (f"NAXIS{i}", dim))
    return header


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


class _RateGuard:
    """Abort a transfer slower than ``min_rate`` bytes/s over each ``window_s`` window."""

    def __init__(self, min_rate: float, window_s: float) -> None:
        self.min_rate = min_rate
        self.window_s = window_s
        self.window_start = time.monotonic()
        self.window_bytes = 0

    def time_left(self) -> float | None:
        if self.min_rate <= 0:
            return None
        return max(0.0, self.window_start + self.window_s - time.monotonic())

    def add(self, n: int) -> None:
        self.window_bytes += n
        self.check()

    def check(self) -> None:
        if self.min_rate <= 0:
            return
        now = time.monotonic()
        if now - self.window_start < self.window_s:
            return
        rate = self.window_bytes / (now - self.window_start)
        if rate < self.min_rate:
            raise TransientError(
                f"stalled: {rate:.0f} B/s over {now - self.window_start:.0f} s (minimum {self.min_rate:.0f} B/s)",
                outage_like=True,
            )
        self.window_start, self.window_bytes = now, 0


async def _read_chunks(response: aiohttp.ClientResponse, guard: _RateGuard, size: int) -> AsyncIterator[bytes]:
    """The body in chunks, raising TransientError when the rate guard trips (also while nothing arrives)."""
    while True:
        left = guard.time_left()
        try:
            if left is None:
                chunk = await response.content.read(size)
            else:
                async with asyncio.timeout(left + 0.001):
                    chunk = await response.content.read(size)
        except TimeoutError:
            guard.check()
            continue
        if not chunk:
            return
        guard.add(len(chunk))
        yield chunk


def _is_html(content_type: str, first: bytes) -> bool:
    head = first[:64].lstrip().lower()
    return "html" in content_type.lower() or head.startswith((b"<!doctype", b"<html", b"<?xml", b"<"))


class Fetcher:
    """Downloads the ledger's wanted files within the disk budget.

    One Fetcher per service, running on the service's event loop (it writes the ledger).
    ``fetch(file_id)`` takes one file to its final state; ``run(queue)`` consumes file ids
    (``None`` ends it) with up to ``archive.max_connections`` downloads at once.
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
        self.min_free_bytes = min_free_bytes
        self.disk_pause_s = disk_pause_s
        archive = client.config
        self.missing_retry_s = archive.missing_retry_hours * 3600 if missing_retry_s is None else missing_retry_s
        self.missing_max_attempts = archive.missing_max_attempts
        self.slots = asyncio.Semaphore(archive.max_connections)
        self._disk_paused_until = 0.0

    # --- public API ---------------------------------------------------------------------------

    async def run(self, queue: asyncio.Queue[int | None]) -> list[FetchOutcome]:
        """Fetch file ids from ``queue`` until a ``None`` arrives and every started fetch has ended."""
        outcomes: list[FetchOutcome] = []
        limit = asyncio.Semaphore(self.client.config.max_connections * 2)

        async def one(file_id: int) -> None:
            try:
                outcomes.append(await self.fetch(file_id))
            except (StreamerError, asyncio.CancelledError):
                raise  # wrong credentials and the like end the run with their own message
            except Exception as err:  # one file's unexpected failure must not stop the others
                log.exception("file %d: unexpected error", file_id)
                self.ledger.event("fetch_error", f"file {file_id}: {type(err).__name__}: {err}", level="error", file_id=file_id)
                outcomes.append(FetchOutcome(file_id, "", "error", error=f"{type(err).__name__}: {err}"))
            finally:
                limit.release()

        async with asyncio.TaskGroup() as group:
            while (file_id := await queue.get()) is not None:
                await limit.acquire()
                group.create_task(one(file_id))
        return outcomes

    async def fetch_all(self, file_ids: list[int]) -> list[FetchOutcome]:
        """Fetch several files concurrently (a convenience over :meth:`run`)."""
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        for file_id in [*file_ids, None]:
            queue.put_nowait(file_id)
        return await self.run(queue)

    def status(self) -> dict[str, Any]:
        """For the service's status: outage state, bytes waiting for budget, whether the disk pauses downloads."""
        return {
            **self.client.gate.status(),
            "waiting_for_space_bytes": self.space.bytes_wanted,
            "disk_paused_for_s": round(max(0.0, self._disk_paused_until - time.monotonic()), 1),
        }

    def due_files(self, *, now: float | None = None) -> list[int]:
        """Ids of files to fetch now: wanted, reserved (after a restart), corrupt, and missing ones due again."""
        now = time.time() if now is None else now
        rows = self.ledger.rows(
            "SELECT id FROM files WHERE kind IN ('raw', 'sciimg', 'sciimg_header', 'mskimg') AND ("
            "state IN ('wanted', 'reserved', 'downloading') "
            "OR (state = 'missing' AND retry_at IS NOT NULL AND retry_at <= ?)) ORDER BY id",
            (now,),
        )
        return [r["id"] for r in rows]

    def remove_orphan_parts(self) -> int:
        """Delete ``.part``/``.zpart`` files under the root whose file is not being downloaded."""
        removed = 0
        for directory in ("raw", "sci"):
            base = self.root / directory
            if not base.is_dir():
                continue
            for path in base.rglob("*"):
                if path.is_symlink() or not path.is_file() or not path.name.endswith((".part", ".zpart")):
                    continue
                final_name = path.name.rsplit(".", 1)[0]
                relpath = path.with_name(final_name).relative_to(self.root).as_posix()
                row = self.ledger.file_by_relpath(relpath)
                if row is None or row["state"] not in ("reserved", "downloading") or path.name.endswith(".zpart"):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    async def fetch(self, file_id: int) -> FetchOutcome:
        """Take one file to a final state (on_disk, missing, corrupt) or report why it was left."""
        row = self.ledger.file(file_id)
        relpath = row["relpath"]
        try:
            final = local_path(self.root, relpath)
        except NamingError as err:
            return self._give_up(row, f"unsafe or unknown path: {err}", None, retryable=False)
        state = row["state"]
        if state == "on_disk" or state not in DOWNLOADABLE_STATES:
            return FetchOutcome(file_id, relpath, state)
        if state == "missing" and (row["retry_at"] is None or row["retry_at"] > time.time()):
            return FetchOutcome(file_id, relpath, "missing", error=row["last_error"], http_status=row["http_status"])
        if final.exists() and await self._adopt_existing(row, final):
            return FetchOutcome(file_id, relpath, "on_disk")
        try:
            if row["kind"] == "sciimg_header":
                return await self._fetch_header_file(row, final)
            return await self._fetch_file(row, final)
        except PermanentError as err:
            return self._give_up(self.ledger.file(file_id), err.reason, err.status, count_request=err.status is not None)
        except TransientError as err:  # the size request (HEAD) failed every time
            return self._give_up(self.ledger.file(file_id), f"gave up: {err.reason}", err.status)

    async def probe_size(self, file_id: int) -> int:
        """The size of a planned file from a HEAD request, recorded as its expected size."""
        return await self._head_size(self.ledger.file(file_id), FailureCount())

    # --- one file -----------------------------------------------------------------------------

    def _overhead_bytes(self) -> int:
        return self._overhead() if callable(self._overhead) else self._overhead

    def _verify_existing(self, row: dict[str, Any], final: Path) -> bool:
        """Whether a file already at the final path is complete (runs in a thread; no ledger access)."""
        as_served = row["kind"] in ("raw", "sciimg")
        try:
            verify_fits(
                final, row["kind"], expected_size=row["expected_size"] if as_served else None,
                expected_shape=self._shape_for(row),
            )  # fmt: skip
        except (VerificationError, OSError) as err:
            log.warning("%s: existing file fails verification (%s); downloading again", row["relpath"], err)
            final.unlink(missing_ok=True)
            return False
        return True

    async def _adopt_existing(self, row: dict[str, Any], final: Path) -> bool:
        """A complete file already at the final path (a crash after rename, or reconcile): verify and record it."""
        if not await asyncio.to_thread(self._verify_existing, row, final):
            return False
        with self.ledger.transaction() as conn:
            state = conn.execute("SELECT state FROM files WHERE id = ?", (row["id"],)).fetchone()[0]
            if state == "corrupt":
                self.ledger.set_file_state(conn, row["id"], "wanted")
            self.ledger.set_file_state(
                conn, row["id"], "on_disk", disk_bytes=disk_bytes(final), actual_size=final.stat().st_size,
                reserved_bytes=0, retry_at=None,
            )  # fmt: skip
        part_path(final).unlink(missing_ok=True)
        return True

    def _shape_for(self, row: dict[str, Any]) -> tuple[int, int] | None:
        return self.expected_shapes.get(row["kind"])

    async def _head_size(self, row: dict[str, Any], count: FailureCount) -> int:
        """The size of a file from a HEAD request (retried like any request); recorded as expected_size."""
        url = row["url"]

        async def head() -> int:
            try:
                async with self.client.session.head(url, allow_redirects=True) as response:
                    if response.status != 200:
                        raise classify_status(response.status, response.reason or "", response.headers)
                    if _is_html(response.headers.get("Content-Type", ""), b""):
                        raise self._html_error()
                    length = response.content_length
            except ArchiveError:
                raise
            except (aiohttp.ClientError, TimeoutError) as err:
                raise transient_from_exception(err, self.client.credentials) from None
            if length is None:
                raise TransientError("HEAD without Content-Length", outage_like=False)
            return length

        size = await self.client.retrying(head, count=count, on_failure=self._record_failure(row))
        with self.ledger.transaction() as conn:
            conn.execute("UPDATE files SET expected_size = ? WHERE id = ?", (size, row["id"]))
        return size

    def _html_error(self) -> TransientError:
        return html_error(self.client)

    def _record_failure(self, row: dict[str, Any], *, requests: list[int] | None = None) -> Callable[[TransientError, FailureCount], None]:
        def record(err: TransientError, count: FailureCount) -> None:
            record_failed_request(self.ledger, row["id"], err)
            if requests is not None:
                requests[0] += 1
            log.info("%s: %s (retrying, failure %d)", row["relpath"], err.reason, count.total)

        return record

    async def _reserve(self, row: dict[str, Any], n_bytes: int) -> None:
        """Reserve ``n_bytes`` against the budget, waiting (backpressure) until it fits."""
        if row["state"] == "reserved" and row["reserved_bytes"] >= n_bytes:
            return
        announced = False
        while True:
            if row["state"] == "downloading":
                with self.ledger.transaction() as conn:
                    self.ledger.set_file_state(conn, row["id"], "reserved", reserved_bytes=0)
                row = self.ledger.file(row["id"])
            if self.ledger.reserve(row["id"], n_bytes, budget=self.budget, overhead=self._overhead_bytes()):
                return
            if n_bytes + self._overhead_bytes() > self.budget:
                raise PermanentError(f"needs {n_bytes} bytes, more than the whole budget ({self.budget})")
            if not announced:
                log.info("%s: waiting for %d bytes of budget", row["relpath"], n_bytes)
                announced = True
            await self.space.wait_for_space(row["id"], n_bytes)
            row = self.ledger.file(row["id"])

    async def _wait_for_disk(self, need: int) -> None:
        """Pause while the filesystem itself lacks room (another process, ENOSPC, quota)."""
        delay = self.disk_pause_s
        while True:
            remaining = self._disk_paused_until - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)
                continue
            free = shutil.disk_usage(self.root).free
            if free >= need + self.min_free_bytes:
                return
            self._pause_for_disk(f"only {free} bytes free on the filesystem, {need} needed", delay)
            delay = min(delay * 2, 3600.0)

    def _pause_for_disk(self, message: str, delay: float) -> None:
        self._disk_paused_until = time.monotonic() + delay
        log.warning("%s; pausing downloads for %.0f s", message, delay)
        self.ledger.event("disk_full", f"{message}; downloads paused for {delay:.0f} s", level="warning")

    def _start(self, row: dict[str, Any]) -> None:
        with self.ledger.transaction() as conn:
            self.ledger.set_file_state(conn, row["id"], "downloading", expect=("reserved", "downloading"))

    async def _fetch_file(self, row: dict[str, Any], final: Path) -> FetchOutcome:
        count = FailureCount()
        size = row["expected_size"] or await self._head_size(row, count)
        stored_extra = size if row["kind"] == "mskimg" else 0  # the compressed copy sits beside the .part
        reservation = allocation_for(size) + (allocation_for(stored_extra) if stored_extra else 0)
        final.parent.mkdir(parents=True, exist_ok=True)
        requests = [0]
        transferred = [0]
        while True:
            await self._wait_for_disk(reservation)
            await self._reserve(self.ledger.file(row["id"]), reservation)
            async with self.slots:
                self._start(row)
                try:
                    await self.client.retrying(
                        lambda: self._attempt(row, final, size, requests, transferred),
                        count=count,
                        on_failure=self._record_failure(row),
                    )
                except DiskFull as err:
                    with self.ledger.transaction() as conn:
                        self.ledger.set_file_state(conn, row["id"], "reserved", last_error=str(err))
                    self._pause_for_disk(f"{row['relpath']}: {err}", self.disk_pause_s)
                    continue
                except TransientError as err:
                    state = "corrupt" if err.verification else "missing"
                    part_path(final).unlink(missing_ok=True)
                    reason = f"gave up after {count.total} failures: {err.reason}"
                    return self._give_up(self.ledger.file(row["id"]), reason, err.status, state=state,
                                         requests=requests[0])  # fmt: skip
                except PermanentError as err:
                    part_path(final).unlink(missing_ok=True)
                    return self._give_up(
                        self.ledger.file(row["id"]), err.reason, err.status, requests=requests[0] - 1,
                        count_request=err.status is not None,
                    )  # fmt: skip
            return FetchOutcome(row["id"], row["relpath"], "on_disk", requests[0], transferred[0])

    async def _attempt(
        self, row: dict[str, Any], final: Path, size: int, requests: list[int], transferred: list[int]
    ) -> None:
        """One GET: stream into the .part (resuming it when the server honours Range), verify, finalise."""
        part = part_path(final)
        offset = part.stat().st_size if part.exists() else 0
        if offset >= size:
            part.unlink()
            offset = 0
        # A resume asks again for the last bytes it has and checks they match, so that a changed
        # file or a bad continuation is caught where the structural check could not see it.
        overlap = min(offset, RESUME_OVERLAP)
        headers = {"Range": f"bytes={offset - overlap}-"} if offset else {}
        requests[0] += 1
        try:
            async with self.client.session.get(row["url"], headers=headers, allow_redirects=True) as response:
                await self._stream(response, part, offset, overlap, size, transferred)
        except (ArchiveError, DiskFull):
            raise
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
            raise transient_from_exception(err, self.client.credentials) from None
        try:
            await asyncio.to_thread(self._finalise, row, part, final, size)
        except VerificationError as err:
            part.unlink(missing_ok=True)
            raise TransientError(f"verification failed: {err}", outage_like=False, verification=True) from None
        except OSError as err:
            if err.errno in DISK_FULL_ERRNOS:
                raise DiskFull(os.strerror(err.errno)) from None
            raise
        self._mark_on_disk(row, final, status=200)

    async def _stream(
        self, response: aiohttp.ClientResponse, part: Path, offset: int, overlap: int, size: int,
        transferred: list[int],
    ) -> None:  # fmt: skip
        """Write the body to ``part``: from ``offset`` on a 206 (after checking ``overlap`` bytes), else from 0."""
        status = response.status
        if status == 416:
            part.unlink(missing_ok=True)
            raise TransientError("HTTP 416: the partial file does not match; starting over", status=416, outage_like=False)
        if status not in (200, 206):
            raise classify_status(status, response.reason or "", response.headers)
        if "html" in response.headers.get("Content-Type", "").lower():
            raise self._html_error()
        start = 0
        total = response.content_length
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if not match or int(match[1]) != offset - overlap:
                part.unlink(missing_ok=True)
                raise TransientError("206 with an unusable Content-Range; starting over", status=206, outage_like=False)
            start = offset - overlap
            if match[3] != "*" and int(match[3]) != size:
                raise TransientError(f"file size changed: {match[3]} bytes, expected {size}", status=206, outage_like=False)
        if total is not None and start + total != size:
            raise TransientError(f"Content-Length {total} at offset {start}, expected {size} bytes in all", status=status, outage_like=False)
        guard = _RateGuard(self.client.config.min_rate_bytes_per_s, self.client.config.min_rate_window_s)
        resume = status == 206 and offset > 0
        expected_overlap = await asyncio.to_thread(_read_tail, part, offset, overlap) if resume else b""
        handle = await asyncio.to_thread(open, part, "r+b" if resume else "wb")
        try:
            if resume:
                handle.seek(offset)
            written = offset if resume else 0
            pending = bytearray()
            checked = resume
            seen_overlap = bytearray()
            async for chunk in _read_chunks(response, guard, WRITE_CHUNK):
                transferred[0] += len(chunk)
                if len(seen_overlap) < len(expected_overlap):
                    take = len(expected_overlap) - len(seen_overlap)
                    seen_overlap += chunk[:take]
                    chunk = chunk[take:]
                    if len(seen_overlap) == len(expected_overlap) and seen_overlap != expected_overlap:
                        part.unlink(missing_ok=True)
                        raise TransientError(
                            "resumed bytes do not match the partial file; starting over",
                            status=206, outage_like=False, verification=True,
                        )  # fmt: skip
                    if not chunk:
                        continue
                pending += chunk
                if not checked and len(pending) >= 10:
                    self._check_fits_start(response, bytes(pending[:64]), status)
                    checked = True
                if len(pending) >= WRITE_CHUNK:
                    await asyncio.to_thread(_write_all, handle, bytes(pending))
                    written += len(pending)
                    pending.clear()
            if not checked:
                self._check_fits_start(response, bytes(pending), status)
            if pending:
                await asyncio.to_thread(_write_all, handle, bytes(pending))
                written += len(pending)
            await asyncio.to_thread(_flush_and_sync, handle)
        finally:
            await asyncio.to_thread(handle.close)
        if written != size:
            raise TransientError(f"short body: {written} of {size} bytes", status=status, outage_like=True)

    def _check_fits_start(self, response: aiohttp.ClientResponse, first: bytes, status: int) -> None:
        if first.startswith(b"SIMPLE  ="):
            return
        if _is_html(response.headers.get("Content-Type", ""), first):
            raise self._html_error()
        raise TransientError(
            "body does not start with 'SIMPLE  =': not FITS", status=status, outage_like=False, verification=True
        )

    def _finalise(self, row: dict[str, Any], part: Path, final: Path, size: int) -> None:
        """Verify the complete .part, then put it (or its compressed copy) durably in place."""
        kind = row["kind"]
        verify_fits(part, kind, expected_size=size, expected_shape=self._shape_for(row))
        if kind == "mskimg" and final.name.endswith(".fz"):
            compressed = _compressed_part(final)
            compress_mask(part, compressed)
            verify_fits(compressed, "mskimg", expected_shape=self._shape_for(row))
            _replace_durably(compressed, final)
            part.unlink()
            _fsync_dir(final.parent)
        else:
            _replace_durably(part, final)

    def _mark_on_disk(self, row: dict[str, Any], final: Path, *, status: int) -> None:
        with self.ledger.transaction() as conn:
            conn.execute("UPDATE files SET attempts = attempts + 1 WHERE id = ?", (row["id"],))
            self.ledger.set_file_state(
                conn, row["id"], "on_disk", expect=("downloading",), disk_bytes=disk_bytes(final),
                actual_size=final.stat().st_size, reserved_bytes=0, last_error=None, http_status=status, retry_at=None,
            )  # fmt: skip

    def _give_up(
        self, row: dict[str, Any], reason: str, status: int | None, *, state: str = "missing", requests: int = 0,
        count_request: bool = False, retryable: bool = True,
    ) -> FetchOutcome:  # fmt: skip
        """Record a file as missing (with a retry date while refusals remain) or corrupt; release its bytes.

        ``count_request``: the refused request was not yet counted in ``attempts`` (permanent errors).
        """
        with self.ledger.transaction() as conn:
            current = conn.execute("SELECT state FROM files WHERE id = ?", (row["id"],)).fetchone()[0]
            if current == "corrupt" and state == "missing":
                self.ledger.set_file_state(conn, row["id"], "wanted")
            refusals = conn.execute(
                "SELECT COUNT(*) FROM events WHERE kind = ? AND file_id = ?", (MISSING_EVENT, row["id"])
            ).fetchone()[0] + 1
            retry_at = None
            if state == "missing" and retryable and refusals < self.missing_max_attempts:
                retry_at = time.time() + self.missing_retry_s
            conn.execute("UPDATE files SET attempts = attempts + ? WHERE id = ?", (int(count_request), row["id"]))
            self.ledger.set_file_state(
                conn, row["id"], state, reserved_bytes=0, last_error=reason, http_status=status, retry_at=retry_at
            )
            if state == "missing":
                when = "given up" if retry_at is None else "retry after " + time.strftime(
                    "%Y-%m-%d %H:%M UTC", time.gmtime(retry_at)
                )
                self.ledger.event(
                    MISSING_EVENT, f"{row['relpath']}: {reason} ({when})", level="warning", file_id=row["id"], conn=conn
                )
        log.warning("%s: %s: %s", row["relpath"], state, reason)
        return FetchOutcome(row["id"], row["relpath"], state, requests + int(count_request), 0, reason, status)

    # --- header-only reads ------------------------------------------------------------------------

    async def read_header(self, url: str, *, count: FailureCount | None = None, on_failure: Any = None) -> tuple[bytes, int]:
        """The primary header of a remote FITS file and the bytes transferred (Range first, early close without)."""
        return await self.client.retrying(lambda: read_header_once(self.client, url), count=count, on_failure=on_failure)

    async def _fetch_header_file(self, row: dict[str, Any], final: Path) -> FetchOutcome:
        final.parent.mkdir(parents=True, exist_ok=True)
        await self._wait_for_disk(HEADER_RESERVATION)
        await self._reserve(self.ledger.file(row["id"]), HEADER_RESERVATION)
        requests = [0]
        async with self.slots:
            self._start(row)
            try:
                header_bytes, transferred = await self.read_header(
                    row["url"], on_failure=self._record_failure(row, requests=requests)
                )
                part = part_path(final)
                await asyncio.to_thread(write_header_file, header_bytes, part)
                await asyncio.to_thread(verify_fits, part, "sciimg_header")
                await asyncio.to_thread(_replace_durably, part, final)
            except TransientError as err:
                part_path(final).unlink(missing_ok=True)
                return self._give_up(self.ledger.file(row["id"]), f"gave up: {err.reason}", err.status)
            except PermanentError as err:
                return self._give_up(self.ledger.file(row["id"]), err.reason, err.status, count_request=True)
        self._mark_on_disk(row, final, status=206)
        return FetchOutcome(row["id"], row["relpath"], "on_disk", requests[0] + 1, transferred)


def html_error(client: ArchiveClient) -> TransientError:
    """The error for an HTML page where FITS was expected: an expired session when logged in."""
    if client.logged_in:
        return SessionExpired("HTML page where FITS was expected (session expired?)", outage_like=False)
    return TransientError("HTML page where FITS was expected", outage_like=False)


def record_failed_request(ledger: Ledger, file_id: int, err: ArchiveError) -> None:
    """Count one failed request for a file, with its reason and status (one transaction)."""
    with ledger.transaction() as conn:
        conn.execute(
            "UPDATE files SET attempts = attempts + 1, last_error = ?, http_status = ?, updated = ? WHERE id = ?",
            (err.reason, err.status, time.time(), file_id),
        )


def _read_tail(part: Path, offset: int, overlap: int) -> bytes:
    with open(part, "rb") as handle:
        handle.seek(offset - overlap)
        return handle.read(overlap)


def _write_all(handle: Any, data: bytes) -> None:
    try:
        handle.write(data)
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            raise DiskFull(os.strerror(err.errno)) from None
        raise


def _flush_and_sync(handle: Any) -> None:
    try:
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            raise DiskFull(os.strerror(err.errno)) from None
        raise


async def read_header_once(client: ArchiveClient, url: str) -> tuple[bytes, int]:
    """One try at reading a primary header: ask for the first blocks with Range and extend until END;
    if the server answers 200 (Range ignored), read the stream only until END and close it.

    A read that takes longer than ``archive.min_rate_window_s`` counts as stalled (a header is
    a few tens of kB). Returns (header bytes, bytes transferred). Raises TransientError/PermanentError.
    """
    window = client.config.min_rate_window_s if client.config.min_rate_bytes_per_s > 0 else None
    try:
        async with asyncio.timeout(window):
            return await _read_header(client, url)
    except TimeoutError:
        raise TransientError(f"stalled: no complete header within {window:.0f} s", outage_like=True) from None


async def _read_header(client: ArchiveClient, url: str) -> tuple[bytes, int]:
    buffer = bytearray()
    transferred = 0
    want = HEADER_FIRST_BLOCKS * BLOCK
    try:
        while True:
            headers = {"Range": f"bytes={len(buffer)}-{want - 1}"}
            async with client.session.get(url, headers=headers, allow_redirects=True) as response:
                if response.status not in (200, 206):
                    raise classify_status(response.status, response.reason or "", response.headers)
                content_type = response.headers.get("Content-Type", "")
                if response.status == 206:
                    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
                    if not match or int(match[1]) != len(buffer):
                        raise TransientError("206 with an unexpected Content-Range", status=206, outage_like=False)
                    body = await response.read()
                    transferred += len(body)
                    if not buffer and _is_html(content_type, body):
                        raise html_error(client)
                    buffer += body
                    end = header_end(buffer)
                    if end is not None:
                        return _checked_header(bytes(buffer[:end])), transferred
                    total = None if match[3] == "*" else int(match[3])
                    if (total is not None and len(buffer) >= total) or len(body) < want - (len(buffer) - len(body)):
                        raise TransientError("the file ends before the END card of its header", outage_like=False)
                    want = min(want * 2, HEADER_MAX_BYTES)
                    if len(buffer) >= HEADER_MAX_BYTES:
                        raise TransientError("no END card in the first blocks", outage_like=False)
                    continue
                # 200: the server ignored Range; read only until END and drop the connection.
                buffer.clear()
                while True:
                    chunk = await response.content.read(BLOCK * 4)
                    if not chunk:
                        raise TransientError("the body ends before the END card of its header", outage_like=True)
                    transferred += len(chunk)
                    if not buffer and _is_html(content_type, chunk):
                        raise html_error(client)
                    buffer += chunk
                    end = header_end(buffer)
                    if end is not None:
                        response.close()
                        return _checked_header(bytes(buffer[:end])), transferred
                    if len(buffer) >= HEADER_MAX_BYTES:
                        response.close()
                        raise TransientError("no END card in the first blocks", outage_like=False)
    except ArchiveError:
        raise
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
        raise transient_from_exception(err, client.credentials) from None


def _checked_header(header: bytes) -> bytes:
    if not header.startswith(b"SIMPLE  ="):
        raise TransientError("header does not start with 'SIMPLE  =': not FITS", outage_like=False, verification=True)
    return header


async def read_primary_header(
    client: ArchiveClient, url: str, *, on_failure: Callable[[TransientError, FailureCount], None] | None = None
) -> fits.Header:
    """The primary header of a remote FITS file (header-only read, retried), e.g. for ``ILUM_LED``."""
    header_bytes, _ = await client.retrying(lambda: read_header_once(client, url), on_failure=on_failure)
    return fits.Header.fromstring(header_bytes.decode("ascii"))
