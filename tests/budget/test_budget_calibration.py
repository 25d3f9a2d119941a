"""Online calibration on real texts with exact counts, snapshots, bounded state, source labels."""

from __future__ import annotations

import json
import random
import statistics
import string

import orjson
import pytest

from extproc.budget import BudgetRouter, BudgetSettings
from extproc.budget.calibrate import OVERFLOW_KEY, PAPER_PRIOR_RATIO, paper_category

MODELS = {"llama3": "meta-llama/Llama-3.1-8B-Instruct", "qwen3": "Qwen/Qwen3-8B"}
LATIN = ("en_prose", "code", "math", "json")


def chat(text: str, model: str = "m", **extra) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], **extra})


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


def stream(dev_texts, categories, seed, n=150):
    rows = [r for r in dev_texts if categories is None or r["category"] in categories]
    random.Random(seed).shuffle(rows)
    return [r["text"] for r in rows[:n]]


def replay(count_chat, texts, family, skew=1.0, learn=50):
    """Learn from the first ``learn`` texts; return (calibrated, prior) absolute relative errors
    and estimate/truth ratios on the rest, plus the router."""
    model = MODELS[family]
    router, prior = BudgetRouter(), BudgetRouter()
    truths = [round(count_chat([{"role": "user", "content": t}], family) * skew) for t in texts]
    for t, y in zip(texts[:learn], truths[:learn]):
        err = router.observe(router.route_learnable(chat(t, model))[1], y)
        assert err is not None
    cal, pri, ratio = [], [], []
    for t, y in zip(texts[learn:], truths[learn:]):
        d = router.route(chat(t, model))
        assert d.source == "calibrated"
        cal.append(abs(d.prompt_tokens / y - 1))
        ratio.append(d.prompt_tokens / y)
        pri.append(abs(prior.route(chat(t, model)).prompt_tokens / y - 1))
    return statistics.mean(cal), statistics.mean(pri), statistics.mean(ratio), router


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_convergence_on_latin_script_texts(dev_texts, count_chat, family):
    texts = stream(dev_texts, LATIN, seed=0)
    assert len(texts) == 150
    mape, prior_mape, ratio, router = replay(count_chat, texts, family)
    assert router.estimator.samples(MODELS[family]) == 50
    assert mape <= 0.04, f"{family}: MAPE after 50 samples {mape:.2%} (prior {prior_mape:.2%})"
    assert abs(ratio - 1) < 0.03


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_convergence_on_the_full_mix(dev_texts, count_chat, family):
    # every category incl. multilingual (≈11% per-text error) and very short chat prompts: the
    # 4% target is not reached on this mix (≈5%, at the prior's level); this bounds regressions
    texts = stream(dev_texts, None, seed=0)
    mape, prior_mape, ratio, _ = replay(count_chat, texts, family)
    assert mape <= 0.07, f"{family}: full-mix MAPE {mape:.2%} (prior {prior_mape:.2%})"
    assert mape <= prior_mape + 0.01


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_calibration_follows_a_systematic_skew(dev_texts, count_chat, family):
    texts = stream(dev_texts, None, seed=1)
    mape, prior_mape, ratio, router = replay(count_chat, texts, family, skew=1.15)
    assert prior_mape > 0.10  # the prior does not know about the skew
    assert mape < prior_mape - 0.05, f"{family}: skewed MAPE {mape:.2%} vs prior {prior_mape:.2%}"
    assert mape <= 0.07
    # estimates moved up from ≈1/1.15 = 0.87 of the truth (most of these texts are short, and a
    # short prompt teaches the rates less than a long one: no flood of short samples moves them far)
    assert ratio > 0.95
    scales = router.calibration(MODELS[family])["scales"]
    assert scales["latin"] > 1.05


# --- source labels ----------------------------------------------------------------------------

def test_source_labels():
    r = BudgetRouter()
    calibrated_after = r.estimator.s.calibrated_after
    assert calibrated_after == 20
    raw = chat("Some ordinary English text for the label test. " * 5, "label-model")
    for i in range(calibrated_after):
        d, obs = r.route_learnable(raw)
        assert d.source == "prior", f"after {i} samples"
        r.observe(obs, d.prompt_tokens + 3)
    assert r.route(raw).source == "calibrated"
    assert r.route(chat("x", "another-model")).source == "prior"  # per model key
    exact = r.route(orjson.dumps({"model": "label-model", "prompt": [5] * 40}), "/v1/completions")
    assert (exact.source, exact.prompt_tokens) == ("exact", 40)


def test_paper_ema_source_labels():
    r = BudgetRouter(BudgetSettings(estimator="paper-ema"))
    raw = chat("Some ordinary English text for the label test. " * 5)
    for _ in range(20):
        d, obs = r.route_learnable(raw)
        assert d.source == "prior"
        r.observe(obs, 60)
    assert r.route(raw).source == "calibrated"


def test_fixed_ratio_source_and_value():
    r = BudgetRouter(BudgetSettings(estimator="fixed-ratio"))
    d, obs = r.route_learnable(orjson.dumps({"prompt": "abcd" * 1000}), "/v1/completions")
    assert (d.source, d.prompt_tokens, d.budget_tokens) == ("fixed", 1000, 1000 + 1024)
    assert r.observe(obs, 5000) is None


# --- paper EMA --------------------------------------------------------------------------------

def test_paper_ema_converges_to_a_constant_ratio():
    r = BudgetRouter(BudgetSettings(estimator="paper-ema"))
    text = "Plain English prose about nothing in particular, repeated for a while. " * 30
    d, obs = r.route_learnable(chat(text))
    nbytes = obs.prompts[0].text_bytes
    assert paper_category(obs.prompts[0]) == "prose"
    target = 3.0  # observed bytes per token
    for _ in range(80):
        d, obs = r.route_learnable(chat(text))
        r.observe(obs, round(nbytes / target))
    cal = r.calibration("m")["prose"]
    assert cal["samples"] == 80
    assert cal["ratio"] == pytest.approx(nbytes / round(nbytes / target), abs=0.01)
    assert cal["sigma"] < 0.01
    d = r.route(chat(text))
    assert d.prompt_tokens == pytest.approx(nbytes / target, rel=0.01)


def test_paper_ema_follows_real_prose_ratios(dev_texts, count_chat):
    r = BudgetRouter(BudgetSettings(estimator="paper-ema"))
    beta = r.estimator.s.beta
    expected = {}
    texts = stream(dev_texts, ("en_prose",), seed=3, n=60)
    for t in texts:
        d, learnable = r.route_learnable(chat(t))
        y = count_chat([{"role": "user", "content": t}], "llama3")
        cat = paper_category(learnable.prompts[0])
        obs = learnable.prompts[0].text_bytes / y
        c = expected.get(cat, PAPER_PRIOR_RATIO[cat])
        expected[cat] = beta * c + (1 - beta) * obs
        r.observe(learnable, y)
    cal = r.calibration("m")
    assert set(cal) == set(expected)
    for cat, c in expected.items():
        assert cal[cat]["ratio"] == pytest.approx(c, abs=1e-3)
    prose = cal["prose"]
    assert prose["samples"] > 40
    # the observed bytes per chat-prompt token of prose is below the paper's 4.48 prior
    assert prose["ratio"] < PAPER_PRIOR_RATIO["prose"] - 0.1


# --- snapshots --------------------------------------------------------------------------------

def _bodies() -> list[tuple[bytes, str]]:
    out = []
    for model in ("alpha", "beta", "qwen-x", "never-seen"):
        out.append((chat("A sentence of English prose. " * 40, model), "/v1/chat/completions"))
        out.append((chat("def f(x):\n    return [i * 2 for i in range(x)]\n" * 60, model, max_tokens=99),
                    "/v1/chat/completions"))
        out.append((chat("中文文本的估计。" * 300, model), "/v1/chat/completions"))
        out.append((orjson.dumps({"model": model, "prompt": ["short", "long " * 3000]}), "/v1/completions"))
    return out


def _public(d):
    return (d.pool, d.prompt_tokens, d.budget_tokens, d.reason, d.source, d.output_tokens, d.detail, d.fits)


def _train(r: BudgetRouter, n_extra_models: int = 0) -> None:
    rng = random.Random(7)
    for i in range(300):
        body, path = _bodies()[i % 12]
        d, obs = r.route_learnable(body, path)
        r.observe(obs, max(1, round(d.prompt_tokens * rng.uniform(0.9, 1.3))))
    for i in range(n_extra_models):
        d, obs = r.route_learnable(chat("x y z " * 400, f"extra-{i}"))
        r.observe(obs, d.prompt_tokens + 50)


@pytest.mark.parametrize("estimator", ["feature-kalman", "paper-ema", "fixed-ratio"])
def test_snapshot_round_trip_gives_identical_decisions(estimator):
    settings = BudgetSettings(estimator=estimator)
    a = BudgetRouter(settings)
    _train(a, n_extra_models=80 if estimator != "fixed-ratio" else 0)
    snap = a.snapshot()
    doc = json.loads(json.dumps(snap))
    b = BudgetRouter(settings)
    b.restore(doc)
    assert b.snapshot() == json.loads(json.dumps(snap))
    bodies = _bodies() + [(chat("brand new " * 100, "zzz-unseen-model"), "/v1/chat/completions")]
    for body, path in bodies:
        assert _public(a.route(body, path)) == _public(b.route(body, path))
    if estimator != "fixed-ratio":
        assert len(doc["keys"]) == 64 and OVERFLOW_KEY in doc["keys"]
        # both continue to learn identically
        for body, path in bodies:
            (da, oa), (db, ob) = a.route_learnable(body, path), b.route_learnable(body, path)
            assert a.observe(oa, da.prompt_tokens + 17) == b.observe(ob, db.prompt_tokens + 17)
        for body, path in bodies:
            assert _public(a.route(body, path)) == _public(b.route(body, path))


def test_snapshot_changes_decisions_after_learning():
    a = BudgetRouter()
    fresh = BudgetRouter()
    _train(a)
    assert a.snapshot()["keys"]
    changed = [_public(a.route(b, p)) != _public(fresh.route(b, p)) for b, p in _bodies()]
    assert any(changed)  # so the round-trip test above compares something


@pytest.mark.parametrize("src,dst", [("feature-kalman", "paper-ema"), ("paper-ema", "feature-kalman"),
                                     ("fixed-ratio", "feature-kalman"), ("feature-kalman", "fixed-ratio")])
def test_restore_wrong_estimator_raises(src, dst):
    a = BudgetRouter(BudgetSettings(estimator=src))
    _train(a)
    b = BudgetRouter(BudgetSettings(estimator=dst))
    before = b.snapshot()
    with pytest.raises(ValueError, match="estimator"):
        b.restore(json.loads(json.dumps(a.snapshot())))
    assert b.snapshot() == before


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(version=3),
    lambda d: d.update(version=True),
    lambda d: d.update(version="1"),
    lambda d: d.pop("version"),
    lambda d: d.update(keys=[]),
    lambda d: d.update(groups=d["groups"][:-1]),
    lambda d: d.pop("features"),  # a snapshot of a version before the vocabulary features
    lambda d: d.update(features="77:0badf00d"),
])
def test_restore_bad_snapshot_raises(mutate):
    a = BudgetRouter()
    _train(a)
    doc = json.loads(json.dumps(a.snapshot()))
    mutate(doc)
    b = BudgetRouter()
    with pytest.raises(ValueError):
        b.restore(doc)
    assert b.snapshot()["keys"] == {}


@pytest.mark.parametrize("doc", [None, [], "snapshot", {}])
def test_restore_non_snapshot_raises(doc):
    with pytest.raises(ValueError):
        BudgetRouter().restore(doc)


def test_restore_wrong_dimensions_raises():
    a = BudgetRouter()
    _train(a)
    doc = json.loads(json.dumps(a.snapshot()))
    key = next(iter(doc["keys"]))
    doc["keys"][key]["theta"] = doc["keys"][key]["theta"][:-1]
    with pytest.raises(ValueError, match="dimensions"):
        BudgetRouter().restore(doc)


# --- bounded state ----------------------------------------------------------------------------

def _random_names(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_letters + string.digits + "-/._", k=rng.randrange(1, 40)))
            + f"#{i}" for i in range(n)]


@pytest.mark.parametrize("estimator,max_keys", [("feature-kalman", 64), ("feature-kalman", 8),
                                                ("paper-ema", 64), ("paper-ema", 3)])
def test_keys_stay_bounded(estimator, max_keys):
    settings = BudgetSettings(estimator=estimator,
                              estimator_settings={} if max_keys == 64 else {"max_keys": max_keys})
    r = BudgetRouter(settings)
    assert r.estimator.s.max_keys == max_keys
    n = 10_000
    for name in _random_names(n, seed=max_keys):
        d, obs = r.route_learnable(chat("hello there, a short request", name))
        r.observe(obs, d.prompt_tokens + 2)
    states = r.estimator.keys()
    assert len(states) == max_keys
    assert OVERFLOW_KEY in states
    assert len(r.snapshot()["keys"]) == max_keys
    total = sum(r.estimator.samples(k) for k in states)
    assert total == n


def test_routing_alone_creates_no_keys():
    r = BudgetRouter()
    for name in _random_names(2000, seed=1):
        r.route(chat("hi", name))
    assert r.estimator.keys() == []


def test_new_names_past_the_bound_share_the_overflow_state():
    r = BudgetRouter(BudgetSettings(estimator_settings={"max_keys": 4}))
    for name in ("a", "b", "c"):
        d, obs = r.route_learnable(chat("hello", name))
        r.observe(obs, d.prompt_tokens)
    assert set(r.estimator.keys()) == {"a", "b", "c"}
    d, obs = r.route_learnable(chat("hello", "d"))
    r.observe(obs, d.prompt_tokens)
    assert set(r.estimator.keys()) == {"a", "b", "c", OVERFLOW_KEY}
    assert r.estimator.samples("d") == 1 and r.estimator.samples("e") == 1  # both read the overflow
    assert r.estimator.samples("a") == 1


@pytest.mark.parametrize("estimator", ["feature-kalman", "paper-ema"])
def test_restore_into_a_smaller_table_stays_bounded(estimator):
    a = BudgetRouter(BudgetSettings(estimator=estimator))
    for i in range(100):
        d, obs = a.route_learnable(chat("hello there", f"m{i}"))
        a.observe(obs, d.prompt_tokens + 1)
    b = BudgetRouter(BudgetSettings(estimator=estimator, estimator_settings={"max_keys": 8}))
    b.restore(json.loads(json.dumps(a.snapshot())))
    assert len(b.estimator.keys()) <= 8
    d, obs = b.route_learnable(chat("hello there", "a-new-name"))
    b.observe(obs, d.prompt_tokens + 1)
    assert len(b.estimator.keys()) <= 8


@pytest.mark.parametrize("corrupt", [
    lambda v: v.update(theta=[float("nan")] * len(v["theta"])),
    lambda v: v.update(tail=[]),
    lambda v: v.update(recent={"prose": [[0.1, 7]]}),     # a client the key does not list
    lambda v: v.update(recent={"prose": [[0.1]]}),
    lambda v: v["margins"].update(prose=float("inf")),
    lambda v: v.update(P="x"),
])
def test_corrupt_snapshots_are_refused_not_half_restored(corrupt):
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there " * 300}]})
    router = BudgetRouter()
    router.observe(router.route_learnable(body)[1], 1000)
    doc = json.loads(json.dumps(router.snapshot()))
    corrupt(doc["keys"]["m"])
    fresh = BudgetRouter()
    with pytest.raises((ValueError, TypeError, KeyError, AttributeError)):
        fresh.restore(doc)
    assert fresh.route(body).budget_tokens > 1024  # still estimating from the prior, not from NaN
