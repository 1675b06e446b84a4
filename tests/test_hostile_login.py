"""The login never sends the password to another origin, whatever the archive's redirects say."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from streamer.archive.auth import AuthError, Credentials
from streamer.archive.client import ArchiveClient
from streamer.config import ArchiveConfig

PASSWORD = "pw-7f3a-secret"
LOGIN = "/account/signon/login.do"


class Elsewhere:
    """A second origin that records every request body and query it receives."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.any)
        return app

    async def any(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(f"{request.method} {request.path_qs} {body.decode(errors='replace')}")
        response = web.Response(text="got it")
        response.set_cookie("JOSSO_SESSIONID", "stolen", path="/")
        return response


def _redirecting_archive(status: int, location: str) -> web.Application:
    async def login(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, headers={"Location": location})

    app = web.Application()
    app.router.add_route("*", LOGIN, login)
    return app


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_another_origin_is_refused_and_gets_nothing(status: int) -> None:
    elsewhere = Elsewhere()
    async with TestServer(elsewhere.app(), host="127.0.0.1") as other:
        target = str(other.make_url(LOGIN))
        async with TestServer(_redirecting_archive(status, target), host="127.0.0.1") as archive:
            config = ArchiveConfig(base_url=str(archive.make_url("")).rstrip("/"), max_attempts=1)
            client = ArchiveClient(config, credentials=Credentials("ann", PASSWORD))
            with pytest.raises(AuthError, match="another origin") as caught:
                async with client:
                    pass
    assert elsewhere.seen == []
    assert PASSWORD not in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.asyncio
async def test_a_same_origin_redirect_is_followed_with_the_form() -> None:
    posted: list[str] = []

    async def first(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=307, headers={"Location": "/account/signon/login2.do"})

    async def second(request: web.Request) -> web.Response:
        form = await request.post()
        posted.append(str(form.get("josso_password")))
        response = web.Response(text="<html>welcome</html>", content_type="text/html")
        if form.get("josso_password") == PASSWORD:
            response.set_cookie("JOSSO_SESSIONID", "s1", path="/")
        return response

    app = web.Application()
    app.router.add_post(LOGIN, first)
    app.router.add_post("/account/signon/login2.do", second)
    async with TestServer(app, host="127.0.0.1") as archive:
        config = ArchiveConfig(base_url=str(archive.make_url("")).rstrip("/"), max_attempts=1)
        async with ArchiveClient(config, credentials=Credentials("ann", PASSWORD)) as client:
            assert client.has_session_cookie()
    assert posted == [PASSWORD]


@pytest.mark.asyncio
async def test_a_redirect_loop_on_the_same_origin_ends() -> None:
    app = _redirecting_archive(307, LOGIN)
    async with TestServer(app, host="127.0.0.1") as archive:
        config = ArchiveConfig(base_url=str(archive.make_url("")).rstrip("/"), max_attempts=1)
        with pytest.raises(AuthError, match="redirects"):
            async with ArchiveClient(config, credentials=Credentials("ann", PASSWORD)):
                pass


def test_origin_is_scheme_host_and_port() -> None:
    from streamer.archive.auth import same_origin

    base = URL("https://irsa.ipac.caltech.edu/account")
    assert same_origin(base, URL("https://IRSA.ipac.caltech.edu:443/x"))
    assert not same_origin(base, URL("http://irsa.ipac.caltech.edu/x"))
    assert not same_origin(base, URL("https://irsa.ipac.caltech.edu:8443/x"))
    assert not same_origin(base, URL("https://evil.example/x"))
