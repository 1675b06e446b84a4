"""A scripted stand-in for IRSA's data and login endpoints, for fetcher unit tests.

Each path serves fixed bytes; a per-path script of faults ("500", "429", "truncate",
"html", "404", "reset", "stall", "garbage") is consumed one fault per GET. Range
requests are honoured unless ``honour_range`` is False. Counts every request.
The acceptance tests use the project's simulated archive instead.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from aiohttp import web

DATA = "/ibe/data/ztf/products/"


@dataclass
class Stub:
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    honour_range: bool = True
    chunked: bool = False  # send bodies with chunked transfer encoding (no Content-Length), one chunk per write
    password: str | None = None
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_sent: Counter[str] = field(default_factory=Counter)
    logins: int = 0
    down_until: float = 0.0  # loop time until which every data request answers 503

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", DATA + "{path:.+}", self.data)
        app.router.add_post("/account/signon/login.do", self.login)
        return app

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.logins += 1
        response = web.Response(text="<html>welcome</html>", content_type="text/html")
        if form.get("josso_cmd") == "login" and form.get("josso_password") == self.password:
            response.set_cookie("JOSSO_SESSIONID", f"s{self.logins}", path="/")
        return response

    async def data(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.requests[(request.method, path)] += 1
        if path not in self.files:
            raise web.HTTPNotFound()
        if self.password is not None and "JOSSO_SESSIONID" not in request.cookies:
            return web.Response(text="<html>log in</html>", content_type="text/html")
        body = self.files[path]
        if asyncio.get_running_loop().time() < self.down_until:
            return web.Response(status=503, text="down for maintenance")
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(body)), "Content-Type": "application/fits"})
        fault = self.faults[path].pop(0) if self.faults[path] else None
        if fault in ("500", "429", "404", "403"):
            headers = {"Retry-After": "0"} if fault == "429" else {}
            return web.Response(status=int(fault), headers=headers, text="error")
        if fault == "html":
            return web.Response(text="<html>Please log in</html>", content_type="text/html")
        start, status = 0, 200
        headers = {"Content-Type": "application/fits"}
        if self.honour_range and "Range" in request.headers:
            spec = request.headers["Range"].removeprefix("bytes=")
            first, _, last = spec.partition("-")
            start = int(first)
            end = min(int(last) + 1 if last else len(body), len(body))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(body)}"
            body = body[start:end]
        if fault == "garbage":
            body = bytes(len(body))
        response = web.StreamResponse(status=status, headers=headers)
        if self.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body)
        await response.prepare(request)
        cut = len(body) // 2 if fault in ("truncate", "reset", "stall") else len(body)
        for pos in range(0, cut, 1 << 16):
            await response.write(body[pos : min(cut, pos + (1 << 16))])
            self.bytes_sent[path] += min(cut, pos + (1 << 16)) - pos
        if fault == "stall":
            await asyncio.sleep(3600)
        if cut < len(body):
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response
