r"""Exact counts on quicktok: Hugging Face's count without running Hugging Face on the whole text.

quicktok merges by token rank (tiktoken's BPE), Hugging Face ``tokenizers`` by its merge list,
and for Llama 3 the two orders differ: " rahati" is [" rahat", "i"] on quicktok and
[" r", "ah", "ati"] on Hugging Face, which vLLM runs. Qwen3's list agrees with its ranks, but
the check below costs little, so it covers every family alike.

A merge-list BPE's tokens for a word are t1..tk exactly when each adjacent pair is what the BPE
makes of the pair's own bytes (``BPE(ti + ti+1) == [ti, ti+1]``; the property GitHub's ``bpe``
crate is built on). So the text is encoded on quicktok, each adjacent pair within a word is
checked, with the verdicts kept in a bounded table (pairs recur far more than words), and only
the words holding a pair Hugging Face would not make are counted again on Hugging Face; the
rest keep quicktok's count. The pair is checked on Hugging Face's own model with its whole-word
lookup on: a pair whose join is a vocabulary word counts as failed, which can only send more
words to Hugging Face, never fewer. A pair that fails is asked again of the whole tokenizer
(``_agree`` says why that is sound): a word and its comma are two words, not a failure. Checked
against Hugging Face on every dev text and on adversarial strings (tests/exact/test_exact_precise.py).

A word is found by tokens that begin with a space followed by a non-space: the pre-tokenizer
(Llama 3's and Qwen3's regex) starts a word there and nowhere inside one, and scans left to
right with only a look-ahead at whitespace, so a span between two such tokens alone is the same
words as in the whole text, and a BPE's count is the sum over words. No pair across such a
boundary needs checking (a BPE never merges across words), nor one across two texts cut apart
at a special token; a failed pair's span (from such a token to the next) is counted again.

One more difference lies before the BPE: the pre-tokenizer's regex reads \p{L} and \p{N} from
each library's own Unicode tables, and quicktok's are newer. A code point assigned a letter in
Unicode 16 or 17 (U+323B0, CJK extension J) is a letter to quicktok and not to Hugging Face, so
the two cut the text into different words ("\U000323b0's": a contraction on quicktok, a
punctuation run on Hugging Face). All 4,644 such code points (found by probing every code point
in several contexts) are unassigned in Unicode 14, Python 3.11's table: a text holding a code
point unassigned there (or in ``NEWER_LETTERS``, for a newer Python) is counted on Hugging Face
whole.

Costs, 26 KB of text (~7K tokens) here: quicktok ~0.6 ms, this ~1.3 ms once its pairs are known,
Hugging Face ~13-20 ms; a text of new pairs costs about Hugging Face's time once (~5 us a pair).
"""

from __future__ import annotations

import functools
import time

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers

CACHE_SPANS = 16_384      # spans' corrections remembered (each a short text and an int)
GOOD_SLOTS = 1 << 20      # pairs known to agree: a table of this many keys (8 MB)
BAD_SLOTS = 1 << 16       # pairs known to disagree (0.5 MB)
SPILL = 65_536            # good pairs that found no slot in the table (a set, looked up one by one)
# New pairs checked a second, per tokenizer (a token bucket holding one second's worth). A pair
# is checked on Hugging Face at ~5 us: a router sees most of its traffic's pairs in its first
# minutes, after which few are new, but text written to be new (or a cold start under a flood of
# long close requests) would make every count cost Hugging Face's time. Past the bucket a count
# is refused (``Capped``): the estimate decides, as without exact counts.
NEW_PAIRS_PER_S = 50_000
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: a key's slot is the top bits of key * this
# Code points where quicktok's pre-tokenizer and Hugging Face's disagree (assigned in Unicode 16
# and 17), all unassigned in Python 3.11's Unicode 14: named here for a Python whose table has them.
NEWER_LETTERS = ((0x88F, 0x88F), (0xC5C, 0xC5C), (0xCDC, 0xCDC), (0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2), (0xA7D4, 0xA7D4),
                 (0xA7F1, 0xA7F1), (0x10940, 0x10959), (0x10EC5, 0x10EC7), (0x11DB0, 0x11DDB), (0x16EA0, 0x16EB8),
                 (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF3), (0x187F8, 0x187FF), (0x18D09, 0x18D1E), (0x18D80, 0x18DF2),
                 (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6E2), (0x1E6E4, 0x1E6E5), (0x1E6E7, 0x1E6ED), (0x1E6F0, 0x1E6F4),
                 (0x1E6FE, 0x1E6FF), (0x2B73A, 0x2B73F), (0x2CEA2, 0x2CEAD), (0x323B0, 0x33479))


@functools.cache
def unsure_code_points() -> np.ndarray:
    """A table by code point: True where quicktok's pre-tokenizer may read it otherwise than
    Hugging Face's (unassigned in this Python's Unicode, or in NEWER_LETTERS; surrogates too).
    ~0.5 s to build, once a process."""
    import unicodedata

    table = np.fromiter((unicodedata.category(chr(c)) == "Cn" for c in range(0x110000)), dtype=bool, count=0x110000)
    table[0xD800:0xE000] = True
    for a, b in NEWER_LETTERS:
        table[a:b + 1] = True
    return table


class Capped(Exception):
    """The count needs more new pairs checked than the budget holds now (NEW_PAIRS_PER_S)."""


class PairTable:
    """A bounded set of int64 keys, looked up many at once: each key may sit in either of two
    neighbouring slots (its hash, and that with the last bit flipped), a key that finds both
    taken evicts one. Losing a key costs only a check again. Two lookups per key in one cache
    line (a sorted array's binary search misses the cache ~20 times a key: slower than the
    encoding itself)."""

    def __init__(self, slots: int) -> None:
        self.keys = np.full(slots, -1, dtype=np.int64)
        self._shift = np.uint64(64 - (slots.bit_length() - 1))

    def __len__(self) -> int:
        return int(np.count_nonzero(self.keys >= 0))

    def slots(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.view(np.uint64) * _MIX) >> self._shift).view(np.int64)

    def holds(self, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:  # (slots: of these keys)
        table = self.keys
        return (table[slots] == keys) | (table[slots ^ 1] == keys)

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Remember keys: each in its first slot if free, else its second if free, else one of
        the two by the key's last bit; returns the keys, new or old, that no longer have a place.
        (Whole int64 stores: a reader in another thread sees the old key or the new.)"""
        table = self.keys
        first = self.slots(keys)
        second = first ^ 1
        chosen = np.where(table[first] < 0, first, np.where((table[second] < 0) | (keys & 1 == 1), second, first))
        old = table[chosen]
        table[chosen] = keys
        lost = table[chosen] != keys  # two new keys chose one slot: the other takes its second place
        other = (chosen ^ 1)[lost]
        old = np.concatenate((old[old >= 0], table[other][table[other] >= 0]))
        table[other] = keys[lost]
        return np.setdiff1d(np.concatenate((old, keys)), table[np.concatenate((first, second, other))])


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

    def __init__(self, quick, hf) -> None:
        self._q = quick
        self._hf = hf               # a tokenizers.Tokenizer over the same vocabulary and merges
        size = quick.n_vocab
        self._shift = max(size, hf.get_vocab_size()).bit_length()
        self._start = word_starts(quick, size)
        self.good, self.bad = PairTable(GOOD_SLOTS), PairTable(BAD_SLOTS)
        self._cache: dict[bytes, int] = {}
        self._spill: set[int] = set()
        self._budget, self._refill = float(NEW_PAIRS_PER_S), time.monotonic()
        # the same BPE (and whole-word lookup), with words split at spaces only: pairs checked in bulk
        self._pairs = Tokenizer(hf.model)
        self._pairs.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        self._unsure = unsure_code_points()

    def count(self, text: str) -> int:
        return self.count_pieces((text,))

    def count_pieces(self, pieces) -> int:
        """The sum of ``count`` over texts, checked together (one pass of the tables for a
        request's many pieces between special tokens: a BPE never merges across them)."""
        ids: list[int] = []
        bounds: list[int] = []
        quick = []  # the pieces quicktok encodes
        whole = 0   # tokens of the pieces counted on Hugging Face
        for piece in pieces:
            if not piece.isascii() and self._is_unsure(piece):
                self._spend(len(piece) // 4)  # (Hugging Face's time, in pair checks' worth)
                whole += len(self._hf.encode(piece, add_special_tokens=False).ids)
                continue
            bounds.append(len(ids))
            quick.append(piece)
            ids += self._q.encode_ordinary(piece)
        return whole + self._count_ids(ids, bounds, quick)

    def _is_unsure(self, text: str) -> bool:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        return bool(self._unsure[cps].any())

    def _count_ids(self, ids: list[int], bounds: list[int], pieces) -> int:
        """quicktok's ``ids`` of texts starting at ``bounds``, made Hugging Face's count."""
        n = len(ids)
        if n < 2:
            return n
        arr = np.fromiter(ids, dtype=np.int64, count=n)
        keys = (arr[:-1] << self._shift) | arr[1:]     # every adjacent pair (gathers cost more than lookups)
        unknown = ~self.good.holds(keys, self.good.slots(keys))
        unknown &= ~self._start[arr[1:]]               # a pair across a word start needs no check
        cuts = np.asarray(bounds[1:], dtype=np.int64)  # nor one across two pieces
        unknown[cuts[cuts > 0] - 1] = False
        inner = np.flatnonzero(unknown)
        if not len(inner):
            return n
        keys = keys[inner]
        inner += 1                                     # the pair (i-1, i) by its second token
        failed = self.bad.holds(keys, self.bad.slots(keys))
        new = np.flatnonzero(~failed)
        if len(new):
            fresh, where = np.unique(keys[new], return_inverse=True)
            spilled = np.fromiter((k in self._spill for k in fresh.tolist()), dtype=bool, count=len(fresh))
            verdict = spilled.copy()
            if not spilled.all():
                self._spend(int(np.count_nonzero(~spilled)))
                verdict[~spilled] = self._agree(fresh[~spilled])
            failed[new] = ~verdict[where]
        if not failed.any():
            return n
        # the spans (from a word start or a piece's start to the next) holding a failed pair, each once
        begins = self._start[arr]                      # (a copy: the table is not written)
        begins[np.asarray(bounds, dtype=np.int64)] = True
        edges = np.append(np.flatnonzero(begins), n)
        k = np.unique(np.searchsorted(edges, inner[failed], side="right"))  # 0 = edges[0] < i < n: inside
        try:
            return n + self._corrections([ids[j:e] for j, e in zip(edges[k - 1].tolist(), edges[k].tolist())])
        except UnicodeDecodeError:  # a span not of whole characters (never seen): the texts on HF
            return sum(len(self._hf.encode(piece, add_special_tokens=False).ids) for piece in pieces)

    def _spend(self, pairs: int) -> None:
        """Take ``pairs`` from the bucket of new-pair checks, or raise Capped. (Threads may race
        on it: at worst a few more checks pass.)"""
        now = time.monotonic()
        self._budget = min(float(NEW_PAIRS_PER_S), self._budget + (now - self._refill) * NEW_PAIRS_PER_S)
        self._refill = now
        if pairs > self._budget:
            raise Capped(f"{pairs} new pairs to check, {int(self._budget)} allowed now")
        self._budget -= pairs

    def _agree(self, keys: np.ndarray) -> np.ndarray:
        """For each pair: does Hugging Face make it of its own bytes? Remembered either way.

        First its BPE alone, all pairs in one call (their byte-level strings joined by spaces,
        which no such string holds, and split there). A pair that fails may be two words (a
        word and its comma: a BPE merges within words only), so the pairs that fail are asked
        again of the whole tokenizer, its pre-tokenizer included, one batch call: where that
        makes the pair, it is good. (Where the pre-tokenizer splits a pair's text alone between
        its tokens, it splits them in any text: each of its patterns matches a whole run of one
        kind of character, and a run's tail is a run of the same kind.)"""
        mask = (1 << self._shift) - 1
        a, b = keys >> self._shift, keys & mask
        tok = self._hf.id_to_token
        words = [(tok(x) or "\0") + (tok(y) or "\0") for x, y in zip(a.tolist(), b.tolist())]
        enc = self._pairs.encode(" ".join(words), add_special_tokens=False)
        ids, word = np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.word_ids, dtype=np.int64)
        made = np.bincount(word, minlength=len(keys))
        if len(made) != len(keys):  # (a string split where it should not be: never seen) one by one
            ok = np.array([[t.id for t in self._hf.model.tokenize(w)] == [x, y]
                           for w, x, y in zip(words, a.tolist(), b.tolist())], dtype=bool)
        else:
            first = np.concatenate(([0], np.cumsum(made)[:-1]))
            ok = made == 2
            ok[ok] &= (ids[first[ok]] == a[ok]) & (ids[first[ok] + 1] == b[ok])
        again = np.flatnonzero(~ok)
        texts, where = [], []
        for i in again.tolist():
            try:
                texts.append(self._q.decode_bytes([int(a[i]), int(b[i])]).decode("utf-8"))
                where.append(i)
            except UnicodeDecodeError:  # not whole characters: within one word, and failed
                pass
        if texts:
            for i, e in zip(where, self._hf.encode_batch(texts, add_special_tokens=False)):
                ok[i] = e.ids == [a[i], b[i]]
        homeless = self.good.add(keys[ok])
        room = SPILL - len(self._spill)
        if len(homeless) and room > 0:
            self._spill.update(homeless[:room].tolist())
        self.bad.add(keys[~ok])
        return ok

    def _corrections(self, spans: list[list[int]]) -> int:
        """Hugging Face's count of spans of whole words less quicktok's (those not remembered,
        in one call)."""
        raws = [self._q.decode_bytes(span) for span in spans]
        fixes = [self._cache.get(raw) for raw in raws]
        todo = [i for i, fix in enumerate(fixes) if fix is None]
        if todo:
            counted = self._hf.encode_batch([raws[i].decode("utf-8") for i in todo], add_special_tokens=False)
            for i, enc in zip(todo, counted):
                fixes[i] = fix = len(enc.ids) - len(spans[i])
                if len(self._cache) >= CACHE_SPANS:  # the oldest out (dict order); a race only forgets more
                    self._cache.pop(next(iter(self._cache), None), None)
                self._cache[raws[i]] = fix
        return sum(fixes)
