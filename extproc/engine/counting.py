"""The engine's one seam to a tokenizer: the prompt counts of a request body, vLLM's way.

``counter_for(spec, served_model)`` picks the tokenizer (``--tokenizer FAMILY|DIR``, else the family
of the served model name) and wraps ``extproc.tokens``' exact counter (the model's own Jinja template
over its tokenizer.json). ``count_request(api, body, stop_after=window)`` gives one ``Counted`` per
prompt the engine runs. With ``stop_after`` the counter applies vLLM 0.32's own bounds: text longer
than ``window x max_chars_per_token`` characters is refused before it is tokenized, and a text prompt
over the window is reported as ``window + 1`` tokens ("at least"), as vLLM tokenizes only that far.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any

from extproc.engine.errors import RequestError
from extproc.tokens.files import family_for_model

FAMILIES = ("llama3", "llama3_1", "qwen3")

# Wall time one chat-template render may take. vLLM has no such limit; the counter's default (2 s)
# guards untrusted templates, and a 64K-token chat on a busy two-core machine can take longer than
# that, which would turn a request vLLM serves into a 400.
RENDER_TIMEOUT_S = 60.0

# A default `vllm serve` has no tool-call parser and refuses tools with tool_choice "auto"; the
# simulated engine serves like one started with --enable-auto-tool-choice and the family's parser.
_TOOL_PARSER = {"llama3": "llama3_json", "llama3_1": "llama3_json", "qwen3": "hermes"}

_TOO_MANY_TOKENS = re.compile(r"^This model's maximum context length is \d+ tokens\. However, your prompt "
                              r"contains (at least )?(\d+) input tokens")
_TOO_MANY_CHARS = re.compile(r"^This model's maximum context length is \d+ tokens\. However, your prompt "
                             r"contains (\d+) characters \(more than")
_OUTPUT = re.compile(r"^(\w+)=(\d+) cannot be greater than max_model_len=")
_NO_ROOM = "max_tokens must be at least 1, got 0."  # the prompt fills the window


@dataclass(frozen=True)
class Counted:
    tokens: int | None  # None: not tokenized (longer than any window-sized prompt); window + 1: stopped there
    chars: int          # characters of the rendered prompt text (0 for token ids)
    ids: bool = False   # a prompt of token ids: counted exactly, never stopped early




class TokenizerCounter:
    """``extproc.tokens.TokenCounter`` behind the engine's seam: its 400s carry vLLM's param/value."""

    def __init__(self, counter: Any, family: str) -> None:
        self._c = counter
        self.family = family
        self.max_chars_per_token = counter.max_chars_per_token
        self._tools = dict(enable_auto_tool_choice=True, tool_call_parser=_TOOL_PARSER.get(family, "hermes"))

    def count_request(self, api: str, body: dict, *, stop_after: int | None = None) -> list[Counted]:
        """One count per prompt of ``body`` (already field-checked by ``requests``) on ``api``."""
        try:
            if api == "chat" and stop_after is not None:
                chars = self._chat_chars(body, stop_after * self.max_chars_per_token)
                if chars is not None:  # vLLM checks the rendered text's length before tokenizing it
                    return [Counted(None, chars)]
            counts = self._c.count_request(api, body, max_model_len=stop_after, **self._tools)
        except ValueError as exc:  # TemplateError is one
            raise self._refusal(str(exc)) from None
        if api != "completions":
            return [Counted(n, 0) for n in counts]
        prompt = body["prompt"]
        prompts = [prompt] if isinstance(prompt, str) or not isinstance(prompt[0], (str, list)) else prompt
        return [Counted(n, len(p)) if isinstance(p, str) else Counted(n, 0, True) for n, p in zip(counts, prompts)]

    def _chat_chars(self, body: dict, bound: int) -> int | None:
        """Characters of the rendered chat when they exceed ``bound``, else None. Rendered only when
        the body's text could reach the bound (the template adds at most a few KB)."""
        if _text_chars(body) + 256 * len(body["messages"]) + 16_384 <= bound:
            return None
        from extproc.tokens import normalize_tools

        tools = normalize_tools(body.get("tools"), allow_empty=True) if body.get("tools") is not None else None
        chars = len(self._c.render_chat(body["messages"], tools, True, body.get("chat_template_kwargs")))
        return chars if chars > bound else None

    @staticmethod
    def _refusal(message: str) -> RequestError:
        # the window checks vLLM makes while rendering: VLLMValidationErrors with param and value
        if m := _TOO_MANY_TOKENS.match(message):
            return RequestError(message, param="input_tokens", value=int(m[2]), reason="context_length")
        if m := _TOO_MANY_CHARS.match(message):
            return RequestError(message, param="input_text", value=int(m[1]), reason="context_length")
        if m := _OUTPUT.match(message):
            return RequestError(message, param=m[1], value=int(m[2]), reason="context_length")
        if message == _NO_ROOM:
            return RequestError(message, param="max_tokens", value=0, reason="context_length")
        return RequestError(message)

    def encode_chat(self, body: dict) -> list[int]:
        """Token ids of /tokenize's chat: the rendered prompt, special tokens parsed, none added."""
        from extproc.tokens import normalize_tools

        tools = normalize_tools(body.get("tools"), allow_empty=True) if body.get("tools") is not None else None
        text = self._c.render_chat(body["messages"], tools, body.get("add_generation_prompt", True),
                                   body.get("chat_template_kwargs"))
        return self._c.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._c.encode(text, add_special_tokens=add_special_tokens)


def _text_chars(value: Any) -> int:
    """Characters of every string in a parsed JSON value (iterative: bodies can nest deeply)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
            total += sum(len(k) for k in v)
        elif isinstance(v, list):
            stack.extend(v)
    return total


def counter_for(spec: str | None, served_model: str) -> TokenizerCounter:
    """The counter the engine uses: ``spec`` is a family name or a directory holding tokenizer.json and
    tokenizer_config.json, or None to choose by the served model name (llama-3.1 → llama3_1,
    llama-3 → llama3, qwen → qwen3). Raises ValueError for an unknown family."""
    spec = spec or family_for_model(served_model)
    if not os.path.isdir(spec) and spec not in FAMILIES:
        raise ValueError(f"unknown tokenizer {spec!r}: a family ({', '.join(FAMILIES)}) or a directory")
    return _counter(os.path.abspath(spec) if os.path.isdir(spec) else spec)


@functools.cache
def _counter(spec: str) -> TokenizerCounter:
    from extproc.tokens import TokenCounter

    if os.path.isdir(spec):
        return TokenizerCounter(TokenCounter.from_dir(spec, render_timeout=RENDER_TIMEOUT_S), family_for_model(spec))
    from extproc.tokens.files import family_dir

    return TokenizerCounter(TokenCounter.from_dir(family_dir(spec), name=spec, family=spec,
                                                  render_timeout=RENDER_TIMEOUT_S), spec)
