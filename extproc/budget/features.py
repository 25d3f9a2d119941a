"""Content features of text that drive BPE token counts, measured without a tokenizer.

A text's UTF-8 bytes are mapped to character classes with ``bytes.translate`` (one C-speed
pass per alphabet) and the classes, class pairs and class runs are counted with ``bytes.count``
(memchr-speed, no Python loop over characters). Two alphabets:

* FINE keeps letter case, quotes, and the UTF-8 lead byte of each non-ASCII character, which
  tells the script block (Latin accents, Greek, Cyrillic, Hebrew/Arabic, Indic/Thai,
  general punctuation, CJK/kana, Hangul, full-width forms, emoji).
* COARSE folds each kind to one letter so that pairs and runs are cheap to count: ``"sa"`` is a
  word after a space, ``"aaaa"`` counts every 4 letters of a long word (a run of k letters
  contributes floor(k/4) non-overlapping matches), ``"    "`` an indentation step, ``"ddd"`` a
  3-digit group (Llama-3 splits numbers in 3s, Qwen per digit) and so on. Non-overlapping
  counts of runs form a piecewise-linear basis of run length, which is what BPE merges follow.

Every feature is a count, so the features of a concatenation are (up to the few pairs across
the join) the sum of the parts' features: a request that mixes prose, code, CJK and JSON is
measured per character class, and the token model is linear in these counts.

Texts longer than ``SAMPLE_CHARS`` are measured on evenly spaced blocks and scaled up; such texts
are far above any short-pool threshold, and this keeps ``route()`` on a 1 MB body within its
latency budget.
"""

from __future__ import annotations

from typing import Sequence


def _table(classes: dict[bytes, str]) -> bytes:
    t = bytearray(b"x" * 256)
    for byte_values, cls in classes.items():
        for b in byte_values:
            t[b] = ord(cls)
    return bytes(t)


def _range(a: int, b: int) -> bytes:
    return bytes(range(a, b))


_PUNCT = b"!#$%&()*+,-./:;<=>?@[\\]^_`{|}~'"
FINE = _table({
    _range(97, 123): "l", _range(65, 91): "U", _range(48, 58): "d",
    b" ": "s", b"\n": "n", b"\t\r": "t", _PUNCT: "p", b'"': "q",
    _range(0x80, 0xC0): "c",                       # UTF-8 continuation bytes (not counted)
    _range(0xC2, 0xCB): "e",                       # Latin-1 supplement, Latin extended
    _range(0xCB, 0xCE): "r", _range(0xD5, 0xE0): "r",  # modifiers, Armenian, Hebrew, Arabic…
    _range(0xCE, 0xD0): "g",                       # Greek
    _range(0xD0, 0xD5): "y",                       # Cyrillic
    _range(0xE0, 0xE2): "i",                       # Indic, Thai, Myanmar, Ethiopic, Georgian…
    b"\xe2": "G",                                  # general punctuation, symbols, math operators
    _range(0xE3, 0xEA): "h",                       # CJK ideographs, kana, CJK punctuation
    _range(0xEA, 0xEE): "k",                       # Hangul syllables
    _range(0xEE, 0xF0): "f",                       # private use, full-width forms
    _range(0xF0, 0x100): "4",                      # 4-byte: emoji, rare CJK
})
COARSE = _table({
    _range(97, 123) + _range(65, 91): "a", _range(48, 58): "d", b" ": "s", b"\n": "n",
    b"\t\r": "t", _PUNCT + b'"': "p", _range(0x80, 0x100): "u",
})

# (alphabet, pattern) for features present in any text.
_ASCII_FEATURES: tuple[tuple[str, bytes], ...] = (
    ("F", b"l"), ("F", b"U"), ("F", b"d"), ("F", b"s"), ("F", b"n"), ("F", b"t"),
    ("F", b"p"), ("F", b"q"), ("F", b"lU"), ("F", b"Ul"),
    ("C", b"sa"), ("C", b"na"), ("C", b"pa"), ("C", b"da"),
    ("C", b"aaaa"), ("C", b"aaaaaaaa"),
    ("C", b"ss"), ("C", b"    "), ("C", b"nn"),
    ("C", b"pp"), ("C", b"ppp"), ("C", b"sp"), ("C", b"ps"), ("C", b"ap"),
    ("C", b"dd"), ("C", b"ddd"), ("C", b"pd"),
)
# Features that are zero for ASCII text; measured only when the text is not ASCII.
_NON_ASCII_FEATURES: tuple[tuple[str, bytes], ...] = (
    ("F", b"e"), ("F", b"r"), ("F", b"g"), ("F", b"y"), ("F", b"i"), ("F", b"G"),
    ("F", b"h"), ("F", b"k"), ("F", b"f"), ("F", b"4"),
    ("C", b"su"), ("C", b"pu"), ("C", b"ua"),
    # second UTF-8 byte separates scripts that share a lead byte
    ("B", b"\xe0\xa4"), ("B", b"\xe0\xa5"),        # Devanagari
    ("B", b"\xe0\xa6"), ("B", b"\xe0\xa7"),        # Bengali
    ("B", b"\xe0\xb8"), ("B", b"\xe0\xb9"),        # Thai
    ("B", b"\xe1\x80"), ("B", b"\xe1\x81"),        # Myanmar
    ("B", b"\xe1\x88"), ("B", b"\xe1\x89"),        # Ethiopic
    ("B", b"\xd7"), ("B", b"\xd8"), ("B", b"\xd9"),  # Hebrew, Arabic
)


def _name(alpha: str, pat: bytes) -> str:
    return f"{alpha}:{pat.hex() if alpha == 'B' else pat.decode()}"


FEATURE_NAMES: tuple[str, ...] = tuple(_name(a, p) for a, p in _ASCII_FEATURES + _NON_ASCII_FEATURES)
N_FEATURES = len(FEATURE_NAMES)
_N_ASCII = len(_ASCII_FEATURES)
_ASCII_F = tuple(p for a, p in _ASCII_FEATURES if a == "F")
_ASCII_C = tuple(p for a, p in _ASCII_FEATURES if a == "C")
_NA_F = tuple(p for a, p in _NON_ASCII_FEATURES if a == "F")
_NA_C = tuple(p for a, p in _NON_ASCII_FEATURES if a == "C")
_NA_B = tuple(p for a, p in _NON_ASCII_FEATURES if a == "B")
_ZEROS_NA = (0,) * len(_NON_ASCII_FEATURES)

# Which token-model group each feature belongs to (see calibrate.GROUPS).
_GROUP_OF_PREFIX = {
    "F:l": "latin", "F:U": "latin", "F:lU": "latin", "F:Ul": "latin",
    "C:sa": "latin", "C:na": "latin", "C:pa": "latin", "C:da": "latin",
    "C:aaaa": "latin", "C:aaaaaaaa": "latin",
    "F:d": "digits", "C:dd": "digits", "C:ddd": "digits", "C:pd": "digits",
    "F:s": "space", "F:n": "space", "F:t": "space", "C:ss": "space", "C:    ": "space",
    "C:nn": "space",
    "F:p": "punct", "F:q": "punct", "C:pp": "punct", "C:ppp": "punct", "C:sp": "punct",
    "C:ps": "punct", "C:ap": "punct", "F:G": "punct",
    "F:h": "cjk", "F:k": "cjk", "F:f": "cjk",
}
FEATURE_GROUP: tuple[str, ...] = tuple(_GROUP_OF_PREFIX.get(n, "script") for n in FEATURE_NAMES)

SAMPLE_CHARS = 65_536
_SAMPLE_BLOCKS = 16


def _measure_exact(text: str) -> list[float]:
    raw = text.encode("utf-8", "surrogatepass")
    fine = raw.translate(FINE)
    coarse = raw.translate(COARSE)
    counts = [fine.count(p) for p in _ASCII_F]
    counts += [coarse.count(p) for p in _ASCII_C]
    if text.isascii():
        counts += _ZEROS_NA
    else:
        counts += [fine.count(p) for p in _NA_F]
        counts += [coarse.count(p) for p in _NA_C]
        counts += [raw.count(p) for p in _NA_B]
    return counts


def measure(text: str) -> list[float]:
    """Feature counts of one text (a list aligned with FEATURE_NAMES)."""
    n = len(text)
    if n <= SAMPLE_CHARS:
        return _measure_exact(text)
    block = SAMPLE_CHARS // _SAMPLE_BLOCKS
    stride = n // _SAMPLE_BLOCKS
    sample = "\n".join(text[i * stride: i * stride + block] for i in range(_SAMPLE_BLOCKS))
    scale = n / (block * _SAMPLE_BLOCKS)
    return [c * scale for c in _measure_exact(sample)]


def add_into(total: list[float], part: Sequence[float]) -> None:
    for i, v in enumerate(part):
        total[i] += v


def utf8_len(text: str) -> int:
    """UTF-8 byte length of decoded text (what the paper's bytes-per-token ratio divides)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
