"""The pool exact source: ask a vLLM serving the model, POST /tokenize, or for an Anthropic
Messages body POST /v1/messages/count_tokens (exact by construction: its own template and
tokenizer, no generation).

Each call is bounded: a total timeout, a cap on calls in flight and a token bucket of calls a
second per pool address (the pool's API server does the work), a cap on the body sent and on the
answer read. Any failure is an outcome, never an exception: the estimate then decides.

/tokenize takes chat messages or a string prompt. A chat body is sent with what its template
reads (tools, template kwargs, the generation-prompt flags) and the two things a real request
adds that /tokenize does not: ``reasoning_content`` renamed ``reasoning``, and
``reasoning_effort`` as a template argument. A Messages body is sent with what vLLM's
count_tokens reads (it renders it as the request would be, and sums the prompt's tokens). Other
shapes (prompt lists, token ids, the Responses API, whose ``input`` vLLM turns into a prompt its
own way) are "unsupported".
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping

import aiohttp
import orjson

CHAT_KEYS = ("tools", "add_generation_prompt", "continue_final_message", "add_special_tokens",
             "chat_template_kwargs")
# what vLLM 0.32's AnthropicCountTokensRequest reads (it ignores the rest: max_tokens, stream, ...)
MESSAGES_KEYS = ("messages", "system", "tools", "tool_choice", "thinking", "output_config", "chat_template_kwargs")


class PoolError(Exception):
    """A call that gave no count; ``outcome`` says how (timeout, error, capped, too_large, unsupported)."""

    def __init__(self, outcome: str, why: str = "") -> None:
        super().__init__(why or outcome)
        self.outcome = outcome


def counting_call(api: str, doc: Mapping[str, Any]) -> tuple[str, dict, str]:
    """(path, body, the answer's count field) of the call that counts a request body;
    PoolError("unsupported")."""
    if api == "messages" and isinstance(doc.get("messages"), list):
        return ("/v1/messages/count_tokens",
                {"model": doc.get("model"), **{k: doc[k] for k in MESSAGES_KEYS if doc.get(k) is not None}},
                "input_tokens")
    return "/tokenize", tokenize_body(api, doc), "count"


def tokenize_body(api: str, doc: Mapping[str, Any]) -> dict:
    """The /tokenize request standing for a chat or completions body; PoolError("unsupported")."""
    model = doc.get("model")
    if api == "chat" and isinstance(doc.get("messages"), list):
        out: dict = {"model": model, "messages": [_renamed(m) for m in doc["messages"]]}
        for key in CHAT_KEYS:
            if doc.get(key) is not None:
                out[key] = doc[key]
        effort = doc.get("reasoning_effort")
        if effort is not None:
            kwargs = dict(out.get("chat_template_kwargs") or {})
            kwargs.setdefault("reasoning_effort", effort)
            kwargs.setdefault("enable_thinking", effort != "none")
            out["chat_template_kwargs"] = kwargs
        return out
    if api == "completions" and isinstance(doc.get("prompt"), str):
        return {"model": model, "prompt": doc["prompt"]}
    raise PoolError("unsupported", f"/tokenize takes no {api} body of this shape")


def _renamed(m: Any) -> Any:
    if isinstance(m, dict) and "reasoning_content" in m and m.get("reasoning") is None:
        m = dict(m)
        m["reasoning"] = m.pop("reasoning_content")
    return m


class _Caps:
    """In-flight count and a token bucket of calls a second, for one pool address."""

    __slots__ = ("in_flight", "tokens", "refill")

    def __init__(self, rate: float) -> None:
        self.in_flight = 0
        self.tokens = max(1.0, rate)
        self.refill = time.monotonic()

    def take(self, rate: float, max_in_flight: int) -> bool:
        if self.in_flight >= max_in_flight:
            return False
        now = time.monotonic()
        self.tokens = min(max(1.0, rate), self.tokens + (now - self.refill) * rate)
        self.refill = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class PoolCounter:
    """Calls to pools' /tokenize. Runs on one event loop (the session is made on first use)."""

    def __init__(self, timeout_s: float, max_concurrent: int, max_per_s: float, max_bytes: int,
                 max_response_bytes: int) -> None:
        self.timeout_s = timeout_s
        self.max_concurrent = max_concurrent
        self.max_per_s = max_per_s
        self.max_bytes = max_bytes
        self.max_response_bytes = max_response_bytes
        self._caps: dict[str, _Caps] = {}   # one per pool_url of the rules: bounded by the config
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # keep-alive connections, at most max_concurrent per address; no proxies from the
            # environment (the pools are reached directly), no cookies
            connector = aiohttp.TCPConnector(limit_per_host=self.max_concurrent, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                                  trust_env=False, json_serialize=lambda v: orjson.dumps(v).decode())
        return self._session

    async def count(self, url: str, api: str, doc: Mapping[str, Any], body_bytes: int) -> int:
        """The pool's count for the body's prompt; PoolError saying why there is none."""
        if body_bytes > self.max_bytes:
            raise PoolError("too_large")
        path, body, field = counting_call(api, doc)
        payload = orjson.dumps(body)
        caps = self._caps.get(url)
        if caps is None:
            caps = self._caps[url] = _Caps(self.max_per_s)
        if not caps.take(self.max_per_s, self.max_concurrent):
            raise PoolError("capped")
        caps.in_flight += 1
        try:
            async with asyncio.timeout(self.timeout_s):  # (no task per call, as wait_for makes)
                return await self._post(url.rstrip("/") + path, payload, field)
        except asyncio.TimeoutError:
            raise PoolError("timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise PoolError("error", f"{type(exc).__name__}") from None
        finally:
            caps.in_flight -= 1

    async def _post(self, url: str, payload: bytes, field: str) -> int:
        async with self._session_now().post(url, data=payload, headers={"content-type": "application/json"},
                                            allow_redirects=False) as resp:
            data = await _read_bounded(resp, self.max_response_bytes)
            if resp.status != 200:
                raise PoolError("error", f"HTTP {resp.status}")
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise PoolError("error", "answer is not JSON") from None
        count = answer.get(field) if isinstance(answer, dict) else None
        if type(count) is not int or not 0 < count < 1 << 31:
            raise PoolError("error", "answer has no count")
        return count

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise PoolError("error", "answer too large")
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise PoolError("error", "answer too large")
        chunks.append(chunk)
    return b"".join(chunks)
