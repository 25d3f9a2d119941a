"""The ext_authz HTTP check endpoint: the cheapest way for Envoy to ask the router for a pool.

Envoy's ``ext_authz`` filter (``with_request_body``: the body buffered, headers held) sends one
HTTP/1.1 request per LLM request to ``<path_prefix><original path>`` with the original body; the
answer is always ``200`` with the pool and provenance headers, which Envoy copies onto the
upstream request (``allowed_upstream_headers``) before clearing the route cache. One request and
one response on a kept-alive connection, instead of a gRPC stream with two round trips: measured
here about 5x less router CPU than the ext_proc stream (benchmarks/overhead.py).

What it cannot do is see the request end (Envoy's access-log stream tells the in-flight counts),
so include_usage injection needs the ext_proc routing filter (``service.routing_filter: ext_proc``). The usage filter
(ext_proc, observability mode, only requests whose response is read) is the same for both.

Who sent a request is read from the headers Envoy forwards with the check (``Router.client_of``:
the configured identity header, else ``x-forwarded-for``); only those two are kept.

Never answers anything but 200 to a check: an ext_authz answer of 4xx would be sent to the client.
A request it cannot read, or any bug, gets a 200 with no pool header — the default route, the
largest pool. ``GET /healthz`` is for Envoy's health check (503 while draining).

The HTTP parsing is httptools (llhttp, the parser behind uvicorn); the protocol is a plain
asyncio ``Protocol`` — a framework's per-request objects would cost more than the routing itself.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from typing import Awaitable

import httptools

from .router import Routed, Router

log = logging.getLogger("extproc.service")

CHECK_PREFIX = "/route"
HEALTH_PATH = b"/healthz"
MAX_BODY = 64 << 20  # Envoy sends at most its max_request_bytes (50 MiB); beyond this: unreadable
_EMPTY_200 = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_HEALTHY = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
_DRAINING = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 8\r\n\r\ndraining"
_CLOSE = b"connection: close\r\n"


class CheckServer:
    """Serves checks on one address until ``stop``; shares the ``Router`` with the gRPC service."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.draining = False
        self.connections: set[_CheckProtocol] = set()
        self.busy = 0  # checks being answered (a large body is routed in a worker thread)
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self, address: str, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``address``; over TLS with ``ssl_context`` (service/tls.py: a new connection
        gets the certificate current at its handshake)."""
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _CheckProtocol(self), host, int(port), ssl=ssl_context,
                                                    ssl_handshake_timeout=10.0 if ssl_context else None)
        except OSError as exc:
            raise OSError(f"cannot bind the HTTP check address {address}: {exc.strerror}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep())
        return self.port

    async def _sweep(self) -> None:
        """Count out checked requests whose end never came even while no new check arrives
        (each check also does), so an idle router's in-flight counts come down too."""
        period = min(10.0, self.router.s.max_request_s / 4)
        while True:
            await asyncio.sleep(period)
            self.router.expire_open()

    async def stop(self, grace: float) -> None:
        """Fail health checks, stop accepting, let answers in progress finish, close."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()


class _CheckProtocol(asyncio.Protocol):
    __slots__ = ("server", "r", "transport", "parser", "url", "body", "size", "queue", "working", "identity",
                 "wanted")

    def __init__(self, server: CheckServer) -> None:
        self.server = server
        self.r = server.router
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.size = 0
        self.queue: deque[tuple[bytes, bytes | None, bool, str | None]] = deque()
        self.working = False
        self.identity: dict[str, str] = {}  # the headers that name the sender (see Router.client_of)
        self.wanted = {h.encode(): h for h in (self.r.s.client_header, "x-forwarded-for") if h}

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # Not HTTP: Envoy's check fails (a reset), and with failure_mode_allow the request
            # goes to the default route. Nothing else to do.
            self.close()

    # -- httptools callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.size = 0
        if self.identity:
            self.identity = {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        wanted = self.wanted.get(name.lower())
        if wanted is not None:
            self.identity[wanted] = value.decode("latin-1")

    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= MAX_BODY:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        body = b"".join(self.body) if self.size <= MAX_BODY else None
        self.body = []
        client = self.r.client_of(self.identity.get) if self.identity else None
        self.queue.append((self.url, body, self.parser.should_keep_alive(), client))
        if not self.working:
            self._answer_queued()

    # -- answers, in order -------------------------------------------------------------------------
    def _open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def _answer_queued(self) -> None:
        while self.queue and self._open():
            url, body, keep_alive, client = self.queue.popleft()
            if url == HEALTH_PATH:
                self._send(_DRAINING if self.server.draining else _HEALTHY, keep_alive)
                continue
            path = url.decode("latin-1")
            if path.startswith(CHECK_PREFIX):
                path = path[len(CHECK_PREFIX):]
            t0 = time.perf_counter()
            self.server.busy += 1
            try:
                # An over-long body is routed as no body at all: unreadable, so the largest pool.
                routed = self.r.route(body or b"", path, ended_by_log=True, client=client)
            except Exception:  # noqa: BLE001 - never a non-200: the default route holds anything
                routed = None
                self._failed()
            if isinstance(routed, Routed) or routed is None:
                self.server.busy -= 1
                self._send(self._answer(routed, t0), keep_alive)
                continue
            # it waits (a large body read in a worker thread): answer in order, so read no more meanwhile
            self.working = True
            self.transport.pause_reading()
            asyncio.ensure_future(self._answer_later(routed, keep_alive, t0))
            return

    async def _answer_later(self, routed: Awaitable[Routed], keep_alive: bool, t0: float) -> None:
        try:
            try:
                done: Routed | None = await routed
            except Exception:  # noqa: BLE001 - as above
                done = None
                self._failed()
            if self._open():  # else Envoy gave up (timeout) or went away: nothing would end it
                self._send(self._answer(done, t0), keep_alive)
        finally:
            self.server.busy -= 1
            self.working = False
            if self._open():
                self.transport.resume_reading()
                self._answer_queued()

    def _failed(self) -> None:
        self.r.metrics.stream_errors.inc()
        log.exception("check failed")

    def _answer(self, routed: Routed | None, t0: float) -> bytes:
        """The answer for a decision; a failure (None) still answers 200, with no pool header:
        Envoy's default route, the largest pool."""
        answer = _EMPTY_200
        if routed is not None:
            try:
                head = "".join(f"{k}: {v}\r\n" for k, v in self.r.decision_headers(routed))
                answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n" + head.encode("latin-1") + b"\r\n"
            except Exception:  # noqa: BLE001 - as above
                self._failed()
        self.r.metrics.phase["request_body"].observe(time.perf_counter() - t0)
        return answer

    def _send(self, response: bytes, keep_alive: bool) -> None:
        if self.transport is None:
            return
        if keep_alive and not self.server.draining:
            self.transport.write(response)
            return
        # the header block ends with an empty line: add "connection: close" before it
        self.transport.write(response[:response.index(b"\r\n") + 2] + _CLOSE + response[response.index(b"\r\n") + 2:])
        self.transport.close()
        self.queue.clear()  # pipelined checks after a closing answer are never answered: not decided either
