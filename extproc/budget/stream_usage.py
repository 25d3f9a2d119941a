"""Usage a streaming client did not ask for: ``with_stream_usage`` asks vLLM for it
(``stream_options.include_usage``) and ``UsageEventStripper`` takes that event out of the stream
again before the client sees it. Body rewriting only: what the response says is read by
``extproc.budget.response``. Pure functions and a small incremental filter: no I/O.
"""

from __future__ import annotations

import re

import orjson

from .response import MAX_SSE_LINE

_USAGE_MARK = b'"usage"'

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")
_NOT_USAGE = (b'"choices":[{', b'"choices": [{')


class UsageEventStripper:
    """Removes the usage-only event (``"choices": []`` plus ``usage``) from an SSE stream the
    router asked usage for.

    Bytes pass on as soon as they cannot belong to that event: an event is held back only while
    it is still undecided (its ``choices`` not seen yet) or is the usage event itself, so a
    stream cut short never reaches the client with a content event broken by the router.
    """

    __slots__ = ("_pending", "_passing", "_last")

    def __init__(self) -> None:
        self._pending = b""     # the current event's bytes, held back while undecided
        self._passing = False   # the current event is known not to be usage: its bytes flow on
        self._last = b""        # the last bytes passed (an event end can straddle chunks)

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
