"""Byte-class features: additivity, ASCII purity, sampling of long texts, prior sanity on real text."""

from __future__ import annotations

import random
import statistics
import time

import numpy as np
import orjson
import pytest

from extproc.budget import BudgetRouter
from extproc.budget import features as F
from extproc.budget.calibrate import load_priors
from extproc.budget.features import FEATURE_NAMES, N_FEATURES, SAMPLE_CHARS, measure, utf8_len

IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}
NON_ASCII_TOTALS = [IDX[f"n:{c}"] for c in "ergyAiGhkf4"]
NON_ASCII = NON_ASCII_TOTALS + [IDX[n] for n in FEATURE_NAMES if n.startswith(("z:", "u:"))] + \
    [IDX[n] for n in ("t:s>u", "t:p>u", "t:u>a", "t:a>u", "t:u>s", "t:u>p")]
TOTALS = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith("n:")]
TRI = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith(("b:", "v:"))]
QUAD = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith("w:")]

SAMPLES = [
    "The quick brown fox jumps over the lazy dog. It was 12:30 on 2024-06-01.",
    "def parse(self, raw: bytes) -> dict:\n    if not raw:\n        return {}\n    return json.loads(raw)\n",
    '{"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}',
    "大型语言模型的推理服务需要管理显存，上下文长度决定了KV缓存的大小。",
    "Привет, мир! Ελληνικά κείμενα. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया। สวัสดีชาวโลก 😀🚀 한국어 텍스트",
    "Größenänderung für Übergänge — «citations» et ligatures: ﬁ, ½, №, ™, ∑∫√ ≤ ≥.",
    "",
    "\t\r\n  \n\n    x",
]


def test_feature_vector_shape():
    v = measure("hello")
    assert v.shape == (N_FEATURES,) == (len(FEATURE_NAMES),)
    assert measure("").sum() == 0
    assert v[IDX["n:l"]] == 5 and v[TOTALS].sum() == 5


def test_known_counts():
    v = measure("Hello World 123\n  camelCase")
    assert v[IDX["n:l"]] == 4 + 4 + 8
    assert v[IDX["n:U"]] == 3
    assert v[IDX["n:d"]] == 3
    assert v[IDX["n:s"]] == 4
    assert v[IDX["n:n"]] == 1
    assert v[IDX["t:s>U"]] == 1   # " W"
    assert v[IDX["t:l>U"]] == 1   # "lC"
    assert v[IDX["t:s>d"]] == 1   # " 1"
    assert v[IDX["r:d/3"]] == 1 and v[IDX["r:d/2"]] == 1
    assert v[IDX["r:s/2"]] == 1   # the two-space indentation
    assert v[IDX["r:l/4"]] == 1 + 1 + 1  # "ello", "orld", "amel": runs of 4 lower-case letters
    cjk = measure("中文。")
    assert cjk[IDX["n:h"]] == 3 and cjk[TOTALS].sum() == 3  # one count per character, not per byte
    assert measure("😀")[IDX["n:4"]] == 1


@pytest.mark.parametrize("a", SAMPLES)
@pytest.mark.parametrize("b", SAMPLES)
def test_features_are_additive_over_concatenation(a, b):
    whole, parts = measure(a + b), measure(a) + measure(b)
    # class totals and script counts are exact; transitions and run steps change only at the join
    np.testing.assert_array_equal(whole[TOTALS], parts[TOTALS])
    diff = np.abs(whole - parts)
    assert diff.max() <= 1, {FEATURE_NAMES[i]: d for i, d in enumerate(diff) if d > 1}
    assert diff.sum() <= 8


def test_additivity_on_real_texts(dev_texts):
    rng = random.Random(5)
    texts = [r["text"] for r in dev_texts]
    for _ in range(100):
        a, b = rng.choice(texts), rng.choice(texts)
        whole, parts = measure(a + b), measure(a) + measure(b)
        np.testing.assert_array_equal(whole[TOTALS], parts[TOTALS])
        # two letter trigrams (b:, v:) and three 4-grams (w:) can span the join; every other
        # feature differs by at most 1
        diff = np.abs(whole - parts)
        assert diff[QUAD].max() <= 3 and diff[TRI].max() <= 2
        assert np.delete(diff, QUAD + TRI).max() <= 1


@pytest.mark.parametrize("text", SAMPLES[:3] + [SAMPLES[7], "".join(chr(c) for c in range(128))])
def test_ascii_text_has_no_non_ascii_features(text):
    assert text.isascii()
    v = measure(text)
    assert np.all(v[NON_ASCII] == 0)
    assert v[TOTALS].sum() == sum(1 for ch in text if 32 <= ord(ch) < 127 or ch in "\t\n\r\x0b\x0c")
    assert utf8_len(text) == len(text)


def test_non_ascii_text_has_non_ascii_features():
    assert measure(SAMPLES[3])[IDX["n:h"]] > 20
    v = measure(SAMPLES[4])
    for name in ("n:y", "n:g", "n:A", "n:i", "n:k", "n:4", "z:deva", "z:thai"):
        assert v[IDX[name]] > 0, name
    assert utf8_len(SAMPLES[3]) == len(SAMPLES[3].encode())


def test_vocabulary_depth_of_letter_ngrams():
    english = "Artificial intelligence is changing the world quickly. I like learning new technologies."
    tagalog = "Ang artipisyal na katalinuhan ay mabilis na nagbabago sa mundo. Gusto kong matuto."
    for text, deep in ((english, False), (tagalog, True)):
        v = measure(text)
        letters = v[IDX["n:l"]] + v[IDX["n:U"]]
        share = v[IDX["w:30k"]] / letters  # 4-grams no token among the first 30,000 holds
        assert (share > 0.15) == deep, (text, share)
        assert v[IDX["w:3k"]] >= v[IDX["w:30k"]] >= v[IDX["w:none"]]
        assert v[IDX["v:3k"]] >= v[IDX["v:30k"]] >= v[IDX["v:none"]]
    # a word no vocabulary token holds any 4-gram of; case does not matter; a digit or a space
    # breaks the n-gram
    assert measure("qxzj")[IDX["w:none"]] == measure("QXZJ")[IDX["w:none"]] == 1
    assert measure("qxzjqxzj")[IDX["w:none"]] == 5
    assert measure("qx zj")[[IDX["w:3k"], IDX["v:3k"]]].sum() == 0
    assert measure("the ")[IDX["w:3k"]] == 0 and measure("thex")[IDX["w:3k"]] == 1


def test_vocabulary_depth_of_characters():
    russian, kazakh = measure("Искусственный интеллект"), measure("әңғүұқөһі")
    assert russian[IDX["u:lt100"]] <= 2 and russian[IDX["u:none"]] == 0
    assert kazakh[IDX["u:none"]] >= 5  # letters the Llama-3 vocabulary holds in no token
    assert measure("😀 é")[[IDX["u:lt100"], IDX["u:lt10"], IDX["u:none"]]].sum() == 0  # emoji: class "4"
    assert measure("\uffff")[IDX["u:none"]] == 0


def test_vocab_tables_are_the_tokenizer_vocabulary():
    """The generated tables are what benchmarks/vocab_tables.py derives from the tokenizer."""
    pytest.importorskip("quicktok")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "vocab_tables.py"
    spec = importlib.util.spec_from_file_location("vocab_tables_gen", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.LETTER27 == F.LETTER27
    tri, quad, chars = gen.tables()
    np.testing.assert_array_equal(F._TRIGRAM >> 3, tri)
    np.testing.assert_array_equal(F.QUADGRAM_LEVEL, quad)
    chars[0xFFFF] = 0
    np.testing.assert_array_equal(F.CHAR_LEVEL, chars)


def test_lone_surrogate_in_text_is_measured():
    v = measure("ab\ud800cd")
    assert v[IDX["n:l"]] == 4
    assert utf8_len("ab\ud800cd") == 7


def test_measure_at_the_sample_threshold_is_exact():
    text = ("abc def " * (SAMPLE_CHARS // 8 + 1))[:SAMPLE_CHARS]
    np.testing.assert_array_equal(measure(text), F._measure_exact(text))


def test_long_text_is_sampled(monkeypatch):
    seen = []
    real = F._measure_exact

    def spy(text):
        seen.append(len(text))
        return real(text)

    monkeypatch.setattr(F, "_measure_exact", spy)
    text = "x" * (SAMPLE_CHARS * 8 + 123)
    v = measure(text)
    assert seen == [SAMPLE_CHARS]  # only the sample is measured
    assert v[IDX["n:l"]] == pytest.approx(len(text), rel=1e-9)  # and scaled to the whole


@pytest.mark.parametrize("category", ["en_prose", "code", "zh", "multilingual", "json"])
@pytest.mark.parametrize("n", [SAMPLE_CHARS + 1, 400_000, 1_000_003])
def test_sampled_features_match_the_exact_measure(dev_texts, category, n):
    """A homogeneous long text (one real text repeated): sampled and scaled totals ≈ exact."""
    text = max((r["text"] for r in dev_texts if r["category"] == category), key=len)
    big = (text * (n // len(text) + 1))[:n]
    sampled, exact = measure(big), F._measure_exact(big)
    assert sampled[TOTALS].sum() == pytest.approx(exact[TOTALS].sum(), rel=0.01)
    for i in TOTALS:
        if exact[i] > 0.05 * exact[TOTALS].sum():  # every major class
            assert sampled[i] == pytest.approx(exact[i], rel=0.05), FEATURE_NAMES[i]
    coef = load_priors()["llama3"].coef
    assert sampled @ coef == pytest.approx(exact @ coef, rel=0.02)


def test_sampling_bounds_the_time():
    text = "Some prose, some code(); 12345 — and a little 中文. " * 100_000  # ~5 MB
    measure(text[:1000])
    t0 = time.perf_counter()
    measure(text)
    assert time.perf_counter() - t0 < 0.25


# --- prior sanity on real text ------------------------------------------------------------------

@pytest.fixture(scope="module")
def count_chat():
    """Prompt tokens of a chat as vLLM counts them (extproc.tokens: the family's own template and
    tokenizer.json); skipped when the tokenizer files can be neither found nor fetched."""
    from extproc.tokens import counter_for

    try:
        counters = {f: counter_for(f) for f in ("llama3", "qwen3")}
    except (OSError, RuntimeError) as e:
        pytest.skip(f"tokenizer files not available: {e}")
    return lambda messages, family: counters[family].count_chat(messages)


@pytest.mark.parametrize("category", ["en_prose", "code"])
def test_prior_estimate_within_15_percent_on_completions(dev_texts, category):
    """/v1/completions: the truth is the text's llama3 count plus the BOS token."""
    r = BudgetRouter()
    rows = [x for x in dev_texts if x["category"] == category and x["tokens"]["llama3"] >= 50]
    assert len(rows) >= 80
    errs = []
    for x in rows:
        d = r.route(orjson.dumps({"model": "llama-3", "prompt": x["text"]}), "/v1/completions")
        assert d.source == "prior"
        errs.append(d.prompt_tokens / (x["tokens"]["llama3"] + 1) - 1)
    within = sum(abs(e) <= 0.15 for e in errs) / len(errs)
    assert within >= 0.95, f"{category}: only {within:.0%} within 15%"
    assert statistics.median(abs(e) for e in errs) <= 0.05
    assert abs(statistics.mean(errs)) <= 0.05  # no large systematic bias (prose runs ≈ +3.5%)


@pytest.mark.parametrize("category", ["en_prose", "code"])
def test_prior_estimate_within_15_percent_on_chat(dev_texts, count_chat, category):
    r = BudgetRouter()
    rows = [x for x in dev_texts if x["category"] == category and x["tokens"]["llama3"] >= 50]
    errs = []
    for x in rows:
        msgs = [{"role": "user", "content": x["text"]}]
        d = r.route(orjson.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": msgs}))
        errs.append(d.prompt_tokens / count_chat(msgs, "llama3") - 1)
    within = sum(abs(e) <= 0.15 for e in errs) / len(errs)
    assert within >= 0.95, f"{category}: only {within:.0%} within 15%"
    assert statistics.median(abs(e) for e in errs) <= 0.05
    # the conservative budget covers the truth for almost every request
    covered = 0
    for x in rows:
        msgs = [{"role": "user", "content": x["text"]}]
        d = r.route(orjson.dumps({"model": "llama", "messages": msgs, "max_tokens": 0}))
        covered += d.budget_tokens >= count_chat(msgs, "llama3")
    assert covered / len(rows) >= 0.97


# --- the fast measure against a plain reference ---------------------------------------------------

def _reference_measure(text: str) -> np.ndarray:
    """The features computed the plain way (one bincount per feature group, run by run); the
    fast _measure_exact must give exactly the same counts."""
    raw = text.encode("utf-8", "surrogatepass")
    if not raw:
        return np.zeros(N_FEATURES)
    code = {c: i for i, c in enumerate(F.CLASS_LETTERS)}
    codes = np.frombuffer(raw.translate(F.CLASS_TABLE), np.uint8).astype(np.intp)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(codes)) + 1))
    lens = np.diff(np.append(starts, len(raw)))
    cls = codes[starts]
    by_class = np.bincount(cls, weights=lens, minlength=F._K)
    pairs = np.bincount(cls[:-1] * F._K + cls[1:], minlength=F._K * F._K).reshape(F._K, F._K)
    totals = [by_class[code[c]] for c in F.TOTALS]
    trans = [sum(pairs[code[a], code[b]] for a in src for b in dst) for _, src, dst in F.TRANSITIONS]
    runs = [(lens[cls == code[c]] // k).sum() for c, k in F.RUN_STEPS]
    lead = np.flatnonzero(codes[:-1] == code["i"])
    second = np.frombuffer(raw, np.uint8)[lead + 1]
    scripts = [np.isin(second, list(vals)).sum() for _, vals in F.SCRIPTS]
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    level = F.CHAR_LEVEL[np.minimum(cps, 0xFFFF)]
    let = np.frombuffer(b"\x1a" + raw.translate(F.LETTER27) + b"\x1a", np.uint8).astype(np.intp)
    tri = F._TRIGRAM[(let[:-2] * 27 + let[1:-1]) * 27 + let[2:]]
    quad = F.QUADGRAM_LEVEL[((let[:-3] * 27 + let[1:-2]) * 27 + let[2:-1]) * 27 + let[3:]]
    bits = [(tri & 4 > 0).sum(), (tri & 1).sum(), (tri & 2 > 0).sum(),
            (tri >= 8).sum(), (tri >= 16).sum(), (tri >= 24).sum()]
    depth = [(quad >= k).sum() for k in (1, 2, 3)] + [(level >= k).sum() for k in (1, 2, 3)]
    return np.array(totals + trans + runs + scripts + bits + depth, float)


EDGE_CASES = SAMPLES + [
    "a", "1", " ", "\n", "\x00", "\x7f\x80", "😀", "😀😀 a😀", "\ud800", "ab\ud800cd", "\udfff\ud800x",
    "中", "\uffff", "\U0010ffff", "é", "\u0800\u1fff\u0900\u0e01\u1200",
    "x" * 23, "x" * 24, "x" * 25, "X" * 49, " " * 100, "\t" * 24, "\n" * 30, "1" * 73, "-" * 48,
    '"' * 26, "a" * 5000, "1234567890" * 3, "    " * 12 + "return x\n",
    "".join(chr(c) for c in range(0, 0x3000, 7)), "नमस्ते ሰላም ကမ္ဘာ สวัสดี বাংলা",
    ("Größe — «ligatures» 中文 😀 " * 300),  # non-ASCII and over the long-text threshold
]


def _assert_fast_paths_agree(texts, monkeypatch):
    for text in texts:
        expected = _reference_measure(text)
        for long_bytes in (0, 10 ** 9):  # character features counted the short way and the long way
            monkeypatch.setattr(F, "_LONG_BYTES", long_bytes)
            got = F._measure_exact(text)
            assert np.array_equal(got, expected), (
                text[:80], long_bytes,
                {FEATURE_NAMES[i]: (got[i], expected[i]) for i in np.flatnonzero(got != expected)})


def test_fast_measure_matches_reference_on_edge_cases(monkeypatch):
    rng = random.Random(11)
    joined = "".join(EDGE_CASES)
    slices = [joined[i:i + rng.randrange(1, 3000)] for i in (rng.randrange(len(joined)) for _ in range(40))]
    _assert_fast_paths_agree(EDGE_CASES + slices, monkeypatch)


def test_fast_measure_matches_reference_on_real_texts(dev_texts, monkeypatch):
    texts = [r["text"] for r in dev_texts]
    rng = random.Random(13)
    mixed = []
    for _ in range(200):
        a, b = rng.choice(texts), rng.choice(texts)
        i = rng.randrange(len(a) + 1)
        mixed.append(a[i:i + rng.randrange(1, 4000)] + b[:rng.randrange(6000)])
    joined = "\n\n".join(texts)
    mixed += [joined[i:i + 70_000] for i in range(0, len(joined), len(joined) // 3)]
    _assert_fast_paths_agree(texts + mixed, monkeypatch)
