"""An IRSA-like HTTP server for a directory laid out like ``/ibe/data/ztf/products/`` (aiohttp).

Endpoints:

- ``GET /ibe/search/ztf/products/{raw,sci,cal}?WHERE=..&COLUMNS=..&ct=csv``: rows from
  ``streamer.sim.index`` (built once at start), filtered by ``streamer.sim.wherequery``; all columns
  when ``COLUMNS`` is absent; CSV also when ``ct`` is absent; errors (malformed WHERE, unknown column,
  another ``ct``, ``POS``/``SIZE`` which are not implemented) answer status 400 with an XML (VOTable) body.
- ``GET|HEAD /ibe/data/ztf/products/<relpath>``: the file, with Content-Length and Accept-Ranges; a
  single ``Range: bytes=a-b`` answers 206 with Content-Range (200 when the profile ignores Range).
  Paths escaping the root (``..``, encoded slashes or backslashes, symlinks pointing out) answer 403.
- ``GET|POST /account/signon/login.do?josso_cmd=login&josso_username=..&josso_password=..``: JOSSO;
  success sets a ``JOSSO_SESSIONID`` cookie, wrong credentials answer 200 without one. With
  ``require_login``, a data request without a valid cookie gets an HTML login page with status 200.
- ``GET /_sim/faults``: JSON ``{"total", "by_kind", "by_path", "requests", "attempts_by_path"}``,
  the exact counts of injected faults (see ``streamer.sim.faults``); keys of ``by_path`` are the
  request path, plus ``?`` and the query string for searches.

Python API for tests::

    async with serve(root, faults="flaky", fault_seed=1) as server:
        server.base_url        # 'http://127.0.0.1:PORT'
        server.faults()        # the /_sim/faults snapshot
    with serve_in_thread(root) as server: ...   # the same, for synchronous code

The command ``streamer sim serve`` (:func:`main`) prints ``serving http://HOST:PORT`` on stdout when
ready, logs on stderr (one line per injected fault), and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import io
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote
from xml.sax.saxutils import escape

from aiohttp import web

from streamer import clock
from streamer.errors import UsageError
from streamer.sim.faults import FaultCounter, FaultProfile, choose_fault, load_profile, uniform
from streamer.sim.index import COLUMNS, ArchiveIndex
from streamer.sim.wherequery import QueryError, compile_where
from streamer.storage.naming import DATA_PATH, SEARCH_PATH

log = logging.getLogger(__name__)

CHUNK_BYTES: Final = 1 << 20
FITS_BLOCK: Final = 2880
LOGIN_PATH: Final = "/account/signon/login.do"
SESSION_COOKIE: Final = "JOSSO_SESSIONID"
LOGIN_PAGE: Final = (
    "<!DOCTYPE html><html><head><title>IRSA Login</title></head><body>"
    "<form action=\"/account/signon/login.do\" method=\"post\"><input type=\"hidden\" name=\"josso_cmd\" value=\"login\">"
    "<input name=\"josso_username\"><input name=\"josso_password\" type=\"password\"></form></body></html>"
)
ERROR_PAGE: Final = "<!DOCTYPE html><html><head><title>{status}</title></head><body><h1>{status}</h1><p>{message}</p></body></html>"


@dataclass(frozen=True)
class ServerSettings:
    root: Path
    faults: FaultProfile = field(default_factory=FaultProfile)
    fault_seed: int = 0
    require_login: bool = False
    username: str = "ztfuser"
    password: str | None = None
    arrival: bool = False  # a row is searchable once the streamer clock reaches it (see :func:`arrived`)


def xml_error_body(message: str) -> bytes:
    """An IRSA-style (VOTable) error document."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<VOTABLE version="1.3" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
        '<RESOURCE type="results">\n'
        f'<INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO>\n'
        "</RESOURCE>\n</VOTABLE>\n"
    ).encode()


def html_page(status: int, message: str, *, reason: str | None = None) -> web.Response:
    return web.Response(status=status, text=ERROR_PAGE.format(status=reason or status, message=escape(message)), content_type="text/html")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``(start, end_inclusive)`` of a single byte range, None to serve everything, 'invalid' for 416."""
    if not header:
        return None
    units, _, spec = header.partition("=")
    if units.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                return "invalid"
            return max(0, size - length), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "invalid"
    return start, min(end, size - 1)


def _corruption_offset(path: Path, choice: float) -> int:
    """Offset of a header byte whose change a FITS reader notices: the S of SIMPLE, or the X of the
    first extension's XTENSION card (files without an extension always get the first)."""
    if choice < 0.5:
        return 0
    with path.open("rb") as handle:
        offset = 0
        while block := handle.read(FITS_BLOCK):
            offset += len(block)
            if len(block) < FITS_BLOCK:
                return 0
            cards = [block[i:i + 80] for i in range(0, FITS_BLOCK, 80)]
            if any(card.rstrip() == b"END" for card in cards):
                return offset if handle.read(8) == b"XTENSION" else 0
    return 0


CORRUPT_BYTE: Final = ord("#")


class SimArchive:
    """The application: index, sessions, fault counters."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.root = settings.root.resolve()
        self.index = ArchiveIndex.build(self.root)
        self.counter = FaultCounter()
        self.sessions: set[str] = set()
        self.stopping = asyncio.Event()
        log.info(
            "indexed %s: %d raw, %d sci, %d cal rows; faults %s (seed %d)",
            self.root, *(len(self.index.tables[t]) for t in ("raw", "sci", "cal")),
            settings.faults.name, settings.fault_seed,
        )

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_get(SEARCH_PATH + "{table}", self.search)
        app.router.add_route("GET", DATA_PATH + "{relpath:.*}", self.data)
        app.router.add_route("HEAD", DATA_PATH + "{relpath:.*}", self.data)
        app.router.add_route("GET", LOGIN_PATH, self.login)
        app.router.add_route("POST", LOGIN_PATH, self.login)
        app.router.add_get("/_sim/faults", self.fault_counts)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.stopping.set()

    # ------------------------------------------------------------------ endpoints

    async def fault_counts(self, _request: web.Request) -> web.Response:
        return web.json_response(self.counter.snapshot())

    async def login(self, request: web.Request) -> web.Response:
        values: dict[str, str] = dict(request.query)
        if request.method == "POST":
            values.update({k: str(v) for k, v in (await request.post()).items()})
        command = values.get("josso_cmd", "login")
        if command == "logout":
            self.sessions.discard(request.cookies.get(SESSION_COOKIE, ""))
            return web.Response(text="<html><body>Logged out</body></html>", content_type="text/html")
        ok = (
            self.settings.password is not None
            and secrets.compare_digest(values.get("josso_username", ""), self.settings.username)
            and secrets.compare_digest(values.get("josso_password", ""), self.settings.password)
        )
        if not ok:
            log.info("login refused for %r", values.get("josso_username", ""))
            return web.Response(text=LOGIN_PAGE, content_type="text/html")
        token = secrets.token_hex(16)
        self.sessions.add(token)
        response = web.Response(text="<html><body>Login successful</body></html>", content_type="text/html")
        response.set_cookie(SESSION_COOKIE, token, path="/", httponly=True)
        return response

    async def search(self, request: web.Request) -> web.StreamResponse:
        key = f"{request.path}?{request.query_string}" if request.query_string else request.path
        attempt = self.counter.next_attempt(key)
        status, content_type, body = self._search_answer(request)
        fault = self._decide(key, attempt, is_data=False, is_fits=False, is_head=False)
        return await self._send(request, fault, body=body, content_type=content_type, path=None, start=0, end=len(body) - 1, status=status)

    def _search_answer(self, request: web.Request) -> tuple[int, str, bytes]:
        """``(status, content type, body)``: the CSV rows, or an XML error."""
        table = request.match_info["table"]
        if table not in COLUMNS:
            return 404, "text/xml", xml_error_body(f"table {table!r} does not exist: expected raw, sci or cal")
        query = {k.upper(): v for k, v in request.query.items()}
        if "POS" in query or "SIZE" in query:
            return 400, "text/xml", xml_error_body("POS and SIZE are not supported by this archive: select with WHERE")
        ct = query.get("CT", "csv").lower()
        if ct != "csv":
            return 400, "text/xml", xml_error_body(f"ct={ct!r} is not supported: expected ct=csv")
        try:
            chosen = _columns(query.get("COLUMNS"), COLUMNS[table])
            where = compile_where(query["WHERE"], set(COLUMNS[table])) if query.get("WHERE", "").strip() else None
            rows = [row for row in self.index.tables[table] if where is None or where(row)]
            if self.settings.arrival:
                now_jd = clock.now() / 86400.0 + UNIX_EPOCH_JD
                rows = [row for row in rows if arrived(table, row, now_jd)]
        except QueryError as err:
            return 400, "text/xml", xml_error_body(f"invalid query: {err}")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(chosen)
        for row in rows:
            writer.writerow(["" if row[c] is None else row[c] for c in chosen])
        return 200, "text/csv", text.getvalue().encode()

    async def data(self, request: web.Request) -> web.StreamResponse:
        relpath = self._safe_relpath(request)
        if relpath is None:
            log.warning("refused path %s", request.raw_path)
            return html_page(403, "Forbidden", reason="403 Forbidden")
        attempt = self.counter.next_attempt(request.path)
        if self.settings.require_login and request.cookies.get(SESSION_COOKIE) not in self.sessions:
            return web.Response(text=LOGIN_PAGE, content_type="text/html")
        path = self.root / relpath
        if not path.is_file():
            return html_page(404, "File not found", reason="404 Not Found")
        if not path.resolve().is_relative_to(self.root):
            log.warning("refused path %s (leaves the root)", request.path)
            return html_page(403, "Forbidden", reason="403 Forbidden")
        size = path.stat().st_size
        byte_range = None if self.settings.faults.ignore_range else _parse_range(request.headers.get("Range"), size)
        if byte_range == "invalid":
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        is_head = request.method == "HEAD"
        fault = self._decide(request.path, attempt, is_data=True, is_fits=".fits" in relpath, is_head=is_head)
        if fault == "missing":
            return html_page(404, "File not found", reason="404 Not Found")
        start, end = byte_range if isinstance(byte_range, tuple) else (0, size - 1)
        status = 206 if isinstance(byte_range, tuple) else 200
        return await self._send(request, fault, body=None, content_type="application/fits", path=path, start=start, end=end, status=status, size=size)

    # ------------------------------------------------------------------ helpers

    def _safe_relpath(self, request: web.Request) -> str | None:
        raw = request.raw_path.split("?", 1)[0]
        if not raw.startswith(DATA_PATH):
            return None
        segments = raw[len(DATA_PATH):].split("/")
        decoded = []
        for segment in segments:
            text = unquote(segment)
            if text in ("", ".", "..") or any(c in text for c in "/\\\x00"):
                return None
            decoded.append(text)
        return "/".join(decoded)

    def _decide(self, key: str, attempt: int, *, is_data: bool, is_fits: bool, is_head: bool) -> str | None:
        """The fault for this attempt, recorded and logged when there is one (it is always delivered)."""
        fault = choose_fault(self.settings.faults, self.settings.fault_seed, key, attempt, is_data=is_data, is_fits=is_fits, is_head=is_head)
        if fault is not None:
            self.counter.record(key, fault)
            log.info("fault %s on %s (attempt %d)", fault, key, attempt)
        return fault

    def _status_fault(self, fault: str) -> web.Response:
        if fault == "html":
            return web.Response(text=LOGIN_PAGE, content_type="text/html")
        status = int(fault.removeprefix("http_"))
        headers = {"Retry-After": "1"} if status == 429 else {}
        reasons = {500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout", 429: "Too Many Requests"}
        response = html_page(status, reasons[status], reason=f"{status} {reasons[status]}")
        response.headers.update(headers)
        return response

    async def _send(
        self, request: web.Request, fault: str | None, *, body: bytes | None, content_type: str,
        path: Path | None, start: int, end: int, status: int, size: int | None = None,
    ) -> web.StreamResponse:
        if fault in ("http_500", "http_503", "http_504", "http_429", "html"):
            return self._status_fault(fault)
        length = end - start + 1
        response = web.StreamResponse(status=status)
        response.content_type = content_type
        response.content_length = length
        if path is not None and not self.settings.faults.ignore_range:
            response.headers["Accept-Ranges"] = "bytes"
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if fault in ("truncated", "reset"):
            response.force_close()
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response

        corrupt_at = None
        if fault == "corrupt" and path is not None:
            offset = _corruption_offset(path, uniform(self.settings.fault_seed, "corrupt-at", request.path))
            corrupt_at = offset if start <= offset <= end else start
        cut = max(0, length // 2 - 1) if fault in ("truncated", "reset") else length
        if fault == "stall":
            cut = max(0, min(length - 1, 1024))
        sent = 0
        drip_until = asyncio.get_running_loop().time() + self.settings.faults.drip_max_seconds
        for chunk in _chunks(body, path, start, length):
            if corrupt_at is not None and sent <= corrupt_at - start < sent + len(chunk):
                damaged = bytearray(chunk)
                damaged[corrupt_at - start - sent] = CORRUPT_BYTE
                chunk = bytes(damaged)
            if sent + len(chunk) > cut:
                chunk = chunk[: cut - sent]
            if fault == "drip":
                await self._drip(response, chunk, drip_until)
            elif chunk:
                await response.write(chunk)
            sent += len(chunk)
            if sent >= cut:
                break
        if fault == "stall":
            await self.stopping.wait()
            _reset(request)
            return response
        if fault == "reset":
            _reset(request)
            return response
        await response.write_eof()
        return response

    async def _drip(self, response: web.StreamResponse, chunk: bytes, until: float) -> None:
        """Write ``chunk`` at the profile's drip rate until the loop time ``until``, then at once."""
        rate = self.settings.faults.drip_bytes_per_second
        step = max(1, rate // 20)
        loop = asyncio.get_running_loop()
        offset = 0
        while offset < len(chunk) and loop.time() < until:
            await response.write(chunk[offset:offset + step])
            offset += step
            await asyncio.sleep(step / rate)
        if offset < len(chunk):
            await response.write(chunk[offset:])


def _chunks(body: bytes | None, path: Path | None, start: int, length: int) -> Iterator[bytes]:
    if body is not None:
        for offset in range(start, start + length, CHUNK_BYTES):
            yield body[offset:min(offset + CHUNK_BYTES, start + length)]
        return
    assert path is not None
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


def _reset(request: web.Request) -> None:
    """Abort the connection with a TCP reset."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _columns(requested: str | None, available: tuple[str, ...]) -> list[str]:
    if requested is None or not requested.strip():
        return list(available)
    chosen = [c.strip().lower() for c in requested.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise QueryError(f"column {unknown[0]!r} does not exist")
    return chosen


# ---------------------------------------------------------------------- running it


UNIX_EPOCH_JD: Final = 2440587.5


def arrived(table: str, row: dict[str, Any], now_jd: float) -> bool:
    """Whether IRSA has a row at ``now_jd``: an exposure (raw, sci) from its ``obsjd``, an IPAC calibration
    product from the end of its night (midnight UTC after ``nightdate``)."""
    if table == "cal":
        night = dt.date.fromisoformat(str(row["nightdate"]))
        return (night - dt.date(1970, 1, 1)).days + 1 + UNIX_EPOCH_JD <= now_jd
    return float(row["obsjd"]) <= now_jd


@dataclass
class RunningServer:
    """A server started by :func:`serve`: its URL and its fault counters."""

    base_url: str
    port: int
    archive: SimArchive

    def faults(self) -> dict[str, Any]:
        """The exact counts of injected faults (what ``/_sim/faults`` answers)."""
        return self.archive.counter.snapshot()


def _settings(
    root: Path, faults: str | FaultProfile, fault_seed: int, require_login: bool, username: str, password: str | None,
    arrival: bool = False,
) -> ServerSettings:
    if not Path(root).is_dir():
        raise UsageError(f"--root {root}: expected an existing directory")
    profile = faults if isinstance(faults, FaultProfile) else load_profile(faults)
    return ServerSettings(Path(root), profile, fault_seed, require_login, username, password, arrival)


@contextlib.asynccontextmanager
async def serve(
    root: Path,
    *,
    faults: str | FaultProfile = "none",
    fault_seed: int = 0,
    require_login: bool = False,
    username: str = "ztfuser",
    password: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    arrival: bool = False,
) -> AsyncIterator[RunningServer]:
    """Run the server in this event loop for the duration of the block."""
    archive = SimArchive(_settings(root, faults, fault_seed, require_login, username, password, arrival))
    runner = web.AppRunner(archive.application(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
        bound = runner.addresses[0]
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        yield RunningServer(f"http://{url_host}:{bound[1]}", int(bound[1]), archive)
    finally:
        archive.stopping.set()
        await runner.cleanup()


@contextlib.contextmanager
def serve_in_thread(root: Path, **options: Any) -> Iterator[RunningServer]:
    """:func:`serve` in an event loop of its own thread, for synchronous callers."""
    ready: threading.Event = threading.Event()
    state: dict[str, Any] = {}

    async def run() -> None:
        try:
            async with serve(root, **options) as server:
                state["server"] = server
                state["stop"] = asyncio.Event()
                state["loop"] = asyncio.get_running_loop()
                ready.set()
                await state["stop"].wait()
        except Exception as err:  # handed to the caller's thread below
            state["error"] = err
            ready.set()

    thread = threading.Thread(target=lambda: asyncio.run(run()), name="sim-server", daemon=True)
    thread.start()
    ready.wait()
    if "error" in state:
        thread.join()
        raise state["error"]
    try:
        yield state["server"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(timeout=10)


def main(args: argparse.Namespace) -> int:
    """``streamer sim serve``: serve until SIGTERM or SIGINT."""
    password = os.environ.get(args.password_env) or None
    if args.require_login and password is None:
        raise UsageError(f"--require-login: set the accepted password in ${args.password_env}")
    if args.port < 0 or args.port > 65535:
        raise UsageError(f"--port {args.port}: expected 0..65535")
    settings_args = (Path(args.root), args.faults, args.fault_seed, args.require_login, args.username, password, args.arrival)
    _settings(*settings_args)  # usage errors before logging starts
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve_until_signal(args.host, args.port, settings_args))


async def _serve_until_signal(host: str, port: int, settings_args: tuple[Any, ...]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    root, faults, fault_seed, require_login, username, password, arrival = settings_args
    async with serve(
        root, faults=faults, fault_seed=fault_seed, require_login=require_login, username=username, password=password,
        host=host, port=port, arrival=arrival,
    ) as server:  # fmt: skip
        print(f"serving {server.base_url}", flush=True)
        await stop.wait()
        log.info("stopping; faults injected: %s", server.faults()["by_kind"])
    return 0
