"""Content features of text that drive BPE token counts, measured without a tokenizer.

The text's UTF-8 bytes are mapped to character classes with one ``bytes.translate`` (C speed)
and viewed as a numpy array without a copy. The array is cut into *runs* of one class; all
features come from the runs, so the work after the translate is a handful of vector ops:

* class totals — lower/upper-case ASCII letters, digits, spaces, newlines, punctuation, quotes,
  and, from the UTF-8 lead byte of each non-ASCII character, its script block (Latin accents,
  Greek, Cyrillic, Hebrew/Arabic, other 2-byte scripts, Indic/SE-Asian, general punctuation and
  math symbols, CJK/kana, Hangul, full-width forms, 4-byte emoji);
* transitions between classes — a word after a space (``s>l``), a camelCase boundary
  (``l>U``), a digit after a letter… BPE pre-tokenisers cut text at exactly such boundaries;
* run lengths — Σ⌊L/k⌋ over runs of a class (``l/4`` grows by one every 4 letters of a long
  word, ``s/4`` every indentation step, ``d/3`` every 3-digit group, which Llama-3 keeps as one
  token while Qwen splits digits): a piecewise-linear basis of run length, which is what BPE
  merges follow;
* for text that is not ASCII, the second UTF-8 byte after an 0xE0/0xE1 lead, which separates
  Devanagari, Bengali, Thai, Myanmar and Ethiopic (their token rates differ by 2×).

Every feature is a count, so the features of a concatenation are (up to the class boundary at
the join) the sum of the parts': a request that mixes prose, code, CJK and JSON is measured per
character class, and the token model is linear in these counts.

Texts longer than ``SAMPLE_CHARS`` are measured on evenly spaced blocks and scaled up; such texts
are far above the short pool's threshold, and this bounds ``route()`` on a 1 MB body.
"""

from __future__ import annotations

import numpy as np

_PUNCT = b"!#$%&()*+,-./:;<=>?@[\\]^_`{|}~'"

# class letter -> the bytes in it (continuation bytes 0x80-0xBF are class "c": not counted)
_CLASSES: dict[str, bytes] = {
    "l": bytes(range(97, 123)), "U": bytes(range(65, 91)), "d": bytes(range(48, 58)),
    "s": b" ", "n": b"\n", "t": b"\t\r\x0b\x0c", "p": _PUNCT, "q": b'"',
    "c": bytes(range(0x80, 0xC0)),
    "e": bytes(range(0xC2, 0xCB)),                               # Latin-1 supplement, Latin extended
    "r": bytes(range(0xCB, 0xCE)) + bytes(range(0xD5, 0xD7)) + bytes(range(0xDA, 0xE0)),  # modifiers, Armenian, Syriac…
    "g": bytes(range(0xCE, 0xD0)),                               # Greek
    "y": bytes(range(0xD0, 0xD5)),                               # Cyrillic
    "A": bytes(range(0xD7, 0xDA)),                               # Hebrew, Arabic
    "i": bytes(range(0xE0, 0xE2)),                               # Indic, Thai, Myanmar, Ethiopic, Georgian…
    "G": b"\xe2",                                                # general punctuation, symbols, math
    "h": bytes(range(0xE3, 0xEA)),                               # CJK ideographs, kana, CJK punctuation
    "k": bytes(range(0xEA, 0xEE)),                               # Hangul syllables
    "f": bytes(range(0xEE, 0xF0)),                               # private use, full-width forms
    "4": bytes(range(0xF0, 0x100)),                              # 4-byte: emoji, rare CJK
    "x": bytes(range(0, 9)) + bytes(range(14, 32)) + b"\x7f\xc0\xc1",  # control, invalid
}
CLASS_LETTERS = tuple(_CLASSES)
_K = len(CLASS_LETTERS)
_CODE = {c: i for i, c in enumerate(CLASS_LETTERS)}
_table = bytearray(256)
for _cls, _bytes in _CLASSES.items():
    for _b in _bytes:
        _table[_b] = _CODE[_cls]
assert len({b for v in _CLASSES.values() for b in v}) == 256, "every byte needs exactly one class"
CLASS_TABLE = bytes(_table)

_NON_ASCII = "ergyAiGhkf4"
_LETTERS = "lU"
TOTALS = tuple(c for c in CLASS_LETTERS if c not in "cx")
# transitions: (name, from-classes, to-classes)
TRANSITIONS: tuple[tuple[str, str, str], ...] = (
    ("s>l", "s", "l"), ("s>U", "s", "U"), ("n>a", "nt", _LETTERS), ("p>a", "p", _LETTERS),
    ("q>a", "q", _LETTERS), ("d>a", "d", _LETTERS), ("l>U", "l", "U"), ("U>l", "U", "l"),
    ("a>p", _LETTERS, "p"), ("a>q", _LETTERS, "q"), ("a>d", _LETTERS, "d"), ("p>s", "pq", "s"),
    ("s>p", "s", "pq"), ("p>d", "pq", "d"), ("d>p", "d", "pq"), ("s>d", "s", "d"),
    ("p>n", "pq", "n"), ("n>s", "n", "st"), ("p>q", "p", "q"), ("q>p", "q", "p"),
    ("s>u", "s", _NON_ASCII), ("p>u", "pqn", _NON_ASCII), ("u>a", _NON_ASCII + "c", _LETTERS),
    ("a>u", _LETTERS, _NON_ASCII), ("u>s", "c", "s"), ("u>p", "c", "pq"),
)
# run-length steps: (class, k) -> Σ floor(L/k) over runs of that class
RUN_STEPS: tuple[tuple[str, int], ...] = (
    ("l", 4), ("l", 8), ("U", 2), ("U", 4), ("s", 2), ("s", 4), ("s", 8), ("n", 2), ("t", 2),
    ("p", 2), ("p", 3), ("d", 2), ("d", 3), ("q", 2),
)
# second byte after an 0xE0/0xE1 lead: (name, second-byte values)
SCRIPTS: tuple[tuple[str, bytes], ...] = (
    ("deva", b"\xa4\xa5"), ("beng", b"\xa6\xa7"), ("thai", b"\xb8\xb9"), ("mymr", b"\x80\x81"),
    ("ethi", b"\x88\x89\x8a\x8b"),
)

FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"n:{c}" for c in TOTALS) + tuple(f"t:{n}" for n, _, _ in TRANSITIONS)
    + tuple(f"r:{c}/{k}" for c, k in RUN_STEPS) + tuple(f"z:{n}" for n, _ in SCRIPTS)
)
N_FEATURES = len(FEATURE_NAMES)

# Matrices that turn run statistics into features with one matmul each.
_TOTALS_W = np.zeros((_K, len(TOTALS)))
for _j, _c in enumerate(TOTALS):
    _TOTALS_W[_CODE[_c], _j] = 1.0
_TRANS_W = np.zeros((_K * _K, len(TRANSITIONS)))
for _j, (_n, _src, _dst) in enumerate(TRANSITIONS):
    for _a in _src:
        for _b in _dst:
            _TRANS_W[_CODE[_a] * _K + _CODE[_b], _j] = 1.0
_RUN_KS = sorted({k for _, k in RUN_STEPS})
_RUN_INDEX = [(_RUN_KS.index(k), _CODE[c]) for c, k in RUN_STEPS]
_RUN_ROWS = np.array([i for i, _ in _RUN_INDEX])
_RUN_COLS = np.array([c for _, c in _RUN_INDEX])
_SCRIPT_W = np.zeros((256, len(SCRIPTS)))
for _j, (_n, _vals) in enumerate(SCRIPTS):
    for _v in _vals:
        _SCRIPT_W[_v, _j] = 1.0
_LEAD_E = _CODE["i"]

# Group of each feature, for the calibrator (content groups in calibrate.CONTENT_GROUPS).
def _group(name: str) -> str:
    kind, what = name.split(":", 1)
    if kind == "z":
        return "script"
    if kind == "n":
        return {"l": "latin", "U": "latin", "d": "digits", "s": "space", "n": "space", "t": "space",
                "p": "punct", "q": "punct", "G": "punct", "h": "cjk", "k": "cjk", "f": "cjk"}.get(what, "script")
    if kind == "r":
        return {"l": "latin", "U": "latin", "d": "digits", "s": "space", "n": "space", "t": "space",
                "p": "punct", "q": "punct"}[what[0]]
    if "u" in what:
        return "script"
    if "d" in what:
        return "digits"
    if what in ("p>s", "s>p", "p>n", "n>s", "p>q", "q>p"):
        return "punct"
    return "latin"


FEATURE_GROUP: tuple[str, ...] = tuple(_group(n) for n in FEATURE_NAMES)

SAMPLE_CHARS = 131_072
_SAMPLE_BLOCKS = 32
_EMPTY = np.zeros(N_FEATURES)


def _measure_exact(text: str) -> np.ndarray:
    raw = text.encode("utf-8", "surrogatepass")
    n = len(raw)
    if n == 0:
        return _EMPTY.copy()
    codes = np.frombuffer(raw.translate(CLASS_TABLE), np.uint8)
    starts = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    starts = np.concatenate(([0], starts))
    lens = np.diff(np.append(starts, n))
    cls = codes[starts].astype(np.intp)
    totals = np.bincount(cls, weights=lens, minlength=_K) @ _TOTALS_W
    trans = np.bincount(cls[:-1] * _K + cls[1:], minlength=_K * _K) @ _TRANS_W
    long_runs = lens >= 2
    lr, lc = lens[long_runs], cls[long_runs]
    steps = np.array([np.bincount(lc, weights=lr // k, minlength=_K) for k in _RUN_KS])
    runs = steps[_RUN_ROWS, _RUN_COLS]
    if text.isascii():
        scripts = np.zeros(len(SCRIPTS))
    else:
        raw_a = np.frombuffer(raw, np.uint8)
        lead = np.flatnonzero(codes[:-1] == _LEAD_E)
        scripts = np.bincount(raw_a[lead + 1], minlength=256) @ _SCRIPT_W
    return np.concatenate((totals, trans, runs, scripts))


def measure(text: str) -> np.ndarray:
    """Feature counts of one text (aligned with FEATURE_NAMES)."""
    n = len(text)
    if n <= SAMPLE_CHARS:
        return _measure_exact(text)
    block = SAMPLE_CHARS // _SAMPLE_BLOCKS
    stride = n // _SAMPLE_BLOCKS
    sample = "".join(text[i * stride: i * stride + block] for i in range(_SAMPLE_BLOCKS))
    return _measure_exact(sample) * (n / len(sample))


def utf8_len(text: str) -> int:
    """UTF-8 byte length of decoded text (what the paper's bytes-per-token ratio divides)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
