"""What a vLLM response says about the request that caused it: one pure reader, fed the status,
the content type and the body bytes as they pass (JSON or server-sent events, in chunks split
anywhere), and one judge that tells a misroute from its facts and the pool it was sent to.

The reader knows every release's way of saying it (real bytes: ``shared/data/vllm``):

* ``usage.prompt_tokens`` (chat, completions) or ``usage.input_tokens`` (``/v1/responses``,
  ``/v1/messages``: plus its ``cache_*_input_tokens``, which Anthropic's count leaves out), in a
  JSON body or in a stream's usage event (``message_start`` and ``message_delta`` for Messages);
* a context-length 400 in each wording from vLLM 0.11 to 0.33 (OpenAI's error envelope, or
  Anthropic's ``{"type": "error", "error": {...}}`` on ``/v1/messages``), with the count it states and
  whether that count is exact (0.32+ tokenizes a text prompt only to window + 1 and says
  "at least"; a very long text gets a character count and no token count at all);
* the 0.32+ ``max_tokens`` 400s: "must be at least 1, got 0" (the prompt fills the window) and
  "cannot be greater than max_model_len";
* how the output ended: ``finish_reason: "length"``, a Responses ``incomplete`` for
  ``max_output_tokens``, an Anthropic ``stop_reason: "max_tokens"``; in a stream without usage,
  the chunks of the first choice (vLLM sends one per generated token).

No I/O, no protobuf, no prompt text: a body is bytes in, ``ResponseFacts`` out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

MAX_JSON_BODY = 4 << 20     # a JSON body larger than this is not read (usage sits at its end)
MAX_SSE_LINE = 1 << 20      # an SSE line longer than this is dropped, not buffered
MAX_ERROR_TEXT = 64 << 10   # an error message is read from at most this much of the body

# Misroute kinds: a bounded metric label. The first three are vLLM's 400s, the last its 0.32+
# silent clamp of the output (a 200 cut short by the window).
PROMPT_OVER_WINDOW = "prompt_over_window"
PROMPT_FILLS_WINDOW = "prompt_fills_window"
OUTPUT_OVER_WINDOW = "output_over_window"
OUTPUT_CLAMPED = "output_clamped"
MISROUTE_KINDS = (PROMPT_OVER_WINDOW, PROMPT_FILLS_WINDOW, OUTPUT_OVER_WINDOW, OUTPUT_CLAMPED)
OTHER_ERROR = "other"

_CTX = r"maximum context length is (?P<window>\d+) tokens"
_ERRORS: tuple[tuple[re.Pattern, str | None], ...] = (
    # 0.32+: "... However, your prompt contains at least 8193 input tokens, which exceeds this
    # limit even without any output tokens." (exact for token-id prompts: "contains 9000 input")
    (re.compile(_CTX + r"\. However, your prompt contains (?P<atleast>at least )?(?P<prompt>\d+) input tokens"),
     PROMPT_OVER_WINDOW),
    # 0.32+, very long text: "... your prompt contains 1200115 characters (more than 1048576
    # characters, which is the upper bound for 8192 input tokens)": no token count at all
    (re.compile(_CTX + r"\. However, your prompt contains (?P<chars>\d+) characters"), PROMPT_OVER_WINDOW),
    # ~0.20-0.31: "... However, you requested 64 output tokens and your prompt contains (at
    # least) 10000 input tokens, for a total of (at least) 10064 tokens."
    (re.compile(_CTX + r"\. However, you requested (?P<output>\d+) output tokens and your prompt contains "
                       r"(?P<atleast>at least )?(?P<prompt>\d+) input tokens"), None),
    # 0.11 and older: "... However, you requested 5000 tokens (4000 in the messages, 1000 in
    # the completion)."
    (re.compile(_CTX + r"\. However, you requested \d+ tokens \((?P<prompt>\d+) in the messages, "
                       r"(?P<output>\d+) in the completion\)"), None),
    # between those: "... However, your request has 9000 input tokens."
    (re.compile(_CTX + r"\. However, your request has (?P<prompt>\d+) input tokens"), PROMPT_OVER_WINDOW),
    # the max_tokens check of those releases: "'max_tokens' or 'max_completion_tokens' is too
    # large: 8000. This model's maximum context length is 8192 tokens and your request has 300
    # input tokens (8000 > 8192 - 300)."
    (re.compile(r"too large: (?P<output>\d+)\. This model's " + _CTX + r" and your request has "
                r"(?P<prompt>\d+) input tokens"), OUTPUT_OVER_WINDOW),
    # 0.32+: the window left no room for output (prompt == window)
    (re.compile(r"max_(?:completion_)?tokens must be at least 1, got 0\b"), PROMPT_FILLS_WINDOW),
    # 0.32+: "max_tokens=9000 cannot be greater than max_model_len=8192"; named
    # max_completion_tokens where the request set that (/v1/messages sets both)
    (re.compile(r"max_(?:completion_)?tokens=(?P<output>\d+) cannot be greater than "
                r"max_model_len=(?P<window>\d+)"), OUTPUT_OVER_WINDOW),
)


@dataclass(frozen=True, slots=True)
class ResponseFacts:
    """What one response told. Counts are None where the response did not say."""

    status: int
    streamed: bool = False
    prompt_tokens: int | None = None      # usage, or the count a context-length 400 states
    prompt_exact: bool = False            # False: a lower bound ("at least", a character count)
    completion_tokens: int | None = None  # usage; in a stream without usage, first-choice chunks
    finish_length: bool = False           # an output ended by its length limit
    error: str | None = None              # a 400's kind: one of MISROUTE_KINDS[:3], or OTHER_ERROR
    window: int | None = None             # the max_model_len a 400 states
    requested_output: int | None = None   # the output a 400 says was asked for
    complete: bool = True                 # False: the body was cut short or over the read limit


@dataclass(frozen=True, slots=True)
class Misroute:
    kind: str                  # one of MISROUTE_KINDS
    prompt_tokens: int | None  # the prompt's true count, where the response tells it
    exact: bool                # prompt_tokens is exact (else a lower bound)


def parse_error(status: int, body: bytes | str) -> ResponseFacts:
    """The facts of an error response: its kind, and the counts a context-length 400 states."""
    text = body[:MAX_ERROR_TEXT].decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
    message = _error_message(text)
    if status == 400:
        for pattern, kind in _ERRORS:
            m = pattern.search(message)
            if m is None:
                continue
            g = m.groupdict()
            window = int(g["window"]) if g.get("window") else None
            prompt = int(g["prompt"]) if g.get("prompt") else None
            exact = prompt is not None and not g.get("atleast")
            if g.get("chars") and window is not None:
                prompt = window + 1  # over the window, by how much vLLM did not count
            output = int(g["output"]) if g.get("output") else None
            if kind is None:  # the older wordings cover both cases: the prompt alone, or with output
                kind = PROMPT_OVER_WINDOW if prompt is not None and window is not None and prompt >= window \
                    else OUTPUT_OVER_WINDOW
            return ResponseFacts(status, prompt_tokens=prompt, prompt_exact=exact, error=kind, window=window,
                                 requested_output=output)
    return ResponseFacts(status, error=OTHER_ERROR)


def _error_message(text: str) -> str:
    """The message of vLLM's error envelope (nested ``{"error": {...}}`` since ~0.20, flat
    before), or the text itself when it is not that JSON."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if isinstance(doc, dict):
        inner = doc.get("error")
        if isinstance(inner, dict):
            doc = inner
        message = doc.get("message")
        if isinstance(message, str):
            return message
    return text


_ANTHROPIC_CACHE_KEYS = ("cache_read_input_tokens", "cache_creation_input_tokens")


def _usage_counts(doc: object) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of a usage-carrying object: chat/completions ``usage``, the
    Responses API's ``response.usage`` (stream events wrap it), Anthropic's ``message.usage``."""
    if not isinstance(doc, dict):
        return None, None
    usage = doc.get("usage")
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        if "prompt_tokens" not in usage and type(prompt) is int:
            # Anthropic's input_tokens leave out the cached prompt: vLLM 0.32 subtracts the
            # cache_read/cache_creation counts it reports beside it (anthropic/serving.py)
            for key in _ANTHROPIC_CACHE_KEYS:
                cached = usage.get(key)
                prompt += cached if type(cached) is int and cached > 0 else 0
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        return (prompt if type(prompt) is int and prompt > 0 else None,
                completion if type(completion) is int and completion >= 0 else None)
    for key in ("response", "message"):
        inner = doc.get(key)
        if isinstance(inner, dict):
            return _usage_counts(inner)
    return None, None


def _ended_by_length(doc: object) -> bool:
    if not isinstance(doc, dict):
        return False
    choices = doc.get("choices")
    if isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") == "length" for c in choices):
        return True
    details = doc.get("incomplete_details")
    if isinstance(details, dict) and details.get("reason") == "max_output_tokens":
        return True
    delta = doc.get("delta")  # Anthropic message_delta
    if doc.get("stop_reason") == "max_tokens" or isinstance(delta, dict) and delta.get("stop_reason") == "max_tokens":
        return True
    inner = doc.get("response")
    return isinstance(inner, dict) and _ended_by_length(inner)


_USAGE_MARKS = (b'"prompt_tokens"', b'"input_tokens"')
_LENGTH_MARKS = (b'"length"', b'"max_output_tokens"', b'"max_tokens"')
# a stream chunk of the first choice (vLLM serialises without spaces; the role-only opening
# chunk of a chat stream carries no token)
_FIRST_CHOICE = b'"choices":[{"index":0,'
_ROLE_ONLY = b'"delta":{"role":"assistant","content":""}'


class ResponseReader:
    """Reads one response as its body passes: ``feed`` chunks, then ``finish`` for the facts.

    Bounded: a JSON body is kept up to ``MAX_JSON_BODY``; a stream keeps only its unfinished
    last line, and parses only the lines that can carry usage or a length finish."""

    __slots__ = ("status", "streamed", "_parts", "_size", "_tail", "_prompt", "_completion",
                 "_length", "_chunks", "_over")

    def __init__(self, status: int, content_type: str = "") -> None:
        self.status = status
        self.streamed = "text/event-stream" in content_type
        self._parts: list[bytes] = []
        self._size = 0
        self._tail = b""
        self._prompt: int | None = None
        self._completion: int | None = None
        self._length = False
        self._chunks = 0
        self._over = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if not self.streamed or self.status != 200:
            if self._size + len(chunk) <= MAX_JSON_BODY:
                self._parts.append(chunk)
                self._size += len(chunk)
            else:
                self._over = True
            return
        data = self._tail + chunk if self._tail else chunk
        nl = data.rfind(b"\n")
        if nl < 0:
            self._tail = data if len(data) <= MAX_SSE_LINE else b""
            return
        complete, self._tail = data[: nl + 1], data[nl + 1:]
        if len(self._tail) > MAX_SSE_LINE:
            self._tail = b""
        for line in complete.split(b"\n"):
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        if _FIRST_CHOICE in line and _ROLE_ONLY not in line:
            self._chunks += 1
        if not any(m in line for m in _USAGE_MARKS) and not any(m in line for m in _LENGTH_MARKS):
            return
        try:
            doc = orjson.loads(line[5:].strip())
        except orjson.JSONDecodeError:
            return
        prompt, completion = _usage_counts(doc)
        if prompt is not None:
            self._prompt = prompt
        if completion is not None:
            self._completion = completion
        self._length = self._length or _ended_by_length(doc)

    @property
    def prompt_tokens(self) -> int | None:
        """The usage count seen so far (streams)."""
        return self._prompt

    def finish(self) -> ResponseFacts:
        if self.status != 200:
            return parse_error(self.status, b"".join(self._parts))
        if self.streamed:
            if self._tail:
                self._line(self._tail)
                self._tail = b""
            completion = self._completion if self._completion is not None else self._chunks
            return ResponseFacts(200, True, self._prompt, self._prompt is not None, completion, self._length,
                                 complete=not self._over)
        if self._over:
            return ResponseFacts(200, complete=False)
        try:
            doc = orjson.loads(b"".join(self._parts)) if self._parts else None
        except orjson.JSONDecodeError:
            return ResponseFacts(200, complete=False)
        prompt, completion = _usage_counts(doc)
        return ResponseFacts(200, False, prompt, prompt is not None, completion, _ended_by_length(doc))


def read_response(status: int, content_type: str, body: bytes) -> ResponseFacts:
    """The facts of a whole response."""
    reader = ResponseReader(status, content_type)
    reader.feed(body)
    return reader.finish()


def judge(facts: ResponseFacts, capacity: int, requested_output: int | None,
          prompts: int = 1) -> Misroute | None:
    """Whether a response shows that its request did not fit the pool it was sent to.

    ``capacity`` is that pool's context (vLLM's max_model_len); ``requested_output`` what the
    request asked for (``max_tokens`` and its kin; None when it named none); ``prompts`` how many
    sequences share the usage count (a batched completion sums them: no per-prompt clamp)."""
    if facts.error == PROMPT_FILLS_WINDOW:
        if requested_output == 0:
            return None  # the client asked for no output: its own 400, not the pool's
        return Misroute(PROMPT_FILLS_WINDOW, capacity, True)  # no room left: the prompt is the window
    if facts.error in (PROMPT_OVER_WINDOW, OUTPUT_OVER_WINDOW):
        return Misroute(facts.error, facts.prompt_tokens, facts.prompt_exact)
    if facts.status != 200 or prompts != 1:
        return None
    prompt = facts.prompt_tokens if facts.prompt_exact else None
    if requested_output:
        if prompt is not None:
            # vLLM 0.32+ clamps max_tokens to the room left and answers 200 (older releases: a 400)
            return Misroute(OUTPUT_CLAMPED, prompt, True) if prompt + requested_output > capacity else None
        # a stream without usage: it ended by length before the tokens it asked for
        if facts.streamed and facts.finish_length and facts.completion_tokens is not None \
                and facts.completion_tokens < requested_output:
            return Misroute(OUTPUT_CLAMPED, None, False)
        return None
    # no output limit asked: vLLM lets it run to the window, and says so when it got there
    if prompt is not None and facts.finish_length and facts.completion_tokens is not None \
            and prompt + facts.completion_tokens >= capacity:
        return Misroute(OUTPUT_CLAMPED, prompt, True)
    return None
