"""IRSA login (JOSSO): credentials that never leak, and a session cookie checked for real.

The password is read from an environment variable or from a file that only its
owner can read, travels only in the body of a POST form (never in a URL that an
exception or a log line could print), and is scrubbed from any error text that
passes through :func:`safe_error_text`. A login succeeds only when the server
sets a ``JOSSO_SESSIONID`` cookie: a wrong password also answers 200.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import quote, quote_plus

import aiohttp
from yarl import URL

from streamer.config import AuthConfig
from streamer.errors import StreamerError

LOGIN_PATH: Final = "/account/signon/login.do"
SESSION_COOKIE: Final = "JOSSO_SESSIONID"
#: Same-origin redirects the login follows by hand before it gives up.
MAX_LOGIN_REDIRECTS: Final = 3
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})


class AuthError(StreamerError):
    """A login that cannot work: missing or unsafe password, or credentials the archive refuses.

    Exit code 2: a configuration problem that restarting the service cannot fix.
    """

    exit_code = 2


class LoginUnreachable(AuthError):
    """The login request itself failed (network, a 5xx): worth a restart later, exit code 1."""

    exit_code = 1


@dataclass(frozen=True)
class Credentials:
    """An IRSA account; the password never appears in repr, str or comparisons' output."""

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    __str__ = __repr__

    def scrub(self, text: str) -> str:
        """``text`` with the password (and its URL-encoded form) replaced by ``***``."""
        if not self.password:
            return text
        for secret in {self.password, quote_plus(self.password), quote(self.password, safe="")}:
            if secret:
                text = text.replace(secret, "***")
        return text


def load_credentials(auth: AuthConfig, *, environ: dict[str, str] | None = None) -> Credentials:
    """Read the password named by the configuration; AuthError (exit 2) naming what is wrong otherwise.

    The file must be a regular, owner-only, UTF-8 file: it is checked with ``stat`` before it is
    opened (a FIFO would block), then opened without following a symlink or blocking.
    """
    env = os.environ if environ is None else environ
    if auth.password_env is not None:
        password = env.get(auth.password_env)
        if not password:
            raise AuthError(
                f"IRSA login {auth.username!r}: environment variable {auth.password_env} "
                "(archive.auth.password_env) is not set or empty; expected the password"
            )
        return Credentials(auth.username, password)
    if auth.password_file is None:
        raise AuthError(f"IRSA login {auth.username!r}: set archive.auth.password_env or archive.auth.password_file")
    return Credentials(auth.username, _read_password_file(auth.username, auth.password_file))


def _read_password_file(username: str, path: Path) -> str:
    where = f"IRSA login {username!r}: password file {path} (archive.auth.password_file)"
    try:
        mode = os.stat(path, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            raise AuthError(f"{where} is not a regular file; expected an owner-only file holding the password")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuthError(
                f"{where} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
            )
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise AuthError(f"{where}: cannot be read ({err.strerror}); expected an owner-only file holding the password") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuthError(f"{where} changed while it was opened; expected an owner-only regular file")
        content = os.read(fd, 4096)
    except OSError as err:
        raise AuthError(f"{where}: cannot be read ({err.strerror})") from None
    finally:
        os.close(fd)
    try:
        password = content.decode("utf-8", errors="strict").strip("\r\n")
    except UnicodeDecodeError:
        raise AuthError(f"{where} is not UTF-8 text; expected the password on one line") from None
    if not password:
        raise AuthError(f"{where} is empty; expected the password on one line")
    return password


def session_cookie(session: aiohttp.ClientSession, base_url: str) -> str | None:
    """The JOSSO session id the cookie jar would send to the archive, if any."""
    cookies = session.cookie_jar.filter_cookies(URL(base_url.rstrip("/") + "/"))
    morsel = cookies.get(SESSION_COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


async def login(session: aiohttp.ClientSession, base_url: str, credentials: Credentials, *, timeout_s: float = 60.0) -> None:
    """Log in with a POST form; raise AuthError naming the login unless a session cookie comes back.

    Redirects are followed by hand, at most :data:`MAX_LOGIN_REDIRECTS` times and only within the
    archive's origin (scheme, host, port): a redirect elsewhere is refused before anything is sent,
    so the password never leaves the archive (aiohttp would re-post the form to any ``Location``).
    """
    url = base_url.rstrip("/") + LOGIN_PATH
    form = {"josso_cmd": "login", "josso_username": credentials.username, "josso_password": credentials.password}
    session.cookie_jar.clear(lambda morsel: morsel.key == SESSION_COOKIE)
    try:
        status, got = await _post_login(session, URL(url), form, timeout_s)
    except (aiohttp.ClientError, TimeoutError) as err:
        raise LoginUnreachable(
            f"IRSA login {credentials.username!r} at {url}: request failed ({safe_error_text(err, credentials)})"
        ) from None
    if status >= 500:
        raise LoginUnreachable(f"IRSA login {credentials.username!r} at {url}: HTTP {status}")
    if status >= 400:
        raise AuthError(f"IRSA login {credentials.username!r} at {url}: HTTP {status}")
    if not got:
        raise AuthError(
            f"IRSA login {credentials.username!r} refused: no {SESSION_COOKIE} cookie came back "
            "(wrong username or password?)"
        )
    if SESSION_COOKIE not in {c.key for c in session.cookie_jar}:
        session.cookie_jar.update_cookies({SESSION_COOKIE: got}, URL(base_url))


def same_origin(a: URL, b: URL) -> bool:
    """Whether two absolute URLs share scheme, host and port (the origin credentials may go to)."""
    return (a.scheme.lower(), (a.host or "").lower(), a.port) == (b.scheme.lower(), (b.host or "").lower(), b.port)


async def _post_login(
    session: aiohttp.ClientSession, url: URL, form: dict[str, str], timeout_s: float
) -> tuple[int, str | None]:
    """POST the form, following same-origin redirects by hand; return (final status, session cookie or None).

    A 307/308 re-posts the form (same origin only); 301/302/303 continue with a GET without it.
    """
    origin = url
    method = "POST"
    data_or_none: dict[str, str] | None = form
    for _ in range(MAX_LOGIN_REDIRECTS + 1):
        async with session.request(
            method, url, data=data_or_none, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            status = response.status
            await response.read()
            # The cookie can arrive on a redirect hop: look in the jar, not only in this response.
            got = session_cookie(session, str(origin.origin())) or (
                response.cookies[SESSION_COOKIE].value if SESSION_COOKIE in response.cookies else None
            )
            location = response.headers.get("Location")
        if status not in REDIRECT_STATUSES or location is None:
            return status, got
        target = url.join(URL(location))
        if not same_origin(origin, target):
            raise AuthError(
                f"IRSA login at {origin}: refused to follow a redirect (HTTP {status}) to another origin "
                f"({target.scheme}://{target.host}:{target.port}); the password is only sent to {origin.origin()}"
            )
        url = target
        if status not in (307, 308):
            method, data_or_none = "GET", None
    raise AuthError(f"IRSA login at {origin}: more than {MAX_LOGIN_REDIRECTS} redirects")


def safe_error_text(err: BaseException, credentials: Credentials | None = None) -> str:
    """A one-line description of an exception, without query strings or the password.

    aiohttp puts the request URL into many exception messages; URLs are cut at
    ``?`` here, so no query parameter (or password sent the old way) ever gets out.
    """
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    text = _strip_queries(text)
    if credentials is not None:
        text = credentials.scrub(text)
    return text.replace("\n", " ")[:500]


def _strip_queries(text: str) -> str:
    out = []
    for word in text.split(" "):
        if "://" in word and "?" in word:
            word = word.split("?", 1)[0] + "?…"
        out.append(word)
    return " ".join(out)
