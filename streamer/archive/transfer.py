"""Transfers from the archive: one URL to one path, streamed, resumed, verified and renamed durably.

This module knows no ledger. :func:`download` takes a URL, a destination and what the file
must be (kind, size, image shape) and either leaves a verified file at the destination or
raises: :class:`DiskFull` (the ``.part`` is kept for a resume), ``TransientError`` once the
client's retries are used up (``verification`` set when the body failed verification every
time) or ``PermanentError`` (404, 403, ...). :func:`head_size` asks for a file's size and
:func:`download_header` stores a remote image's primary header. The bookkeeping around a
transfer (reservations, states, attempts) is :mod:`streamer.service.fetcher`.

The way of one file::

    stream to <final>.part (Range resume on 206 after re-reading an overlap, restart on 200)
      --> verify (structure, size, checksums) --> fsync, rename, fsync dir

Kinds: ``raw`` and ``sciimg`` are stored as served; ``mskimg`` is verified as served, then
stored tile-compressed (lossless) at its relpath (``..._mskimg.fits.fz``); ``sciimg_header`` is
a header-only read of the sciimg URL stored as a header-only FITS file
(``..._sciimg.header.fits``, read it back with :func:`read_stored_header`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import aiohttp
import numpy as np
from astropy.io import fits

from streamer.archive.client import (
    ArchiveClient,
    ArchiveError,
    FailureCount,
    SessionExpired,
    TransientError,
    check_identity_encoding,
    classify_status,
    transient_from_exception,
)
from streamer.archive.verify import BLOCK, VerificationError, header_end, verify_fits
from streamer.crashpoints import crash_point
from streamer.storage.atomic import fsync_directory
from streamer.storage.nofollow import UnsafePathError

log = logging.getLogger(__name__)

ALLOC_UNIT: Final = 4096
RESERVE_SLACK: Final = 2 * ALLOC_UNIT
HEADER_RESERVATION: Final = 128 * 1024
WRITE_CHUNK: Final = 1 << 20
# rows per tile of a stored mask: astropy's writer and reader pay per tile in Python (one-row tiles: 3x the CPU)
MASK_TILE_ROWS: Final = 64
HEADER_FIRST_BLOCKS: Final = 10
RESUME_OVERLAP: Final = 4 * 2880
HEADER_MAX_BYTES: Final = 2880 * 2000
#: The largest size the archive may announce for one file (a ZTF raw CCD file is about 30 MB):
#: a larger HEAD answer is refused as invalid rather than reserved against the budget.
MAX_FILE_BYTES: Final = 4 * 2**30
DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DiskFull(Exception):
    """The filesystem refused a write (ENOSPC, EDQUOT) or has too little free space."""



def allocation_for(n_bytes: int) -> int:
    """Bytes to reserve for a file of ``n_bytes``: rounded up to 4096, plus slack for metadata blocks."""
    return -(-n_bytes // ALLOC_UNIT) * ALLOC_UNIT + RESERVE_SLACK


def part_path(final: Path) -> Path:
    """Where a download streams before it is complete: ``<final>.part``."""
    return final.with_name(final.name + ".part")


def _compressed_part(final: Path) -> Path:
    return final.with_name(final.name + ".zpart")


_PART_FLAGS: Final = os.O_NOFOLLOW | os.O_CLOEXEC


def part_size(part: Path) -> int:
    """Bytes already in a ``.part`` (0 when there is none); UnsafePathError if it is a symlink."""
    try:
        info = os.lstat(part)
    except FileNotFoundError:
        return 0
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePathError(f"{part.name}: the partial file is a symlink; refusing to write through it")
    return info.st_size


def open_part(part: Path, *, resume: bool) -> BinaryIO:
    """Open a ``.part`` for writing without following a symlink: resumed in place, or made anew (O_EXCL)."""
    if resume:
        flags = os.O_RDWR
    else:
        clear_part(part)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(part, flags | _PART_FLAGS, 0o644)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EEXIST):
            raise UnsafePathError(f"{part.name}: the partial file is a symlink or was planted; refusing to write it") from None
        raise
    return os.fdopen(fd, "r+b" if resume else "wb")


def clear_part(part: Path) -> None:
    """Remove a ``.part`` before it is written anew; UnsafePathError if it is a symlink (left for reconcile)."""
    part_size(part)
    part.unlink(missing_ok=True)


def disk_bytes(path: Path) -> int:
    """Bytes a file occupies on disk (allocated blocks)."""
    return os.stat(path).st_blocks * 512


def replace_durably(source: Path, final: Path) -> None:
    """fsync ``source``, rename it to ``final`` and fsync the directory."""
    with open(source, "rb+") as handle:
        os.fsync(handle.fileno())
    crash_point("rename", final.name)
    os.replace(source, final)
    fsync_directory(final.parent)
    crash_point("renamed", final.name)


def compress_mask(source: Path, target: Path) -> None:
    """Write an int16 mask image as a losslessly tile-compressed FITS file (RICE_1 on integers is exact)."""
    with fits.open(source, memmap=False) as hdul:
        index = next(i for i, h in enumerate(hdul) if h.data is not None)
        data = np.asarray(hdul[index].data)
        header = hdul[index].header.copy()
    for key in ("SIMPLE", "EXTEND", "CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True)
    tiles = (min(MASK_TILE_ROWS, data.shape[0]), data.shape[1])  # a verified mask: one 2-d int16 image
    compressed = fits.CompImageHDU(data=data, header=header, compression_type="RICE_1", tile_shape=tiles)
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
    dims: list[int] = []
    while f"ONAXIS{len(dims) + 1}" in header:
        dims.append(int(header[f"ONAXIS{len(dims) + 1}"]))
    if dims:
        header["NAXIS"] = len(dims)
        position = header.index("NAXIS")
        for i, dim in enumerate(dims, start=1):
            header.insert(position + i, (f"NAXIS{i}", dim))
    return header



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


async def _read_chunks(response: aiohttp.ClientResponse, guard: _RateGuard) -> AsyncIterator[bytes]:
    """The body in the pieces it arrived in (``readchunk``: no joining copy, unlike ``read``),
    raising TransientError when the rate guard trips (also while nothing arrives)."""
    while True:
        left = guard.time_left()
        try:
            if left is None:
                chunk, http_chunk_end = await response.content.readchunk()
            else:
                async with asyncio.timeout(left + 0.001):
                    chunk, http_chunk_end = await response.content.readchunk()
        except TimeoutError:
            guard.check()
            continue
        if not chunk:
            if http_chunk_end:  # the end of one chunk of a chunked body, not of the body
                continue
            return
        guard.add(len(chunk))
        yield chunk


def _is_html(content_type: str, first: bytes) -> bool:
    head = first[:64].lstrip().lower()
    return "html" in content_type.lower() or head.startswith((b"<!doctype", b"<html", b"<?xml", b"<"))


@dataclass
class TransferCounts:
    """What one transfer has cost so far: GET requests sent and body bytes received (kept on failure too)."""

    requests: int = 0
    bytes_transferred: int = 0


#: Called after each failed request of a transfer (before it is retried).
OnFailure = Callable[[TransientError, FailureCount], None]


def reservation_for(kind: str, size: int) -> int:
    """Bytes a download of ``size`` bytes needs on disk: a mask's compressed copy sits beside its .part."""
    reservation = allocation_for(size)
    if kind == "mskimg":
        reservation += allocation_for(size)
    return reservation


def verify_in_place(final: Path, kind: str, *, expected_size: int | None, shape: tuple[int, int] | None) -> bool:
    """Whether a file already at ``final`` is complete; one that is not is removed (blocking: run in a thread)."""
    as_served = kind in ("raw", "sciimg")
    try:
        verify_fits(final, kind, expected_size=expected_size if as_served else None, expected_shape=shape)
    except (VerificationError, OSError) as err:
        log.warning("%s: existing file fails verification (%s); downloading again", final.name, err)
        final.unlink(missing_ok=True)
        return False
    return True


def checked_size(length: int | None) -> int:
    """A size announced by the archive, if usable; TransientError for none, 0 or more than MAX_FILE_BYTES."""
    if length is None or length <= 0:
        shown = "no Content-Length" if length is None else "Content-Length 0"
        raise TransientError(f"HEAD with {shown}: the file's size is unknown", outage_like=False)
    if length > MAX_FILE_BYTES:
        raise TransientError(
            f"HEAD announces {length} bytes, more than the {MAX_FILE_BYTES} bytes a file may have: an invalid answer",
            outage_like=False,
        )
    return length


async def head_size(client: ArchiveClient, url: str, *, count: FailureCount | None = None, on_failure: OnFailure | None = None) -> int:
    """The size of a remote file from a HEAD request (retried like any request)."""

    async def head() -> int:
        try:
            async with client.session.head(url, allow_redirects=True) as response:
                if response.status != 200:
                    raise classify_status(response.status, response.reason or "", response.headers)
                check_identity_encoding(response.headers)
                if _is_html(response.headers.get("Content-Type", ""), b""):
                    raise html_error(client)
                length = response.content_length
        except ArchiveError:
            raise
        except (aiohttp.ClientError, TimeoutError) as err:
            raise transient_from_exception(err, client.credentials) from None
        return checked_size(length)

    return await client.retrying(head, count=count, on_failure=on_failure)


async def download(
    client: ArchiveClient, url: str, final: Path, *, kind: str, size: int, shape: tuple[int, int] | None = None,
    counts: TransferCounts, count: FailureCount, on_failure: OnFailure | None = None,
) -> None:  # fmt: skip
    """Download ``url`` to ``final``: stream into ``<final>.part`` (resumed with Range), verify, fsync, rename.

    Retried by the client's policy; ``counts`` tells what it cost, also when it fails. Raises DiskFull (the .part is kept for a resume), TransientError once attempts are used up
    (``verification`` set when the body failed verification), or PermanentError.
    """
    await client.retrying(
        lambda: _attempt(client, url, final, kind=kind, size=size, shape=shape, counts=counts),
        count=count, on_failure=on_failure,
    )  # fmt: skip


async def download_header(client: ArchiveClient, url: str, final: Path, *, on_failure: OnFailure | None = None) -> int:
    """Store the primary header of a remote image at ``final`` as a header-only FITS file; return bytes transferred."""
    header_bytes, transferred = await client.retrying(lambda: read_header_once(client, url), on_failure=on_failure)
    part = part_path(final)
    await asyncio.to_thread(clear_part, part)
    try:
        await asyncio.to_thread(write_header_file, header_bytes, part)
        await asyncio.to_thread(verify_fits, part, "sciimg_header")
        await asyncio.to_thread(replace_durably, part, final)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return transferred


async def _attempt(
    client: ArchiveClient, url: str, final: Path, *, kind: str, size: int, shape: tuple[int, int] | None,
    counts: TransferCounts,
) -> None:  # fmt: skip
    """One GET: stream into the .part (resuming it when the server honours Range), verify, finalise."""
    part = part_path(final)
    offset = part_size(part)
    if offset >= size:
        part.unlink()
        offset = 0
    # A resume asks again for the last bytes it has and checks they match, so that a changed
    # file or a bad continuation is caught where the structural check could not see it.
    overlap = min(offset, RESUME_OVERLAP)
    headers = {"Range": f"bytes={offset - overlap}-"} if offset else {}
    counts.requests += 1
    try:
        async with client.session.get(url, headers=headers, allow_redirects=True) as response:
            await _stream(client, response, part, offset, overlap, size, counts)
    except (ArchiveError, DiskFull):
        raise
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
        raise transient_from_exception(err, client.credentials) from None
    try:
        await asyncio.to_thread(_finalise, kind, shape, part, final, size)
    except VerificationError as err:
        part.unlink(missing_ok=True)
        raise TransientError(f"verification failed: {err}", outage_like=False, verification=True) from None
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            raise DiskFull(os.strerror(err.errno)) from None
        raise


async def _stream(
    client: ArchiveClient, response: aiohttp.ClientResponse, part: Path, offset: int, overlap: int, size: int,
    counts: TransferCounts,
) -> None:  # fmt: skip
    """Write the body to ``part``: from ``offset`` on a 206 (after checking ``overlap`` bytes), else from 0."""
    status = response.status
    if status == 416:
        part.unlink(missing_ok=True)
        raise TransientError("HTTP 416: the partial file does not match; starting over", status=416, outage_like=False)
    if status not in (200, 206):
        raise classify_status(status, response.reason or "", response.headers)
    check_identity_encoding(response.headers)
    if "html" in response.headers.get("Content-Type", "").lower():
        raise html_error(client)
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
    guard = _RateGuard(client.config.min_rate_bytes_per_s, client.config.min_rate_window_s)
    resume = status == 206 and offset > 0
    expected_overlap = await asyncio.to_thread(_read_tail, part, offset, overlap) if resume else b""
    handle = await asyncio.to_thread(open_part, part, resume=resume)
    try:
        if resume:
            handle.seek(offset)
        written = offset if resume else 0
        pending = bytearray()
        checked = resume
        seen_overlap = bytearray()
        async for chunk in _read_chunks(response, guard):
            counts.bytes_transferred += len(chunk)
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
                _check_fits_start(client, response, bytes(pending[:64]), status)
                checked = True
            if len(pending) >= WRITE_CHUNK:
                await asyncio.to_thread(_write_all, handle, pending)  # not copied: nothing touches it meanwhile
                written += len(pending)
                pending.clear()
        if not checked:
            _check_fits_start(client, response, bytes(pending), status)
        if pending:
            await asyncio.to_thread(_write_all, handle, pending)
            written += len(pending)
        await asyncio.to_thread(_flush_and_sync, handle)
    finally:
        await asyncio.to_thread(handle.close)
    if written != size:
        raise TransientError(f"short body: {written} of {size} bytes", status=status, outage_like=True)

def _check_fits_start(client: ArchiveClient, response: aiohttp.ClientResponse, first: bytes, status: int) -> None:
    if first.startswith(b"SIMPLE  ="):
        return
    if _is_html(response.headers.get("Content-Type", ""), first):
        raise html_error(client)
    raise TransientError(
        "body does not start with 'SIMPLE  =': not FITS", status=status, outage_like=False, verification=True
    )

def _finalise(kind: str, shape: tuple[int, int] | None, part: Path, final: Path, size: int) -> None:
    """Verify the complete .part, then put it (or its compressed copy) durably in place."""
    verify_fits(part, kind, expected_size=size, expected_shape=shape)
    if kind == "mskimg" and final.name.endswith(".fz"):
        compressed = _compressed_part(final)
        clear_part(compressed)
        compress_mask(part, compressed)
        verify_fits(compressed, "mskimg", expected_shape=shape)
        replace_durably(compressed, final)
        part.unlink()
        fsync_directory(final.parent)
    else:
        replace_durably(part, final)


def html_error(client: ArchiveClient) -> TransientError:
    """The error for an HTML page where FITS was expected: an expired session when logged in."""
    if client.logged_in:
        return SessionExpired("HTML page where FITS was expected (session expired?)", outage_like=False)
    return TransientError("HTML page where FITS was expected", outage_like=False)



def _read_tail(part: Path, offset: int, overlap: int) -> bytes:
    fd = os.open(part, os.O_RDONLY | _PART_FLAGS)
    try:
        return os.pread(fd, overlap, offset - overlap)
    finally:
        os.close(fd)


def _write_all(handle: Any, data: bytes | bytearray) -> None:
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
                check_identity_encoding(response.headers)
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
