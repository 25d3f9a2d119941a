"""Which vLLM release the engine answers as: the context-window rules and wordings that changed.

The checks themselves follow vLLM 0.32's renderer (``vllm/renderers/params.py``): a text prompt is
tokenized only to window + 1 tokens, so its 400 says "at least"; token ids get the exact count; text
longer than ``window x max_chars_per_token`` characters is refused before tokenizing. From 0.32 a
prompt that fits while prompt + max_tokens does not is served with max_tokens clamped to what fits.
Older releases refused that with a 400 worded as below (``NOTES.md``, "vLLM behaviour").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from extproc.engine.errors import RequestError

SUPPORTED = ("0.11", "0.25", "0.32", "0.33")


@dataclass(frozen=True)
class VllmVersion:
    release: str  # what /version answers, e.g. "0.32.0"

    @classmethod
    def parse(cls, text: str) -> VllmVersion:
        """``0.32``, ``v0.32.0``, ``0.11.2``...: any release from 0.11 on (the wordings differ by era)."""
        m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
        if not m or (int(m[1]), int(m[2])) < (0, 11):
            raise ValueError(f"vLLM version must look like 0.32 or v0.32.0 (0.11 or later), got {text!r}")
        return cls(f"{int(m[1])}.{int(m[2])}.{int(m[3] or 0)}")

    @property
    def minor(self) -> tuple[int, int]:
        major, minor, _ = self.release.split(".")
        return int(major), int(minor)

    @property
    def clamps_max_tokens(self) -> bool:
        """0.32+: prompt + max_tokens over the window is served with max_tokens clamped, not refused."""
        return self.minor >= (0, 32)

    def check_prompt(self, prompt_tokens: int, requested: int | None, window: int, *, exact: bool) -> None:
        """Raise the 400 this release answers for a prompt of ``prompt_tokens`` (``exact`` False when
        counting stopped at window + 1). Only the prompt-too-long cases; see ``check_output``."""
        if self.clamps_max_tokens:
            if prompt_tokens > window:
                qualifier = "at least " if prompt_tokens == window + 1 else ""
                raise RequestError(
                    f"This model's maximum context length is {window} tokens. However, your prompt contains "
                    f"{qualifier}{prompt_tokens} input tokens, which exceeds this limit even without any output "
                    "tokens. Please reduce the length of the input prompt.",
                    param="input_tokens", value=prompt_tokens, reason="context_length")
            return
        output = requested or 0
        if prompt_tokens >= window or prompt_tokens + output > window:
            raise RequestError(self._old_wording(prompt_tokens, requested, window, exact),
                               param="input_tokens" if prompt_tokens >= window else None,
                               reason="context_length", suffix=False)

    def _old_wording(self, prompt: int, requested: int | None, window: int, exact: bool) -> str:
        output = requested or 0
        if self.minor >= (0, 20):
            least = "" if exact else "at least "
            return (f"This model's maximum context length is {window} tokens. However, you requested {output} "
                    f"output tokens and your prompt contains {least}{prompt} input tokens, for a total of "
                    f"{least}{prompt + output} tokens. Please reduce the length of the input prompt or the "
                    "number of requested output tokens.")
        if requested is None:
            return (f"This model's maximum context length is {window} tokens. However, you requested {prompt} "
                    "tokens in the messages, Please reduce the length of the messages.")
        return (f"This model's maximum context length is {window} tokens. However, you requested {prompt + output} "
                f"tokens ({prompt} in the messages, {output} in the completion). Please reduce the length of "
                "the messages or completion.")

    def check_text_length(self, chars: int, window: int, max_chars_per_token: int) -> None:
        """0.32+: text longer than any ``window``-token prompt could be is refused untokenized."""
        bound = window * max_chars_per_token
        if self.clamps_max_tokens and chars > bound:
            raise RequestError(
                f"This model's maximum context length is {window} tokens. However, your prompt contains "
                f"{chars} characters (more than {bound} characters, which is the upper bound for {window} "
                "input tokens). Please reduce the length of the input prompt.",
                param="input_text", value=chars, reason="context_length")

    def check_requested(self, requested: int | None, param: str, window: int) -> None:
        """0.32+: max_tokens over the whole window is refused before the prompt is rendered."""
        if self.clamps_max_tokens and requested is not None and requested > window:
            raise RequestError(f"{param}={requested} cannot be greater than max_model_len={window}. "
                               "Please request fewer output tokens.", param=param, value=requested,
                               reason="context_length")

    def output_limit(self, prompt_tokens: int, requested: int | None, window: int) -> int | None:
        """The max_tokens vLLM samples with (None: none given, the room is the limit). Raises vLLM's
        "max_tokens must be at least 1" when nothing is left (0.32: the prompt fills the window)."""
        room = window - prompt_tokens
        limit = room if requested is None else min(requested, room) if self.clamps_max_tokens else requested
        if limit < 1:
            raise RequestError(f"max_tokens must be at least 1, got {limit}.", param="max_tokens", value=limit,
                               reason="context_length" if requested is None or requested >= 1 else "bad_request")
        return limit
