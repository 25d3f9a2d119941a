"""Reading what a vLLM response says about the prompt: ``usage.prompt_tokens`` from a JSON body
or an SSE stream (the usage event may be split across body chunks), and the exact prompt count a
context-length 400 states. Pure functions and a small incremental scanner: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

MAX_JSON_BODY = 4 << 20     # a JSON response larger than this is not read for usage
MAX_SSE_LINE = 1 << 20      # an SSE line longer than this is dropped, not buffered
_USAGE_MARK = b'"prompt_tokens"'

# vLLM >= ~0.25: "... maximum context length is 8192 tokens. However, you requested 64 output tokens
# and your prompt contains (at least) 10000 input tokens, for a total of (at least) 10064 tokens."
_NEW = re.compile(r"maximum context length is (\d+) tokens\. However, you requested (\d+) output tokens "
                  r"and your prompt contains (at least )?(\d+) input tokens")
# prompt alone too long (no output requested): "... maximum context length is 8192 tokens.
# However, your request has 9000 input tokens. Please reduce the length of the input messages."
_PROMPT_ONLY = re.compile(r"maximum context length is (\d+) tokens\. However, your request has (\d+) input tokens")
# max_tokens check: "'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum
# context length is 8192 tokens and your request has 300 input tokens (8000 > 8192 - 300)."
_MAX_TOKENS = re.compile(r"too large: (\d+)\. This model's maximum context length is (\d+) tokens and your "
                         r"request has (\d+) input tokens")
# older: "... maximum context length is 4096 tokens. However, you requested 5000 tokens
# (4000 in the messages, 1000 in the completion)."
_OLD = re.compile(r"maximum context length is (\d+) tokens\. However, you requested (\d+) tokens "
                  r"\((\d+) in the messages, (\d+) in the completion\)")


@dataclass(frozen=True, slots=True)
class ContextError:
    max_context: int
    prompt_tokens: int
    output_tokens: int
    exact: bool        # False when vLLM stopped counting early ("at least"): a lower bound only


def parse_context_error(body: bytes | str) -> ContextError | None:
    """The counts in a vLLM context-length 400 body (JSON error object or bare text)."""
    if isinstance(body, bytes):
        body = body[:65536].decode("utf-8", "replace")
    m = _NEW.search(body)
    if m:
        return ContextError(int(m[1]), int(m[4]), int(m[2]), exact=m[3] is None)
    m = _OLD.search(body)
    if m:
        return ContextError(int(m[1]), int(m[3]), int(m[4]), exact=True)
    m = _PROMPT_ONLY.search(body)
    if m:
        return ContextError(int(m[1]), int(m[2]), 0, exact=True)
    m = _MAX_TOKENS.search(body)
    if m:
        return ContextError(int(m[2]), int(m[3]), int(m[1]), exact=True)
    return None


def _prompt_tokens(doc: object) -> int | None:
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if isinstance(usage, dict):
        value = usage.get("prompt_tokens", usage.get("input_tokens"))
        if type(value) is int and value > 0:
            return value
    response = doc.get("response")  # /v1/responses stream: {"type": "response.completed", "response": {...}}
    return _prompt_tokens(response) if isinstance(response, dict) else None


def usage_from_json(body: bytes) -> int | None:
    """``usage.prompt_tokens`` of a complete JSON response body."""
    if not body or len(body) > MAX_JSON_BODY or _USAGE_MARK not in body and b'"input_tokens"' not in body:
        return None
    try:
        return _prompt_tokens(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


class SSEUsageScanner:
    """Finds ``usage.prompt_tokens`` in a server-sent-event stream fed chunk by chunk.

    Only lines that contain the usage marker are parsed, and only the unfinished last line is
    kept between chunks, so the cost per chunk is one substring search plus a split.
    """

    __slots__ = ("_tail", "prompt_tokens")

    def __init__(self) -> None:
        self._tail = b""
        self.prompt_tokens: int | None = None

    def feed(self, chunk: bytes) -> int | None:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        data = self._tail + chunk if self._tail else chunk
        nl = data.rfind(b"\n")
        if nl < 0:
            self._tail = data if len(data) <= MAX_SSE_LINE else b""
            return None
        complete, self._tail = data[: nl + 1], data[nl + 1:]
        if len(self._tail) > MAX_SSE_LINE:
            self._tail = b""
        if _USAGE_MARK in complete or b'"input_tokens"' in complete:
            for line in complete.split(b"\n"):
                if line.startswith(b"data:") and (_USAGE_MARK in line or b'"input_tokens"' in line):
                    try:
                        found = _prompt_tokens(orjson.loads(line[5:].strip()))
                    except orjson.JSONDecodeError:
                        continue
                    if found is not None:
                        self.prompt_tokens = found
                        break
        return self.prompt_tokens

    def finish(self) -> int | None:
        if self.prompt_tokens is None and self._tail:
            self.feed(b"\n")
        return self.prompt_tokens


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")
_NOT_USAGE = (b'"choices":[{', b'"choices": [{')


class UsageEventStripper:
    """Removes the usage-only event (``"choices": []`` plus ``usage``) from an SSE stream the
    router asked usage for, and reads ``usage.prompt_tokens`` from it on the way.

    Bytes pass on as soon as they cannot belong to that event: an event is held back only while
    it is still undecided (its ``choices`` not seen yet) or is the usage event itself, so a
    stream cut short never reaches the client with a content event broken by the router.
    """

    __slots__ = ("_pending", "_passing", "_last", "prompt_tokens")

    def __init__(self) -> None:
        self._pending = b""     # the current event's bytes, held back while undecided
        self._passing = False   # the current event is known not to be usage: its bytes flow on
        self._last = b""        # the last bytes passed (an event end can straddle chunks)
        self.prompt_tokens: int | None = None

    def feed(self, chunk: bytes) -> bytes:
        out = []
        data = chunk
        while data:
            if self._passing:
                probe = self._last + data
                m = _EVENT_END.search(probe)
                if m is None:
                    out.append(data)
                    self._last = probe[-3:]
                    break
                cut = m.end() - len(self._last)
                out.append(data[:cut])
                data = data[cut:]
                self._passing, self._last = False, b""
                continue
            self._pending += data
            data = b""
            m = _EVENT_END.search(self._pending)
            if m is not None:  # a whole event: keep it unless it is the usage event
                event, data = self._pending[: m.end()], self._pending[m.end():]
                self._pending = b""
                out.append(self._filter(event))
                continue
            held = self._pending
            starts_like_data = b"data:".startswith(held.lstrip()[:5])  # e.g. not a ": comment" line
            if not starts_like_data or any(mark in held for mark in _NOT_USAGE) or len(held) > MAX_SSE_LINE:
                out.append(held)  # decided: not the usage event
                self._pending, self._passing, self._last = b"", True, held[-3:]
        return b"".join(out)

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return self._filter(rest) if rest else b""

    def _filter(self, event: bytes) -> bytes:
        if _USAGE_MARK not in event:
            return event
        payload = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict):
            found = _prompt_tokens(doc)
            if found is not None:
                self.prompt_tokens = found
            return b""  # the client did not ask for this event
        return event


def with_stream_usage(body: bytes) -> bytes | None:
    """The body with ``stream_options.include_usage: true`` added, when it is a streaming request
    that did not ask for usage; None when there is nothing to add (or the body is not readable)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return None
    opts = doc.get("stream_options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict) or opts.get("include_usage") is True or opts.get("continuous_usage_stats"):
        return None  # (with continuous stats, usage would ride on every chunk: not strippable)
    doc["stream_options"] = {**opts, "include_usage": True}
    return orjson.dumps(doc)
