"""A minimal HTTP/1.1 upstream for overhead measurements: reads the request, answers at once.

POST bodies with ``"stream": true`` get an SSE stream of 20 content chunks, a usage chunk and
``[DONE]``; others get a small chat.completion JSON with usage. Nothing is simulated: the point
is that the upstream adds as little and as steady a latency as possible to both runs compared.

    python benchmarks/fast_upstream.py PORT [CHUNK_DELAY_MS]

CHUNK_DELAY_MS spaces the stream's chunks like a model's inter-token latency (each then reaches
Envoy, and any filter reading the stream, as a separate body chunk).

A request header ``x-bench-prompt-tokens: N`` (the benchmark knows each body's true count) makes
the JSON answer's ``usage.prompt_tokens`` N, so that a router learns what vLLM would teach it; a
request's ``x-token-exact`` (set by the router) comes back as the response header ``x-bench-exact``.
"""

import asyncio
import json
import sys

_JSON = json.dumps({"id": "cmpl-1", "object": "chat.completion", "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1000, "completion_tokens": 1, "total_tokens": 1001}}).encode()
_CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
_USAGE = (b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[],'
          b'"usage":{"prompt_tokens":1000,"completion_tokens":20,"total_tokens":1020}}\n\n')


def _json(prompt_tokens: int) -> bytes:
    doc = json.loads(_JSON)
    doc["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}
    return json.dumps(doc).encode()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            chunked = False
            prompt, exact = None, b""
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    length = int(v)
                elif k == b"transfer-encoding" and b"chunked" in v.lower():
                    chunked = True
                elif k == b"x-bench-prompt-tokens":
                    prompt = int(v)
                elif k == b"x-token-exact":
                    exact = b"x-bench-exact: %s\r\n" % v.strip()
            if chunked:
                body = bytearray()
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                    data = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    body += data[:-2]
            else:
                body = await reader.readexactly(length) if length else b""
            if head.startswith(b"GET"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok")
            elif b'"stream":true' in body or b'"stream": true' in body:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for piece in [_CHUNK] * 20 + [_USAGE, b"data: [DONE]\n\n"]:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                    if CHUNK_DELAY_S:
                        await asyncio.sleep(CHUNK_DELAY_S)
                writer.write(b"0\r\n\r\n")
            else:
                answer = _JSON if prompt is None else _json(prompt)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s"
                             % (exact, len(answer), answer))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=64 << 20)
    async with server:
        await server.serve_forever()


CHUNK_DELAY_S = 0.0

if __name__ == "__main__":
    CHUNK_DELAY_S = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
    asyncio.run(main(int(sys.argv[1])))
