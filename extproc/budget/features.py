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
  Devanagari, Bengali, Thai, Myanmar and Ethiopic (their token rates differ by 2×);
* rare letter pairs (``b:rare``) — adjacent ASCII letters that are not a common English bigram:
  Latin-script text in other languages (Swahili, Tagalog, German…) has many more of them and
  falls out of the BPE vocabulary's whole words; likewise rare letter trigrams (``b:tri``, against
  a hand-written list of common English ones) and vowels (``b:vow``), all from one 27³ lookup;
* how deep in the BPE vocabulary the text's letter n-grams and characters sit, from tables
  generated from the Llama-3 vocabulary (``vocab_tables.py``, by benchmarks/vocab_tables.py —
  derived from the vocabulary alone, no text): letter trigrams (``v:``) and 4-grams (``w:``) that
  no token among the first 3,000 / 30,000 / any holds, and non-ASCII characters that fewer than
  100 / 10 / no tokens hold (``u:``). A word whose 4-grams sit only in rare tokens is cut into
  short pieces: this separates Tagalog or Swahili from English and Spanish, and Kazakh or
  Armenian letters from Russian ones, where letter classes alone cannot.

Every feature is a count, so the features of a concatenation are (up to the class boundary at
the join) the sum of the parts': a request that mixes prose, code, CJK and JSON is measured per
character class, and the token model is linear in these counts.

Texts longer than ``SAMPLE_CHARS`` (64K characters, ~15K tokens) are measured on evenly spaced blocks and scaled up; such texts
are far above the short pool's threshold, and this bounds ``route()`` on a 1 MB body.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

from .vocab_tables import CHARS, QUADGRAMS, TRIGRAMS

_PUNCT = b"!#$%&()*+,-./:;<=>?@[\\]^_`{|}~'"

# class letter -> the bytes in it (continuation bytes 0x80-0xBF are class "c": not counted)
_CLASSES: dict[str, bytes] = {
    "l": bytes(range(97, 123)), "U": bytes(range(65, 91)), "d": bytes(range(48, 58)),
    "s": b" ", "n": b"\n", "t": b"\t\r\x0b\x0c", "p": _PUNCT, "q": b'"',
    "c": bytes(range(0x80, 0xC0)),
    "e": bytes(range(0xC2, 0xCB)),                               # Latin-1 supplement, Latin extended
    "m": bytes(range(0xCB, 0xCE)),                               # spacing modifiers, combining diacritics
    "r": bytes(range(0xD5, 0xD7)) + bytes(range(0xDC, 0xE0)),    # Armenian, Syriac, Thaana, N'Ko…
    "g": bytes(range(0xCE, 0xD0)),                               # Greek
    "y": bytes(range(0xD0, 0xD5)),                               # Cyrillic
    "H": b"\xd7",                                                # Hebrew
    "A": bytes(range(0xD8, 0xDC)),                               # Arabic, Persian, Urdu
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

_NON_ASCII = "emrgyHAiGhkf4"
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

# Letter pairs common in English (and so inside BPE vocabulary words); a word made of other
# pairs (Swahili, Tagalog, Welsh… or identifiers) takes more tokens per letter.
_COMMON_PAIRS = frozenset((
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve "
    "co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur ca el ta la ns di fo ho pe ec pr no "
    "ct us ac ot il tr ly nc et ut ss so rs un lo wa ge ie wh ee wi em ad ol rt po we na ul ni ts "
    "mo ow pa im mi ai sh ir su id os iv ia am fi ci vi pl ig tu ev ld ry mp fe bl ab gh ty op wo "
    "sa ay ex ke fr oo av ag if ap gr od bo sp rd do uc bu ei ov by rm ep tt oc fa ef cu rn sc gi "
    "da yo cr cl du ga qu ue ff ba ey ls va um pp ua up lu go ht ru ug ds lt pi rc rr eg au ck ew "
    "mu br bi pt ak pu ui rg ib tl ny ki rk ys ob mm fu ph og ms ye ud mb ip ub oi rl gu dr hr cc "
    "tw ft wn nu af hu nn eo vo rv nf xp gn sm fl iz ok nl my gl aw ju oa eq sy sl ps jo lf nv je "
    "nk kn gs dy hy ze ks xt"
).split())
# Letter trigrams common in English, written out by hand; a run of three ASCII letters that is
# none of them (``b:tri``) is one more sign of a word outside the BPE vocabulary, and vowels
# (``b:vow``) mark the open syllables of Swahili, Malagasy, Tagalog… Letters map to 0..25 (either
# case), anything else to 26, with one ``bytes.translate``; each position's trigram indexes
# c0*729 + c1*27 + c2 in a table of bits: 4 if c0 c1 is a rare pair (``b:rare``), 1 if c0 c1 c2 is
# a rare trigram, 2 if c1 is a vowel. One bincount of the looked-up values gives all three counts.
_COMMON_TRIGRAMS = frozenset((
    "the and ing ion tio ent ati for her ter hat tha ere ate his con res ver all ons nce men ith "
    "ted ers pro thi wit are ess not ive was ect rea com eve per int est sta cti ica ist ear ain "
    "one our iti rat nte tin ine der ome man pre rom tra whi ave str act ill ure ide ove cal ble "
    "out sti tic oun enc ore ant ity fro art tur par red oth eri hic ies ste ght ich igh und you "
    "ort era wer nti oul nde ind tho hou nal but hav uld use han hin tes she ell ard ple ast ser "
    "ous ali lly ese ren tis ndi nto ose rie ngs ial ran lin lea led les ler low own ows wor ork "
    "orl rld ery ern eat ead hea hen hey hem hei som ake kin ike lik lit ely ily tly ful day ays "
    "ibl abl ong ngt gth row ree see een ndo oin min mor tor ory ito iso son sio sin sig ign gne "
    "ned nes nee eed cou ctu ura ral rel ela lat ato ors pos osi sit nit ite tal ssi ssa sse sso "
    "age any rai ise ize ase ace anc sen ens nse ime tim mes ame nam ima mat mea ean ans che chi "
    "cha ach eac tea rch arc sea erv rvi vic ice dic ict dis ust qui uir ire rec ecl eco eci cia "
    "pla lac lan ang nge ges gen ene ner gra rap aph phy sho how sed ded din ven lev vel ele lec "
    "cte oci soc ost mos mpl omp mpo por rta tan tat ata lis ish sha hal als alt lth eal bel elo "
    "ack cke ked uch muc urn urs ute put mpu pen ope erm rmi mit itt tte ett bet wee ffe ffi fic "
    "iff dif wou giv nev abo bou ugh oug rou rig ord rds thr hre eas pri rin rim ary nar ona"
).split())
_LETTER27 = bytearray([26]) * 256
for _i in range(26):
    _LETTER27[65 + _i] = _LETTER27[97 + _i] = _i
LETTER27 = bytes(_LETTER27)
_TRIGRAM = np.zeros(27 ** 3, np.uint8)
_TRIGRAM.reshape(27, 27, 27)[:26, :26, :26] = 1
for _t in _COMMON_TRIGRAMS:
    _TRIGRAM[(ord(_t[0]) - 97) * 729 + (ord(_t[1]) - 97) * 27 + ord(_t[2]) - 97] = 0
for _v in "aeiou":
    _TRIGRAM.reshape(27, 27, 27)[:, ord(_v) - 97, :] += 2
for _a in range(26):
    for _b in range(26):
        if chr(97 + _a) + chr(97 + _b) not in _COMMON_PAIRS:
            _TRIGRAM.reshape(27, 27, 27)[_a, _b, :] += 4
# How deep in the BPE vocabulary each letter trigram sits (vocab_tables.py, generated from the
# Llama-3 vocabulary): values 8..31 of the same lookup hold its level 0..3 (times 8).


def _unpack(lines: tuple[str, ...], n: int) -> np.ndarray:
    packed = zlib.decompress(base64.b64decode("".join(lines)))
    bits = np.unpackbits(np.frombuffer(packed, np.uint8)).reshape(-1, 2)[:n]
    return (bits[:, 0] * 2 + bits[:, 1]).astype(np.uint8)


_TRIGRAM += _unpack(TRIGRAMS, 27 ** 3) * 8
# The same for letter 4-grams: level 0..3 of ((c0*27 + c1)*27 + c2)*27 + c3.
QUADGRAM_LEVEL = _unpack(QUADGRAMS, 27 ** 4)
# How many vocabulary tokens hold each character U+0080..U+FFFF (level 0 many .. 3 none).
CHAR_LEVEL = _unpack(CHARS, 0x10000)
CHAR_LEVEL[0xFFFF] = 0  # (a non-character; stands for every code point above it, see _measure_exact)

FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"n:{c}" for c in TOTALS) + tuple(f"t:{n}" for n, _, _ in TRANSITIONS)
    + tuple(f"r:{c}/{k}" for c, k in RUN_STEPS) + tuple(f"z:{n}" for n, _ in SCRIPTS)
    + ("b:rare", "b:tri", "b:vow", "v:3k", "v:30k", "v:none", "w:3k", "w:30k", "w:none", "u:lt100", "u:lt10", "u:none")
)
N_FEATURES = len(FEATURE_NAMES)

# Tables and matrices that turn the per-call counts into features, built once at import.
# _measure_exact costs a fixed ~1 µs per numpy call, which on a 1 KB text outweighs the data,
# so it is written as few calls as possible: one bincount + one matmul per group of features.
_NT, _NTR, _NR = len(TOTALS), len(TRANSITIONS), len(RUN_STEPS)
_CLASS_END = _NT + _NTR + _NR  # totals, transitions and run steps come first in FEATURE_NAMES
_END_PAD = bytes([_K])  # a sentinel class padding the class codes at both ends
# Runs are binned by (class, L mod 24): 24 is a multiple of every run-step k, so a run of
# length 24q + b has b letters of the class and ⌊b/k⌋ steps from its bin, plus 24q and 24q/k
# from the quotient (added separately, only when a run is 24 or longer).
_CAP = 24
assert all(_CAP % k == 0 for _, k in RUN_STEPS)
_HIST_W = np.zeros(((_K + 1) * _CAP, _CLASS_END))
_QUOT_W = np.zeros((_K + 1, _CLASS_END))
for _j, _c in enumerate(TOTALS):
    _HIST_W[_CODE[_c] * _CAP:(_CODE[_c] + 1) * _CAP, _j] = np.arange(_CAP)
    _QUOT_W[_CODE[_c], _j] = _CAP
for _j, (_c, _k) in enumerate(RUN_STEPS):
    _HIST_W[_CODE[_c] * _CAP:(_CODE[_c] + 1) * _CAP, _NT + _NTR + _j] = np.arange(_CAP) // _k
    _QUOT_W[_CODE[_c], _NT + _NTR + _j] = _CAP // _k
# class pair (a * 24 + b) -> its transition, or _NTR for none (no pair is in two transitions)
_PAIR = np.full((_K + 1) * _CAP, _NTR, np.uint8)
for _j, (_n, _src, _dst) in enumerate(TRANSITIONS):
    for _a in _src:
        for _b in _dst:
            assert _PAIR[_CODE[_a] * _CAP + _CODE[_b]] == _NTR, "transitions overlap"
            _PAIR[_CODE[_a] * _CAP + _CODE[_b]] = _j
# Lexical and character keys share one bincount: a letter 4-gram maps to its leading
# trigram's value (_TRIGRAM, < 32) * 4 + its own level (< 4), so < 128; a code point maps to
# 128 + script * 4 + level (script 0 = none, else 1 + its index in SCRIPTS; the script is the
# second UTF-8 byte after an 0xE0/0xE1 lead, i.e. bits 6..11 of code points U+0800..U+1FFF).
_LEX = (np.repeat(_TRIGRAM, 27) * 4 + QUADGRAM_LEVEL).astype(np.uint8)
_CHAR = (128 + CHAR_LEVEL).astype(np.uint8)
_cps = np.arange(0x800, 0x2000)
for _j, (_n, _vals) in enumerate(SCRIPTS):
    _CHAR[_cps[np.isin(0x80 | ((_cps >> 6) & 0x3F), list(_vals))]] += 4 * (_j + 1)
_NKEYS = 128 + 4 * (len(SCRIPTS) + 1)
_SCRIPTS_AT, _BITS_AT, _QUAD_AT, _CHARS_AT = 0, len(SCRIPTS), len(SCRIPTS) + 6, len(SCRIPTS) + 9
# looked-up trigram value -> rare, tri, vow, then the vocabulary depth: level >= 1, >= 2, == 3
_BITS = np.array([[(v >> 2) & 1, v & 1, (v >> 1) & 1, v >= 8, v >= 16, v >= 24] for v in range(32)], float)
_AT_LEAST = np.array([[v >= 1, v >= 2, v >= 3] for v in range(4)], float)
_KEYS_W = np.zeros((_NKEYS, N_FEATURES - _CLASS_END))
for _v in range(128):
    _KEYS_W[_v, _BITS_AT:_QUAD_AT] = _BITS[_v >> 2]
    _KEYS_W[_v, _QUAD_AT:_CHARS_AT] = _AT_LEAST[_v & 3]
for _s in range(len(SCRIPTS) + 1):
    for _lv in range(4):
        if _s:
            _KEYS_W[128 + 4 * _s + _lv, _SCRIPTS_AT + _s - 1] = 1.0
        _KEYS_W[128 + 4 * _s + _lv, _CHARS_AT:] = _AT_LEAST[_lv]
# On long texts one count per code point in the shared bincount costs more than counting the
# levels with three comparisons and the scripts from the (few) 0xE0/0xE1 lead bytes.
_LONG_BYTES = 4096
_SCRIPT_W = np.zeros((256, len(SCRIPTS)))
for _j, (_n, _vals) in enumerate(SCRIPTS):
    for _v in _vals:
        _SCRIPT_W[_v, _j] = 1.0
_LEAD_E = _CODE["i"]
# Group of each feature, for the calibrator (content groups in priors.CONTENT_GROUPS).
def _group(name: str) -> str:
    kind, what = name.split(":", 1)
    if kind in "bvw":
        return "lex"
    if kind in "zu":
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

SAMPLE_CHARS = 65_536
_SAMPLE_BLOCKS = 32
_EMPTY = np.zeros(N_FEATURES)


def _measure_exact(text: str) -> np.ndarray:
    raw = text.encode("utf-8", "surrogatepass")
    n = len(raw)
    if n == 0:
        return _EMPTY.copy()
    out = np.empty(N_FEATURES)
    # class codes between two sentinels: the changes are at 0, every run boundary, and n
    codes = np.frombuffer(_END_PAD + raw.translate(CLASS_TABLE) + _END_PAD, np.uint8)
    change = (codes[1:] != codes[:-1]).nonzero()[0]
    nxt = codes[1:].take(change)  # the class of each run, then the end sentinel
    lens = change[1:] - change[:-1]
    cls = nxt[:-1]
    key = np.multiply(cls, _CAP, dtype=np.intp)  # class * 24: + L mod 24, or + the next class
    quot = None
    if lens.max() >= _CAP:
        big = (lens >= _CAP).nonzero()[0]  # few: long words, indentation, digit strings
        quot, lens[big] = np.divmod(lens[big], _CAP)
        big_cls = cls.take(big)
    hist = np.bincount(key + lens, minlength=(_K + 1) * _CAP)
    rows = hist.nonzero()[0]  # few: only the weight rows they select are read (cache-cold servers)
    np.matmul(hist.take(rows), _HIST_W.take(rows, axis=0), out=out[:_CLASS_END])
    if quot is not None:
        out[:_CLASS_END] += np.bincount(big_cls, weights=quot, minlength=_K + 1) @ _QUOT_W
    out[_NT:_NT + _NTR] = np.bincount(_PAIR.take(key + nxt[1:]), minlength=_NTR + 1)[:_NTR]
    # letter 4-grams, padded so that every byte starts one (exact, additive counts); a 4-gram
    # or trigram that holds a pad is level 0
    let = np.frombuffer(b"\x1a" + raw.translate(LETTER27) + b"\x1a\x1a", np.uint8).astype(np.uint16)
    pair = let[:-1] * 27 + let[1:]  # letter pairs; a 4-gram is a pair * 729 + the pair after it
    keys = _LEX.take(np.multiply(pair[:-2], 729, dtype=np.uint32) + pair[2:])
    long_text = False
    if not text.isascii():
        cps = np.minimum(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32), 0xFFFF)
        # (U+FFFF and up: level 0; class "4" counts them)
        if n < _LONG_BYTES:
            keys = np.concatenate((keys, _CHAR.take(cps)))
        else:
            long_text = True
            level = CHAR_LEVEL.take(cps)
            lead = (codes[1:-1] == _LEAD_E).nonzero()[0]
            scripts = np.bincount(np.frombuffer(raw, np.uint8).take(lead + 1), minlength=256) @ _SCRIPT_W
    np.matmul(np.bincount(keys, minlength=_NKEYS), _KEYS_W, out=out[_CLASS_END:])
    if long_text:
        out[_CLASS_END + _SCRIPTS_AT:_CLASS_END + _BITS_AT] = scripts
        out[_CLASS_END + _CHARS_AT:] = [np.count_nonzero(level >= k) for k in (1, 2, 3)]
    return out


def sample(text: str) -> tuple[str, float]:
    """The text itself, or for one longer than SAMPLE_CHARS evenly spaced blocks of it, with the
    factor that scales the blocks' counts up to the whole text."""
    n = len(text)
    if n <= SAMPLE_CHARS:
        return text, 1.0
    block = SAMPLE_CHARS // _SAMPLE_BLOCKS
    stride = n // _SAMPLE_BLOCKS
    blocks = "".join(text[i * stride: i * stride + block] for i in range(_SAMPLE_BLOCKS))
    return blocks, n / len(blocks)


def measure(text: str) -> np.ndarray:
    """Feature counts of one text (aligned with FEATURE_NAMES)."""
    part, factor = sample(text)
    return _measure_exact(part) if factor == 1.0 else _measure_exact(part) * factor


def measure_sampled(text: str, factor: float) -> np.ndarray:
    """Feature counts of a ``sample`` of a text, scaled up by its factor."""
    return _measure_exact(text) if factor == 1.0 else _measure_exact(text) * factor


def utf8_len(text: str) -> int:
    """UTF-8 byte length of decoded text (what the paper's bytes-per-token ratio divides)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
