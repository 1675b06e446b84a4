"""The archive connection: one aiohttp session, the retry policy, outage detection and the login.

Every request to IRSA (search, HEAD, data, header reads) goes through
:meth:`ArchiveClient.retrying`: transient failures (5xx, 429, resets,
timeouts, short bodies, failed verification, an HTML page where FITS was
expected) are retried with exponential backoff and full jitter, honouring
``Retry-After``; permanent ones (404, 403, 410, other 4xx) are raised at once.
When most recent requests fail, the archive is taken to be down: every request
waits behind :class:`OutageGate` with a growing delay, and failures during an
outage do not use up a file's attempts.

Bounds on waiting: one retry waits at most ``MAX_RETRY_AFTER_S`` however long a
``Retry-After`` asks; :meth:`ArchiveClient.bound_waiting` (a backfill sets
``BURST_MAX_WAIT_PER_OPERATION_S`` and ``BURST_MAX_OUTAGE_S``) bounds the retries and pauses
one operation waits for, and how long of one outage is waited out before requests fail at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from streamer import clock
from streamer.archive.auth import Credentials, login, safe_error_text, session_cookie
from streamer.config import ArchiveConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_BUFSIZE: Final = 1 << 20
#: During an outage an operation gives up only after this many times its usual attempts.
OUTAGE_ATTEMPTS_FACTOR: Final = 5
PERMANENT_STATUSES: Final = frozenset({400, 401, 403, 404, 405, 410, 414, 451})
#: Sent with every request: bodies are stored and verified as served, never decompressed on the way.
REQUEST_HEADERS: Final = {"Accept-Encoding": "identity"}
#: The longest wait a ``Retry-After`` can ask for before one retry (a year is read as this).
MAX_RETRY_AFTER_S: Final = 300.0
#: Seconds a backfill (burst) lets one operation (a search, a HEAD, a download) wait for its retries and
#: outage pauses; once used up, it fails with its last error instead of waiting more.
BURST_MAX_WAIT_PER_OPERATION_S: Final = 1800.0
#: Seconds of one outage a backfill waits out; once the outage is older, requests fail at once until it ends.
BURST_MAX_OUTAGE_S: Final = 1800.0


class ArchiveError(Exception):
    """A failed request to the archive; ``reason`` is safe to log and to store."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class TransientError(ArchiveError):
    """Worth retrying. ``outage_like`` failures (5xx, 429, connection errors) feed outage detection."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        outage_like: bool = True,
        verification: bool = False,
    ) -> None:
        super().__init__(reason, status=status)
        self.retry_after = retry_after
        self.outage_like = outage_like
        self.verification = verification


class PermanentError(ArchiveError):
    """Not worth retrying now (404, 403, ...): the file goes ``missing`` with this reason and status."""


class SessionExpired(TransientError):
    """An HTML page where FITS was expected while logged in."""


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_status(status: int, reason: str, headers: Any) -> ArchiveError:
    """The error for a non-success HTTP status."""
    if status == 429 or status >= 500:
        return TransientError(
            f"HTTP {status} {reason}".strip(), status=status, retry_after=retry_after_seconds(headers.get("Retry-After"))
        )
    if status in PERMANENT_STATUSES or 400 <= status < 500:
        return PermanentError(f"HTTP {status} {reason}".strip(), status=status)
    return TransientError(f"unexpected HTTP {status} {reason}".strip(), status=status, outage_like=False)


def check_identity_encoding(headers: Any) -> None:
    """TransientError when a response is encoded (gzip, ...) although ``identity`` was asked for."""
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding and encoding != "identity":
        raise TransientError(
            f"the archive answered with Content-Encoding {encoding!r} although identity was asked for", outage_like=False
        )


def transient_from_exception(err: BaseException, credentials: Credentials | None = None) -> TransientError:
    """A TransientError for a network-level failure (reset, timeout, short body), with a safe message."""
    return TransientError(safe_error_text(err, credentials), outage_like=True)


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter: a delay drawn in [0, min(max_s, initial_s * 2**(n-1))]."""

    max_attempts: int
    initial_s: float = 1.0
    max_s: float = 120.0
    rng: random.Random | None = None

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        rng = self.rng or random.Random(0)
        self.rng = rng
        ceiling = min(self.max_s, self.initial_s * 2 ** max(0, failures - 1))
        delay = rng.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_s * 10, MAX_RETRY_AFTER_S))
        return delay


#: Where the outage state goes (the service stores it in the ledger's meta and events): called
#: with the gate's :meth:`OutageGate.status` and a one-line message each time an outage starts,
#: is extended, or ends (``status["outage"]`` says which).
OutageRecorder = Callable[[dict[str, Any], str], None]


class OutageGate:
    """Archive-wide outage detection: pause every request while most recent requests fail.

    The last ``window`` outcomes are kept; when at least ``min_samples`` are known and a
    fraction ``threshold`` of them are outage-like failures, requests pause for ``delay``
    (doubling up to ``max_delay_s`` while failures go on). A success ends the outage.
    Each change of state goes to ``recorder`` (see :class:`OutageRecorder`), if any.
    """

    def __init__(
        self,
        *,
        recorder: OutageRecorder | None = None,
        window: int = 20,
        min_samples: int = 6,
        threshold: float = 0.8,
        initial_delay_s: float = 5.0,
        max_delay_s: float = 600.0,
    ) -> None:
        self.recorder = recorder
        self.window: deque[bool] = deque(maxlen=window)
        self.min_samples = min_samples
        self.threshold = threshold
        self.initial_delay_s = initial_delay_s
        self.max_delay_s = max_delay_s
        self.delay_s = initial_delay_s
        self.paused_until = 0.0
        self.since: float | None = None
        self.pauses = 0
        #: Seconds of one outage worth waiting out (None: all of it); see :attr:`exhausted`.
        self.max_outage_s: float | None = None

    @property
    def in_outage(self) -> bool:
        return self.since is not None

    def record(self, ok: bool, *, outage_like: bool = True) -> None:
        """Account one request's outcome; start, extend or end an outage."""
        now = time.monotonic()
        if ok:
            self.window.append(False)
            if self.since is not None:
                log.warning("archive answers again after %.0f s of outage", now - self.since)
                self.since = None
                self.delay_s = self.initial_delay_s
                self.window.clear()
                self._publish(f"archive answers again after {self.pauses} pauses")
            return
        self.window.append(outage_like)
        failing = sum(self.window)
        if self.since is not None:
            if now >= self.paused_until and outage_like:
                self._pause(now, f"archive still failing: {failing}/{len(self.window)} recent requests")
            return
        if len(self.window) >= self.min_samples and failing >= self.threshold * len(self.window):
            self.since = now
            self._pause(now, f"archive outage: {failing} of the last {len(self.window)} requests failed")

    def _pause(self, now: float, message: str) -> None:
        self.paused_until = now + self.delay_s
        self.pauses += 1
        log.warning("%s; pausing all downloads for %.1f s", message, self.delay_s)
        self._publish(f"{message}; pausing all downloads for {self.delay_s:.1f} s")
        self.delay_s = min(self.max_delay_s, self.delay_s * 2)

    def status(self) -> dict[str, Any]:
        """What ``status`` shows: whether downloads are paused, since when and for how long."""
        remaining = max(0.0, self.paused_until - time.monotonic())
        return {
            "outage": self.in_outage,
            "pauses": self.pauses,
            "paused_for_s": round(remaining, 1) if self.in_outage else 0.0,
            "next_delay_s": self.delay_s,
            "since_unix": None if self.since is None else clock.now() - (time.monotonic() - self.since),
        }

    def _publish(self, message: str) -> None:
        if self.recorder is not None:
            self.recorder(self.status(), message)

    async def wait(self, limit_s: float = float("inf")) -> float:
        """Return when requests may go out (at once unless an outage pause is running), or after ``limit_s``.

        Returns the seconds waited; :attr:`paused` says whether the pause is still running.
        """
        started = time.monotonic()
        while (remaining := self.paused_until - time.monotonic()) > 0:
            left = limit_s - (time.monotonic() - started)
            if left <= 0:
                break
            await asyncio.sleep(min(remaining, left))
        return time.monotonic() - started

    @property
    def paused(self) -> bool:
        return self.paused_until > time.monotonic()

    @property
    def exhausted(self) -> bool:
        """The outage has lasted longer than ``max_outage_s``: requests fail at once instead of waiting."""
        return self.since is not None and self.max_outage_s is not None and time.monotonic() - self.since > self.max_outage_s


@dataclass
class FailureCount:
    """Failures of one operation that count against its attempts (those outside an outage)."""

    counted: int = 0
    total: int = 0
    last: TransientError | None = None
    relogged: bool = False


class ArchiveClient:
    """One aiohttp session per service, with the retry policy, the outage gate and the login.

    Use as ``async with ArchiveClient(config.archive, ...) as client:``; the session is
    closed on exit. Connections per host are limited to ``archive.max_connections``;
    connect and read timeouts apply, a total timeout does not (large files must finish).
    ``outage_recorder`` receives the outage state (when no ``gate`` is given).
    """

    def __init__(
        self,
        config: ArchiveConfig,
        *,
        credentials: Credentials | None = None,
        policy: RetryPolicy | None = None,
        gate: OutageGate | None = None,
        outage_recorder: OutageRecorder | None = None,
    ) -> None:
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.credentials = credentials
        self.policy = policy or RetryPolicy(config.max_attempts, rng=random.Random(0))
        self.gate = gate or OutageGate(recorder=outage_recorder)
        self._session: aiohttp.ClientSession | None = None
        self._login_lock = asyncio.Lock()
        self._login_generation = 0
        #: Seconds one operation may wait for its retries and outage pauses (None: no bound).
        self.max_wait_per_operation_s: float | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ArchiveClient used outside `async with`")
        return self._session

    async def __aenter__(self) -> ArchiveClient:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections * 2, limit_per_host=self.config.max_connections, ttl_dns_cache=300
        )
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.config.connect_timeout_s, sock_read=self.config.read_timeout_s
        )
        # unsafe=True: also keep cookies of hosts given by IP address (a local mirror, the simulator).
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, read_bufsize=READ_BUFSIZE, auto_decompress=False,
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=REQUEST_HEADERS,
        )  # fmt: skip
        if self.credentials is not None:
            try:
                await self.login()
            except BaseException:
                await self.close()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def logged_in(self) -> bool:
        return self.credentials is not None

    async def login(self) -> None:
        """Log in (raises AuthError naming the login when the archive refuses it)."""
        if self.credentials is None:
            return
        async with self._login_lock:
            await login(self.session, self.base_url, self.credentials)
            self._login_generation += 1
            log.info("logged in to %s as %s", self.base_url, self.credentials.username)

    async def relogin(self, seen_generation: int) -> None:
        """Log in again after an expired session, once for all requests that saw the same session."""
        async with self._login_lock:
            if self._login_generation != seen_generation or self.credentials is None:
                return
            await login(self.session, self.base_url, self.credentials)
            self._login_generation += 1
            log.info("session expired; logged in again as %s", self.credentials.username)

    def bound_waiting(self, *, per_operation_s: float | None, per_outage_s: float | None) -> None:
        """Bound what an operation waits for retries and pauses, and how much of one outage is waited out."""
        self.max_wait_per_operation_s = per_operation_s
        self.gate.max_outage_s = per_outage_s

    @property
    def login_generation(self) -> int:
        return self._login_generation

    def has_session_cookie(self) -> bool:
        return session_cookie(self.session, self.base_url) is not None

    def safe(self, err: BaseException) -> str:
        return safe_error_text(err, self.credentials)

    async def retrying(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        max_attempts: int | None = None,
        on_failure: Callable[[TransientError, FailureCount], Awaitable[None] | None] | None = None,
        count: FailureCount | None = None,
    ) -> T:
        """Run ``operation`` until it succeeds, a permanent error, or too many counted failures.

        ``operation`` raises TransientError or PermanentError; the last TransientError is
        re-raised when attempts run out. ``on_failure`` is called after each transient failure.
        """
        limit = max_attempts or self.policy.max_attempts
        failures = count or FailureCount()
        bound = self.max_wait_per_operation_s
        waited = [0.0]

        def wait_left() -> float:
            return float("inf") if bound is None else max(0.0, bound - waited[0])

        def stop(state: RetryCallState) -> bool:
            # Failures during an outage do not count, but even they are bounded so that a run ends.
            used_up = failures.counted >= limit or failures.total >= limit * OUTAGE_ATTEMPTS_FACTOR
            return used_up or wait_left() <= 0 or self.gate.exhausted

        def wait(state: RetryCallState) -> float:
            err = state.outcome.exception() if state.outcome is not None else None
            retry_after = err.retry_after if isinstance(err, TransientError) else None
            delay = min(self.policy.delay(max(1, failures.counted), retry_after), wait_left())
            waited[0] += delay
            return delay

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError), stop=stop, wait=wait, reraise=True
        )
        async for attempt in retrying:
            with attempt:
                if not self.gate.exhausted:  # past the bound, each operation tries once, without waiting
                    waited[0] += await self.gate.wait(wait_left())
                    if self.gate.paused:
                        raise TransientError("archive outage: this operation's bound on waiting is used up")
                generation = self._login_generation
                try:
                    result = await operation()
                except TransientError as err:
                    self.gate.record(False, outage_like=err.outage_like)
                    failures.total += 1
                    if not (self.gate.in_outage and err.outage_like):
                        failures.counted += 1
                    failures.last = err
                    if isinstance(err, SessionExpired) and not failures.relogged:
                        failures.relogged = True
                        await self.relogin(generation)
                    if on_failure is not None:
                        maybe = on_failure(err, failures)
                        if maybe is not None:
                            await maybe
                    raise
                except PermanentError:
                    self.gate.record(True)
                    raise
                self.gate.record(True)
                return result
        raise AssertionError("unreachable: tenacity re-raises the last error")
