"""The local exact source: the model's own chat template over its tokenizer, in the router.

Counting goes through ``extproc.tokens`` (vLLM's preprocessing and template, exactly). For the
built-in families the BPE runs on quicktok rather than Hugging Face ``tokenizers``: 30x faster
(32 KB of text, an 8K-token prompt, in ~0.4 ms instead of ~13 ms). The text is cut at the
tokenizer's own added tokens (Hugging Face's list, so special-token strings typed in a message
count exactly as vLLM counts them) and only the pieces between go to quicktok. quicktok merges by
token rank, Hugging Face by its merge list, and for Llama 3 the two orders differ (" rahati": 2
tokens against 3); their Unicode tables differ too (CJK extension J is a letter to quicktok
only). precise.py checks each adjacent pair of tokens against Hugging Face's BPE and counts
again on Hugging Face only the words where they part: the count is Hugging Face's, at about 2x
quicktok's cost once a text's pairs are known. A tokenizer given by path has no quicktok twin:
``tokenizers`` counts it, exactly and slower (keep ``local.max_bytes`` small for it, or name a
pool).

Counters load in a worker thread on first use (a tokenizer.json takes ~0.5 s, a built-in family
may first be fetched into the cache); until then the source answers "unavailable".
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from ..tokens import TokenCounter, counter_for, family_for_model
from .settings import ExactRule

log = logging.getLogger("extproc.exact")

# built-in family -> quicktok encoding with the same vocabulary and merges
QUICK_ENCODINGS = {"llama3": "llama3", "llama3_1": "llama3", "qwen3": "qwen3"}
RETRY_S = 60.0  # a counter that failed to load is tried again after this long


class _Ids:
    __slots__ = ("ids",)

    def __init__(self, n: int) -> None:
        self.ids = range(n)  # only the length is ever read: no list of ids is built


class _QuickTokens:
    """Stands in for a counter's Hugging Face tokenizer: the text is cut at the tokenizer's added
    tokens (one token each), the pieces between are counted by ``quick`` (precise.PreciseQuick)."""

    def __init__(self, hf, quick, added: tuple[str, ...]) -> None:
        self._q = quick  # anything with count_pieces(texts) -> int
        self._cut = re.compile("|".join(re.escape(s) for s in sorted(added, key=len, reverse=True)))
        self._bos = len(hf.encode("", add_special_tokens=True).ids)  # what the post-processor adds

    def encode(self, text: str, add_special_tokens: bool = False) -> _Ids:
        pieces, last, added = [], 0, 0
        for m in self._cut.finditer(text):
            if m.start() > last:
                pieces.append(text[last:m.start()])
            added += 1
            last = m.end()
        if last < len(text):
            pieces.append(text[last:])
        return _Ids(added + self._q.count_pieces(pieces) + (self._bos if add_special_tokens else 0))


@dataclass(frozen=True, slots=True)
class LocalCounter:
    counter: TokenCounter
    quick: bool   # a built-in family: BPE on quicktok (fast enough to count large bodies inline)


def quick_counter(counter: TokenCounter, encoding: str) -> TokenCounter:
    """A copy of ``counter`` (same template, same added tokens) whose BPE runs on quicktok, the
    words where quicktok may differ from Hugging Face counted on Hugging Face (precise.py)."""
    import quicktok

    from .precise import PreciseQuick

    quick = PreciseQuick(quicktok.get_encoding(encoding), counter._tok)
    fast = copy.copy(counter)
    fast._tok = _QuickTokens(counter._tok, quick, counter.special_tokens)
    return fast


def load_counter(key: tuple[str, str]) -> LocalCounter:
    kind, name = key
    if kind == "dir":
        return LocalCounter(TokenCounter.from_dir(name), False)
    hf = counter_for(name)
    encoding = QUICK_ENCODINGS.get(name)
    if not encoding:
        return LocalCounter(hf, False)
    return LocalCounter(quick_counter(hf, encoding), True)


def counter_key(rule: ExactRule, model: str) -> tuple[str, str]:
    if rule.tokenizer:
        return ("dir", rule.tokenizer)
    return ("family", rule.family or family_for_model(model))


def _keys_of(rule: ExactRule) -> list[tuple[str, str]]:
    if rule.tokenizer or rule.family:
        return [counter_key(rule, "")]
    if not any(c in rule.model for c in "*?["):  # one model by name: its own family
        return [counter_key(rule, rule.model)]
    hinted = [f for hint, fams in (("qwen", ("qwen3",)), ("llama", ("llama3", "llama3_1"))) if hint in rule.model.lower()
              for f in fams]
    return [("family", f) for f in (hinted or QUICK_ENCODINGS)]


class LocalCounters:
    """Counters by tokenizer (a handful: one per family or directory the rules name), loaded in
    the background on first use."""

    def __init__(self) -> None:
        self._ready: dict[tuple[str, str], LocalCounter] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._loading: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def get(self, rule: ExactRule, model: str) -> LocalCounter | None:
        """The counter for a model, or None while it loads (loading starts here) or failed."""
        key = counter_key(rule, model)
        found = self._ready.get(key)
        if found is not None:
            return found
        with self._lock:
            if key in self._loading or time.monotonic() - self._failed.get(key, -RETRY_S) < RETRY_S:
                return None
            self._loading.add(key)
        threading.Thread(target=self._load, args=(key,), name="exact-load", daemon=True).start()
        return None

    def load(self, rule: ExactRule, model: str) -> LocalCounter:
        """Load now (start-up, tests, benchmarks); raises what loading raises."""
        key = counter_key(rule, model)
        if key not in self._ready:
            self._ready[key] = load_counter(key)
        return self._ready[key]

    def preload(self, rules: tuple[ExactRule, ...]) -> None:
        """Load now every tokenizer the local rules can name (a rule without a family: each
        built-in family its pattern hints at, all where it hints at none). ``extproc serve`` does
        this before it serves: a load holds the GIL for ~0.5 s, which mid-traffic stalls the
        event loop past Envoy's check timeout. One that fails is logged and tried again later."""
        for key in sorted({k for rule in rules if rule.source == "local" for k in _keys_of(rule)}):
            if key not in self._ready:
                t0 = time.monotonic()
                self._load(key)
                if key in self._ready:
                    log.info("exact counts: tokenizer %s ready in %.1fs", key[1], time.monotonic() - t0)

    def _load(self, key: tuple[str, str]) -> None:
        try:
            self._ready[key] = load_counter(key)
            log.info("exact counts: tokenizer %s loaded", key[1])
        except Exception as exc:  # noqa: BLE001 - a missing tokenizer costs exactness, not requests
            self._failed[key] = time.monotonic()
            log.warning("exact counts: tokenizer %s not available (%s: %s); the estimate decides",
                        key[1], type(exc).__name__, str(exc)[:200])
        finally:
            with self._lock:
                self._loading.discard(key)


def count_local(local: LocalCounter, api: str, doc: Mapping[str, Any]) -> list[int]:
    """Prompt tokens of each prompt the engine runs for the body, as vLLM counts them (a server
    with a tool parser: a request with tools is counted, not refused). Raises ValueError
    (TemplateError) where vLLM would answer 400."""
    return local.counter.count_request(api, doc, enable_auto_tool_choice=True, tool_call_parser="hermes")
