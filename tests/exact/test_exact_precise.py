"""The precise local count (precise.py): quicktok, with Hugging Face only on the words holding a
pair of tokens Hugging Face's merges would not make, equals Hugging Face's count — on every dev
text, on words found where the two differ, and on adversarial strings built from them."""

from __future__ import annotations

import json
import pathlib

import pytest
import quicktok
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.exact import precise as precise_mod
from extproc.exact.local import quick_counter
from extproc.exact.precise import PreciseQuick
from extproc.tokens import counter_for

TEXTS = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "texts" / "dev_texts.jsonl"
FAMILIES = ("llama3", "qwen3")
# found by fuzzing where quicktok alone and Hugging Face differ (quicktok: fewer tokens), ASCII included
HARD = (" rahati", "aající", " .:.:.::", " .:.:.:\n", " seviyorum", "seviyorum.", "x seviyorum",
        "a,seviyorum  seviyorum\n\n seviyorum", "  seviyorum", "'seviyorum", "— přičemž ovliv\xa0😀 rahatsızing",
        " množ vardı tisícávací характериз değişikőилакти  .:.:.:.:.:.:.:.:\n\n Insecta—",
        "\U000323b0'seviyorum", "")  # (a letter to quicktok's newer Unicode tables, not to HF's)
PIECES = ("a", "e", "i", "orum", "ler", "ing", "ß", "ı", "ş", "ğ", "ж", "ии", "ő", "ř", "1", "23", "456", "'s", "'T",
          "'ll", "!", "?!", "...", ".:", ":", "-", "_", "__(", "self", "(", ")", '"', "«", "—", "😀", "東京", "語", " ",
          "  ", "   ", "\n", "\t", "\r\n", "\n\n", " \n", "\xa0", "\u3000", "ABC", "Z", " rahat", "aa", "jící",
          " việc", " değiş", " характ", "mektedir", " každ", " nhiệm", "ektedir", " použ", "ıldı")


@pytest.fixture(scope="module")
def counters():
    return {f: (counter_for(f), quick_counter(counter_for(f), f)) for f in FAMILIES}


def dev_texts() -> list[str]:
    if not TEXTS.is_file():
        pytest.skip(f"shared texts not found at {TEXTS}")
    return [json.loads(line)["text"] for line in TEXTS.read_text(encoding="utf-8").splitlines() if line]


@pytest.mark.parametrize("family", FAMILIES)
def test_precise_equals_hugging_face_on_every_dev_text(family, counters):
    texts = dev_texts()
    hf, precise = counters[family]
    truth = [len(t.ids) for t in hf._tok.encode_batch(texts, add_special_tokens=False)]
    assert [precise.count_text(t) for t in texts] == truth
    if family == "llama3":  # the test can fail: quicktok alone is short on a few (Turkish, Czech, Cyrillic)
        quick = quicktok.get_encoding("llama3")
        assert sum(quick.count(t) != n for t, n in zip(texts, truth)) >= 3


@pytest.mark.parametrize("family", FAMILIES)
def test_precise_equals_hugging_face_where_quicktok_alone_differs(family, counters):
    hf, precise = counters[family]
    for text in HARD + tuple(h * 50 for h in HARD) + ("123seviyorum<|eot_id|> seviyorum",):
        assert precise.count_text(text) == hf.count_text(text), text
    if family == "llama3":
        assert quicktok.get_encoding("llama3").count(" rahati") == 2 < hf.count_text(" rahati") == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_code_points_the_two_pre_tokenizers_read_apart_are_counted_on_hugging_face(family, counters):
    """Every code point quicktok's Unicode tables call a letter and Hugging Face's do not
    (probed over all code points: precise.py), in contexts where the reading moves a word edge."""
    hf, precise = counters[family]
    cps = [c for a, b in precise_mod.NEWER_LETTERS for c in range(a, b + 1)]
    assert len(cps) == 4644 and all(precise_mod.unsure_code_points()[c] for c in cps)
    probes = [f"{chr(c)}'seviyorum {chr(c)}1 a{chr(c)}b {chr(c)}  x" for c in cps]
    truth = [len(e.ids) for e in hf._tok.encode_batch(probes, add_special_tokens=False)]
    assert [precise.count_text(t) for t in probes] == truth
    if family == "llama3":  # the test can fail: quicktok alone reads them as letters
        quick = quicktok.get_encoding("llama3")
        assert sum(quick.count(t) != n for t, n in zip(probes, truth)) > 4000


fragment = st.one_of(st.sampled_from(PIECES), st.sampled_from(HARD),
                     st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6))


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(fragment, max_size=40))
def test_precise_equals_hugging_face_on_adversarial_strings(family, counters, parts):
    hf, precise = counters[family]
    text = "".join(parts)
    assert precise.count_text(text) == hf.count_text(text)


def test_tables_stay_bounded_and_a_lost_pair_is_only_checked_again(monkeypatch):
    monkeypatch.setattr(precise_mod, "GOOD_SLOTS", 8)   # every pair evicts another
    monkeypatch.setattr(precise_mod, "BAD_SLOTS", 4)
    monkeypatch.setattr(precise_mod, "SPILL", 16)
    monkeypatch.setattr(precise_mod, "CACHE_SPANS", 64)
    hf = counter_for("llama3")
    tiny = quick_counter(hf, "llama3")
    p: PreciseQuick = tiny._tok._q
    assert len(p.good.keys) == 8 and len(p.bad.keys) == 4
    texts = dev_texts()[::40] + list(HARD)
    for _ in range(2):
        assert [tiny.count_text(t) for t in texts] == [hf.count_text(t) for t in texts]
    for i in range(64 + 10):  # distinct foreign words: the table of spans stays bounded
        p.count(f" seviyorum{i}x rahati{i}")
    assert len(p._cache) <= 64 and len(p._spill) <= 16
