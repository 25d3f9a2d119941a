"""Special-token strings typed as text: vLLM tokenizes the rendered prompt with special tokens
parsed, so ``<|eot_id|>`` in a user's content is ONE token for Llama-3 (17–28 bytes of letters
and punctuation that the byte-class features would count as seven or more), and ``<think>`` is
one for Qwen3. Each family's strings come from its tokenizer's added tokens (priors.json,
written by benchmarks/fit_priors.py); a request's occurrences are counted and cut out of the
text before its features are measured, so such text is neither over-estimated on the request
path nor a lever on the learned scales (the calibrator learns their rate as a group of its own).

Bounded work: one regular expression whose candidates have the shape of the family's tokens
(``<|…|>`` up to 64 characters, or the family's few other literals), so text without them costs
one scan at C speed, and each candidate a set lookup.
"""

from __future__ import annotations

import re
from typing import Iterable

_PIPE_INNER = r"\|[^<>|\s]{1,64}\|"
_PIPE = re.compile(f"<{_PIPE_INNER}>")


class SpecialTokens:
    """The strings one tokenizer family encodes as a single token each."""

    __slots__ = ("tokens", "_pattern")

    def __init__(self, tokens: Iterable[str]) -> None:
        self.tokens = frozenset(t for t in tokens if t)
        pipe = any(_PIPE.fullmatch(t) for t in self.tokens)
        others = sorted((t for t in self.tokens if not _PIPE.fullmatch(t)), key=len, reverse=True)
        if all(t[0] == "<" and t[-1] == ">" for t in others):  # one literal prefix: the fastest scan
            inner = ([_PIPE_INNER] if pipe else []) + [re.escape(t[1:-1]) for t in others]
            self._pattern = re.compile(f"<(?:{'|'.join(inner)})>") if inner else None
        else:
            parts = ([_PIPE.pattern] if pipe else []) + [re.escape(t) for t in others]
            self._pattern = re.compile("|".join(parts))

    def __bool__(self) -> bool:
        return self._pattern is not None

    def split(self, text: str) -> tuple[str, int]:
        """The text with every special-token string cut out, and how many there were."""
        if self._pattern is None or "<" not in text:  # (a memchr: most text has no "<" at all)
            return text, 0
        found = [m.span() for m in self._pattern.finditer(text) if m.group() in self.tokens]
        if not found:
            return text, 0
        pieces, at = [], 0
        for start, end in found:
            pieces.append(text[at:start])
            at = end
        pieces.append(text[at:])
        # joined by a control character: a class of its own to the features, so the text on either
        # side is measured as the separate pieces the tokenizer sees, not as one merged word
        return "\x00".join(pieces), len(found)


NONE = SpecialTokens(())
