"""Exact counts on quicktok: Hugging Face's count without running Hugging Face on the whole text.

Where quicktok and Hugging Face ``tokenizers`` differ, quicktok's tokens include one that
Hugging Face's merges do not make from its own bytes (588 of Llama 3's, e.g. " seviy"; none of
Qwen3's): Hugging Face makes such a token only as a whole word (``ignore_merges``), quicktok inside
a longer one too (" seviyorum": " seviy" + "orum", 2 tokens against Hugging Face's 4). So the text is
encoded on quicktok, and only the words holding such an *unreachable* token are counted again on
Hugging Face; the rest keep quicktok's count. Checked against Hugging Face on all 1,292 dev texts
for both families (tests/exact/test_exact_precise.py).

A span re-counted is cut at tokens that begin with a space followed by a non-space: the
pre-tokenizer (Llama 3's and Qwen3's regex) starts a word there and nowhere inside one, and
scans left to right with only a look-ahead at whitespace, so the span's words alone are its words
in the whole text, and a BPE's count is the sum over words. Corrections are kept by span in a
bounded table (the same foreign words recur).
"""

from __future__ import annotations

import os
import pathlib
import threading
from collections import OrderedDict

import numpy as np

CACHE_SPANS = 4096  # spans' corrections remembered (each a short text and an int)


def unreachable_ids(tokenizer_json: dict) -> np.ndarray:
    """A table by token id: True where the BPE, merging by its merge list alone (no whole-word
    lookup), does not make the token from its own bytes (Llama 3: 588 tokens, Qwen3: none)."""
    import json

    from tokenizers import Tokenizer

    doc = {**tokenizer_json, "model": {**tokenizer_json["model"], "ignore_merges": False}}
    bpe = Tokenizer.from_str(json.dumps(doc)).model
    vocab: dict[str, int] = doc["model"]["vocab"]
    table = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for tok, i in vocab.items():
        if len(tok) > 1 and len(bpe.tokenize(tok)) != 1:
            table[i] = True
    return table


def cached_unreachable_ids(tokenizer_file: pathlib.Path) -> np.ndarray:
    """``unreachable_ids`` of a tokenizer.json, kept beside it: the table takes ~2 s to build (a
    BPE run per vocabulary entry) and a router loads it at every start. Keyed by the file's
    SHA-256, so a changed file is never read with an old table; a cache it cannot write is no error."""
    import hashlib

    import orjson

    raw = tokenizer_file.read_bytes()
    cached = tokenizer_file.with_name(f"unreachable-{hashlib.sha256(raw).hexdigest()[:16]}.npy")
    try:
        return np.load(cached, allow_pickle=False)
    except (OSError, ValueError):
        pass
    table = unreachable_ids(orjson.loads(raw))
    try:
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
        os.replace(tmp, cached)  # whole or not at all: another router may be reading it
    except OSError:
        pass
    return table


def word_starts(quick, size: int) -> np.ndarray:
    """A table by token id: True where the token begins with a space followed by a non-space."""
    table = np.zeros(size, dtype=bool)
    for i in range(size):
        try:
            b = quick.decode_single_token_bytes(i)
        except Exception:  # noqa: BLE001 - an id quicktok does not have (a gap, a special token)
            continue
        table[i] = len(b) >= 2 and b[0] == 0x20 and b[1] not in b" \t\r\n\x0b\x0c"
    return table


class PreciseQuick:
    """``count(text)``: Hugging Face's count of ``text`` (no special tokens), on quicktok."""

    def __init__(self, quick, hf, unreachable: np.ndarray) -> None:
        self._q = quick
        self._hf = hf
        if not unreachable.any():  # (Qwen3) every token is one the merges make: quicktok is exact
            self.count = quick.count
            return
        size = max(len(unreachable), quick.n_vocab)
        self._bad = np.zeros(size, dtype=bool)
        self._bad[:len(unreachable)] = unreachable
        self._start = word_starts(quick, size)
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()  # counts may run in worker threads

    def count(self, text: str) -> int:
        ids = self._q.encode_ordinary(text)
        n = len(ids)
        if n < 2:
            return n
        arr = np.asarray(ids, dtype=np.int64)
        bad = np.flatnonzero(self._bad[arr])
        if not len(bad):
            return n
        starts = np.flatnonzero(self._start[arr])
        done, total = -1, n
        try:
            for i in bad.tolist():
                if i < done:
                    continue  # in the span just re-counted
                k = int(np.searchsorted(starts, i, side="right"))
                j = int(starts[k - 1]) if k else 0
                end = int(starts[k]) if k < len(starts) else n
                total += self._correction(ids[j:end])
                done = end
        except UnicodeDecodeError:  # a span not of whole characters (never seen): the whole text on HF
            return len(self._hf.encode(text, add_special_tokens=False).ids)
        return total

    def _correction(self, span: list[int]) -> int:
        """Hugging Face's count of a span of whole words less quicktok's."""
        raw = self._q.decode_bytes(span)
        with self._lock:
            hit = self._cache.get(raw)
            if hit is not None:
                self._cache.move_to_end(raw)
                return hit
        fix = len(self._hf.encode(raw.decode("utf-8"), add_special_tokens=False).ids) - len(span)
        with self._lock:
            self._cache[raw] = fix
            while len(self._cache) > CACHE_SPANS:
                self._cache.popitem(last=False)
        return fix
