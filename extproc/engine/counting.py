"""The engine's one seam to a tokenizer: the prompt counts of a request body, vLLM's way.

``counter_for(spec, served_model)`` picks the family (``--tokenizer FAMILY|DIR``, else from the served
model name); ``count_request(api, body, stop_after=window)`` gives one ``Counted`` per prompt the
engine runs, as ``extproc.tokens.TokenCounter.count_request`` does. Every count is linear in the prompt: the rendered prompt is split on special tokens (each
one token, as vLLM parses them) and the text between them BPE-encoded on its own, stopping once the
count passes ``stop_after`` (vLLM tokenizes a text prompt only to window + 1 tokens). Text longer
than ``stop_after x max_chars_per_token`` characters is not tokenized at all: vLLM refuses it first.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from extproc import chat_tokens
from extproc.engine import convert

FAMILIES = ("llama3", "llama3_1", "qwen3")


class TemplateError(ValueError):
    """The chat template cannot render these messages (vLLM answers 400)."""


@dataclass(frozen=True)
class Counted:
    tokens: int | None  # None: not tokenized (longer than any window-sized prompt); window + 1: stopped there
    chars: int          # characters of the rendered prompt text (0 for token ids)
    ids: bool = False   # a prompt of token ids: counted exactly, never stopped early


def family_for_model(model: str) -> str:
    m = model.lower()
    if "qwen" in m:
        return "qwen3"
    if re.search(r"llama-?3[._]([1-9])", m):
        return "llama3_1"
    return "llama3"


class LegacyCounter:
    """Counts over ``extproc.chat_tokens`` (quicktok BPE, templates written out in Python) until the
    exact counter (``extproc.tokens``: the models' own Jinja templates and tokenizer.json) replaces it."""

    max_chars_per_token = 128  # longest entry of the Llama-3 and Qwen3 vocabularies (vLLM's bound)

    def __init__(self, family: str) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown tokenizer family {family!r}; known: {', '.join(FAMILIES)}")
        self.family = family
        self._base = "qwen3" if family == "qwen3" else "llama3"

    @functools.cached_property
    def _encoding(self):
        import quicktok

        return quicktok.get_encoding(self._base)

    @functools.cached_property
    def _special(self) -> re.Pattern:
        names = sorted(self._encoding.special_tokens_set, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names)))

    def render_chat(self, messages: list, tools: list | None = None) -> str:
        if not all(isinstance(m, dict) for m in messages):
            raise TemplateError("each message must be an object")
        try:
            if self.family != "llama3_1":
                return chat_tokens.render_chat(messages, self._base, tools or None)
            # Llama-3.1's template always opens with a dated system block (+25 tokens on every request)
            system = ""
            if messages and messages[0].get("role") == "system":
                system = chat_tokens._content_text(messages[0].get("content")).strip()
                messages = messages[1:]
            rest = chat_tokens.render_chat(messages, "llama3", tools or None)
        except (AttributeError, TypeError) as exc:
            raise TemplateError(str(exc)) from None
        bos = "<|begin_of_text|>"
        block = ("<|start_header_id|>system<|end_header_id|>\n\n" + ("Environment: ipython\n" if tools else "")
                 + "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + system + "<|eot_id|>")
        return bos + block + rest[len(bos):]

    def count_request(self, api: str, body: dict, *, stop_after: int | None = None) -> list[Counted]:
        """One count per prompt of ``body`` (already validated by ``requests``) on ``api``."""
        if api == "chat":
            return [self.count_chat(body["messages"], body.get("tools") or None, stop_after=stop_after)]
        if api == "responses":
            return [self.count_chat(convert.responses_to_chat(body), convert.responses_tools(body),
                                    stop_after=stop_after)]
        if api == "messages":
            return [self.count_chat(*convert.anthropic_to_chat(body), stop_after=stop_after)]
        if api == "completions":
            prompt = body["prompt"]
            prompts = [prompt] if isinstance(prompt, str) or not isinstance(prompt[0], (str, list)) else prompt
            return [self.count_prompt(p, stop_after=stop_after) if isinstance(p, str) else Counted(len(p), 0, True)
                    for p in prompts]
        raise ValueError(f"unknown api {api!r}")

    def count_chat(self, messages: list, tools: list | None = None, *, stop_after: int | None = None) -> Counted:
        return self._count(self.render_chat(messages, tools), stop_after)

    def count_prompt(self, text: str, *, stop_after: int | None = None) -> Counted:
        bos = "<|begin_of_text|>" if self._base == "llama3" else ""
        counted = self._count(bos + text, stop_after)
        return Counted(counted.tokens, len(text))

    def encode_chat(self, messages: list, tools: list | None = None) -> list[int]:
        return self._encode(self.render_chat(messages, tools))

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        bos = "<|begin_of_text|>" if add_special_tokens and self._base == "llama3" else ""
        return self._encode(bos + text)

    def _count(self, text: str, stop_after: int | None) -> Counted:
        if stop_after is not None and len(text) > stop_after * self.max_chars_per_token:
            return Counted(None, len(text))
        total = 0
        for piece, special in self._pieces(text):
            total += 1 if special else len(self._encoding.encode_ordinary(piece))
            if stop_after is not None and total > stop_after:
                return Counted(stop_after + 1, len(text))
        return Counted(total, len(text))

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, special in self._pieces(text):
            ids += [self._encoding.encode_single_token(piece)] if special else self._encoding.encode_ordinary(piece)
        return ids

    def _pieces(self, text: str):
        """(text, is_special) in order, special tokens parsed wherever they appear (as vLLM does, also
        in a completion prompt); linear in len(text) whatever the number of special tokens."""
        pos = 0
        for m in self._special.finditer(text):
            if m.start() > pos:
                yield text[pos:m.start()], False
            yield m.group(), True
            pos = m.end()
        if pos < len(text):
            yield text[pos:], False


def counter_for(spec: str | None, served_model: str) -> Any:
    """The counter the engine uses: ``spec`` is a family name or a tokenizer directory, or None to
    choose by the served model name (llama-3.1 → llama3_1, llama-3 → llama3, qwen → qwen3)."""
    family = spec or family_for_model(served_model)
    return LegacyCounter(family)
