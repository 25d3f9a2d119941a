"""A streamed response crosses Envoy byte for byte, and the router learns its usage on the side.

The short pool is a tiny raw-asyncio HTTP/1.1 upstream in this process: it answers with fixed SSE
bytes in several TCP writes, the usage event cut in the middle of ``"prompt_tokens"``'s object.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from e2e_helpers import MODEL, access_line, chat_body, metric, post, rid, wait_metric

PROMPT_TOKENS = 123

_CHUNK = {"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL}


def _event(**fields) -> bytes:
    return b"data: " + json.dumps({**_CHUNK, **fields}, separators=(",", ":")).encode() + b"\n\n"


_USAGE = _event(choices=[], usage={"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS + 3,
                                   "completion_tokens": 3})
_CUT = _USAGE.index(b'"prompt_tokens"') + 9  # inside the key: neither half holds the whole marker
WRITES = [
    _event(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
    _event(choices=[{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}])
    + _event(choices=[{"index": 0, "delta": {"content": " there"}, "finish_reason": None}]),
    _event(choices=[{"index": 0, "delta": {"content": "!"}, "finish_reason": "length"}]) + _USAGE[:_CUT],
    _USAGE[_CUT:],
    b"data: [DONE]\n\n",
]
FIXED = b"".join(WRITES)


class SSEUpstream:
    """HTTP/1.1 keep-alive server on 127.0.0.1 in a background thread: POST /v1/chat/completions
    gets FIXED as a chunked body, one HTTP chunk per write, with pauses so the writes stay apart."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.requests: list[tuple[str, dict, bytes]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "SSEUpstream":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("upstream did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(server.wait_closed())
            loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1000):  # keep-alive: bounded number of requests per connection
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((f"{method} {path}", headers, body))
                if method == "POST" and path.startswith("/v1/chat/completions"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
                    await writer.drain()
                    for part in WRITES:
                        await asyncio.sleep(0.05)
                        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.CancelledError, ConnectionError,
                ValueError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def upstream_stack(make_stack):
    up = SSEUpstream().start()
    try:
        yield make_stack("sse-upstream", external_pools={"short": up.port}), up
    finally:
        up.stop()


def test_usage_marker_is_split_across_writes():
    assert b'"prompt_tokens"' not in WRITES[2] and b'"prompt_tokens"' not in WRITES[3]
    assert b'"prompt_tokens"' in WRITES[2] + WRITES[3]


def test_stream_reaches_client_byte_identical(upstream_stack):
    stack, up = upstream_stack
    r = rid("sse")
    body = chat_body("Greet the user warmly and ask how their day has been going so far, in one line.",
                     max_tokens=3, stream=True, stream_options={"include_usage": True})
    reply = post(stack, body, r)
    assert reply.status == 200
    assert reply.headers.get("content-type", "").startswith("text/event-stream")
    assert reply.body == FIXED
    line = access_line(stack, r)
    assert line.served_by == "short", line.raw
    # the upstream got the request with the router's headers, the client's body unchanged
    got = [req for req in up.requests if req[1].get("x-request-id") == r]
    assert len(got) == 1
    assert json.loads(got[0][2]) == body
    assert got[0][1].get("x-token-pool") == "short"

    # the router read the usage from the split event (usage filter, observability mode) and learned
    assert wait_metric(stack, "extproc_usage_reads_total", 1, outcome="stream") >= 1
    assert wait_metric(stack, "extproc_calibration_samples", 1, model=MODEL) >= 1
    assert metric(stack, "extproc_usage_reads_total", outcome="stream_missed") == 0
