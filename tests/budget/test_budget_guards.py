"""What the calibration guards promise: no single response moves a scale or a margin far, an
outlier widens its own kind's margin only, content the features cannot explain is not learned as
a rate, no client makes up more than its share of a model's recent learning, genuine change is
still learned within a bounded number of samples, and the snapshot carries what the guards knew.

Truth for real texts is exact (extproc.tokens: the model's own template over its tokenizer.json);
deliberately wrong counts are a stand-in for a hostile or broken upstream, which is their point."""

from __future__ import annotations

import itertools
import json
import random
import statistics

import orjson
import pytest

from extproc.budget import BudgetRouter, BudgetSettings
from extproc.budget.guard import MAX_CLIENTS
from extproc.budget.robust import ClientWindow, balanced_weights, weighted_quantile

LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
NEAR = 6000  # tokens of a near-limit prompt (enters the margin windows: over a quarter of 8192)


def _joined(dev_texts, category: str, n: int) -> list[str]:
    """Near-limit prompts of real texts of one category (a few texts joined)."""
    rows = [r["text"] for r in dev_texts if r["category"] == category]
    rng = random.Random(5)
    out = []
    for _ in range(n):
        text, tokens = [], 0
        while tokens < NEAR:
            t = rng.choice(rows)
            text.append(t)
            tokens += len(t) // 4
        out.append("\n\n".join(text))
    return out


@pytest.fixture(scope="module")
def prose(dev_texts) -> list[str]:
    return _joined(dev_texts, "en_prose", 120)


@pytest.fixture(scope="module")
def code(dev_texts) -> list[str]:
    return _joined(dev_texts, "code", 80)


def body(text: str, model: str = LLAMA, **extra) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], **extra})


_SENT = itertools.count()


def teach(router: BudgetRouter, texts, count, clients: int = 16, model: str = LLAMA) -> None:
    """Honest samples with exact counts, from ``clients`` clients in turn."""
    for text in texts:
        _, obs = router.route_learnable(body(text, model))
        router.observe(obs, count([{"role": "user", "content": text}]), client=f"c{next(_SENT) % clients}")


def scales(router: BudgetRouter, model: str = LLAMA) -> dict[str, float]:
    return router.calibration(model)["scales"]


def margins(router: BudgetRouter, model: str = LLAMA) -> dict[str, float]:
    return router.calibration(model)["margins"]


# -- one response ----------------------------------------------------------------------------------

def test_one_outlier_widens_at_most_its_own_kind_and_moves_no_scale(prose, count):
    router = BudgetRouter()
    teach(router, prose[:60], count)
    before_s, before_m = scales(router), margins(router)
    emoji = prose[60] + "\n" + "".join(chr(0x1F300 + i % 80) for i in range(2500))
    d, obs = router.route_learnable(body(emoji))
    truth = count([{"role": "user", "content": emoji}])
    err = router.observe(obs, truth * 2, client="someone")  # ~twice what the features see
    assert err is not None and err > 0.5
    after_s, after_m = scales(router), margins(router)
    assert after_s == before_s  # unexplained: not a new rate
    moved = {k for k in after_m if abs(after_m[k] - before_m[k]) > 1e-9}
    assert moved <= {d.content_kind}, moved  # the bug: every kind's margin jumped to 0.59
    assert all(abs(after_m[k] - before_m[k]) <= router.estimator.s.margin_step + 1e-9 for k in after_m)
    assert router.calibration(LLAMA)["unexplained"] == 1


@pytest.mark.parametrize("truth", [1, 3, 10 ** 6, 2 ** 31])
def test_no_single_response_moves_a_scale_or_a_margin_far(prose, count, truth):
    router = BudgetRouter()
    teach(router, prose[:40], count)
    s0, m0 = scales(router), margins(router)
    est = router.estimator
    _, obs = router.route_learnable(body(prose[41]))
    router.observe(obs, truth, client="x")
    theta0, var0 = est._prior(router.families["llama3"])
    for i, (g, v) in enumerate(s0.items()):
        assert abs(scales(router)[g] - v) <= est.s.step_sd * var0[i] ** 0.5 + 1e-4, g
    assert all(abs(margins(router)[k] - m0[k]) <= est.s.margin_step + 1e-9 for k in m0)


def test_many_explained_samples_move_scales_only_by_the_capped_step(prose, count):
    router = BudgetRouter()
    teach(router, prose[:30], count)
    est = router.estimator
    _, var0 = est._prior(router.families["llama3"])
    step = est.s.step_sd * var0[0] ** 0.5
    for text in prose[30:60]:  # every count 20% above the truth: explained, within the robust band
        before = scales(router)["latin"]
        _, obs = router.route_learnable(body(text))
        router.observe(obs, int(count([{"role": "user", "content": text}]) * 1.2), client="c1")
        assert abs(scales(router)["latin"] - before) <= step + 1e-4


# -- content the features do not see ------------------------------------------------------------------

def cheap_runs(rng: random.Random) -> str:
    """Runs of punctuation: one token per 16-64 bytes, which the byte-class features cannot see."""
    return "".join(rng.choice("=-*_#") * 64 for _ in range(40)) + " the end"


@pytest.mark.parametrize("sender", ["one client", "no identity"])
def test_cheap_text_moves_no_scale_while_honest_traffic_says_otherwise(prose, code, count, sender):
    """Cheap punctuation next to three times as much honest code (the kind it is filed under):
    from one client it is refused past its share and unexplained within it; even with no identity
    at all it is unexplained next to what the kind's honest samples show. No scale moves far."""
    router = BudgetRouter()
    teach(router, prose[:40] + code[:40], count)
    before = scales(router)
    rng = random.Random(1)
    for i in range(120):
        text = cheap_runs(rng)
        d, obs = router.route_learnable(body(text))
        assert d.content_kind == "code"
        router.observe(obs, count([{"role": "user", "content": text}]), client="one" if sender == "one client" else None)
        teach(router, [code[(40 + i) % 80], prose[40 + i % 80], code[i % 40]], count)
    after = scales(router)
    assert all(abs(after[g] - before[g]) < 0.05 for g in ("latin", "punct", "space")), (before, after)
    assert router.calibration(LLAMA)["unexplained"] >= 20


def test_a_lone_client_cannot_take_a_fresh_model_far_from_its_priors(prose, count):
    """With no one else to outvote it, a single client's samples move the scales within one
    prior spread at most, however many it sends and however wrong they are."""
    router = BudgetRouter(BudgetSettings(client_share=0.2, client_window=10_000))
    for i, text in enumerate(prose[:100]):
        _, obs = router.route_learnable(body(text))
        true = count([{"role": "user", "content": text}])
        # always a little below what the router now estimates: a slow drift downwards
        router.observe(obs, int(router.route(body(text)).prompt_tokens * 0.9), client="lone")
    assert scales(router)["latin"] >= 1.0 - 0.15 - 1e-6
    d = router.route(body(prose[100]))
    assert d.prompt_tokens >= 0.8 * count([{"role": "user", "content": prose[100]}])


def test_special_token_strings_cost_one_token_each_and_poison_nothing(prose, count):
    """The issue's attack: 3,000 small requests of special-token strings typed as content."""
    router = BudgetRouter()
    teach(router, prose[:60], count)
    before = scales(router)["latin"]
    specials = sorted(router.families["llama3"].specials.tokens)
    rng = random.Random(2)
    errors = []
    for i in range(300):
        content = "".join(rng.choice(specials) for _ in range(50))
        _, obs = router.route_learnable(body(content, max_tokens=1))
        errors.append(router.observe(obs, count([{"role": "user", "content": content}]), client=None))
    assert statistics.median(abs(e) for e in errors) < 0.05  # estimated right: nothing to poison
    assert abs(scales(router)["latin"] - before) < 0.02
    d = router.route(body(prose[61]))
    assert d.prompt_tokens == pytest.approx(count([{"role": "user", "content": prose[61]}]), rel=0.05)


# -- clients ------------------------------------------------------------------------------------------

def test_no_client_makes_up_more_than_its_share_of_recent_learning(prose, count):
    router = BudgetRouter(BudgetSettings(client_share=0.2, client_window=100))
    texts = prose[:100]
    for text in texts:  # one client sends everything first
        _, obs = router.route_learnable(body(text))
        router.observe(obs, count([{"role": "user", "content": text}]), client="greedy")
    learning = router.learning(LLAMA)
    assert learning["recent"] == 20 and learning["refused"] == 80
    assert learning["clients"][0] == {"client": "greedy", "recent": 20, "share": 1.0, "refused": 80, "unexplained": 0}
    teach(router, texts[:60], count, clients=10)  # others arrive: the greedy client's share shrinks
    learning = router.learning(LLAMA)
    assert learning["recent"] == 80
    assert all(c["recent"] <= 20 for c in learning["clients"])
    _, obs = router.route_learnable(body(texts[0]))
    assert router.observe(obs, 5000, client="greedy") is None  # still over its share: refused
    assert router.observe(obs, 5000, client=None) is not None  # no identity: not bounded


def test_guard_tables_stay_bounded():
    router = BudgetRouter(BudgetSettings(client_window=64))
    text = "A sentence of ordinary prose for the guard test. " * 40
    for i in range(3000):
        _, obs = router.route_learnable(body(text))
        router.observe(obs, 520 + i % 7, client=f"client-{i}")
    learning = router.learning(LLAMA)
    assert learning["recent"] == 64 and len(learning["clients"]) <= MAX_CLIENTS
    assert len(router.guard.keys[LLAMA].clients) <= MAX_CLIENTS
    assert len(router.snapshot()["guard"]["keys"][LLAMA]["clients"]) <= 64 + MAX_CLIENTS


# -- genuine change -----------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [1.3, 0.75])
def test_a_genuine_shift_is_learned_within_a_bounded_number_of_samples(prose, count, factor):
    """A new tokenizer behind the same name: every count moves by the same factor, from every
    client. At first unexplained; once most of the kind's recent samples agree, learned."""
    router = BudgetRouter()
    teach(router, prose[:40], count)
    errors = []
    for i, text in enumerate(prose[40:120]):
        d, obs = router.route_learnable(body(text))
        truth = int(count([{"role": "user", "content": text}]) * factor)
        errors.append(abs(d.prompt_tokens / truth - 1))
        router.observe(obs, truth, client=f"c{i % 16}")
    assert statistics.fmean(errors[:5]) > 0.15
    assert statistics.fmean(errors[-20:]) < 0.03, [round(e, 3) for e in errors[::5]]
    learned_by = next(i for i in range(len(errors)) if statistics.fmean(errors[i:i + 10]) < 0.03)
    assert learned_by <= 60


# -- state ----------------------------------------------------------------------------------------------

def test_the_snapshot_carries_what_the_guards_knew(prose, count):
    router = BudgetRouter(BudgetSettings(client_window=50))
    teach(router, prose[:30], count, clients=3)
    for text in prose[30:50]:
        _, obs = router.route_learnable(body(text))
        router.observe(obs, 3, client="c0")  # refused (over its share) or unexplained
    doc = json.loads(json.dumps(router.snapshot()))
    restored = BudgetRouter(BudgetSettings(client_window=50))
    restored.restore(doc)
    assert restored.learning(LLAMA) == router.learning(LLAMA)
    assert restored.calibration(LLAMA) == router.calibration(LLAMA)
    assert restored.snapshot() == doc
    _, obs = restored.route_learnable(body(prose[0]))
    assert restored.observe(obs, 5000, client="c0") is None  # it still knows c0 is over its share


def test_a_snapshot_of_the_previous_version_is_upgraded(prose, count):
    router = BudgetRouter()
    teach(router, prose[:20], count)
    doc = json.loads(json.dumps(router.snapshot()))
    old = {"version": 1, "estimator": "feature-kalman", "features": doc["features"],
           "groups": [g for g in doc["groups"] if g != "special"], "keys": {}}
    at = doc["groups"].index("special")
    for key, v in doc["keys"].items():
        old["keys"][key] = {"theta": v["theta"][:at] + v["theta"][at + 1:],
                            "P": [row[:at] + row[at + 1:] for i, row in enumerate(v["P"]) if i != at],
                            "n": v["n"], "margins": v["margins"], "margin_n": v["margin_n"],
                            "errors": {b: [e for e, _, _ in w] for b, w in
                                       ((b, [(e, c, ok) for e, c, ok in w]) for b, w in v["tail"].items())}}
    upgraded = BudgetRouter()
    upgraded.restore(old)
    assert upgraded.calibration(LLAMA)["scales"] == router.calibration(LLAMA)["scales"]
    assert upgraded.route(body(prose[30])).budget_tokens == router.route(body(prose[30])).budget_tokens


@pytest.mark.parametrize("corrupt", [
    lambda g: g.update(keys=[]),
    lambda g: next(iter(g["keys"].values())).update(ring=[99]),
    lambda g: next(iter(g["keys"].values())).update(clients=[1, 2]),
    lambda g: next(iter(g["keys"].values())).update(counts={"0": [1]}),
])
def test_a_corrupt_guard_section_refuses_the_whole_snapshot(prose, count, corrupt):
    router = BudgetRouter()
    teach(router, prose[:10], count, clients=2)
    doc = json.loads(json.dumps(router.snapshot()))
    corrupt(doc["guard"])
    fresh = BudgetRouter()
    with pytest.raises(ValueError):
        fresh.restore(doc)
    assert fresh.snapshot()["keys"] == {} and fresh.learning(LLAMA) is None


def test_reset_forgets_one_model_and_keeps_the_others(prose, count):
    router, prior = BudgetRouter(), BudgetRouter()
    teach(router, prose[:25], count)
    teach(router, prose[:25], count, model="Qwen/Qwen3-8B")
    other = router.calibration("Qwen/Qwen3-8B")
    assert router.reset(LLAMA) is True
    assert router.calibration(LLAMA) is None and router.learning(LLAMA) is None
    assert router.route(body(prose[30])) == prior.route(body(prose[30]))
    assert router.calibration("Qwen/Qwen3-8B") == other
    assert router.reset(LLAMA) is False


# -- the statistics ----------------------------------------------------------------------------------

def test_balanced_weights_cap_every_client_when_there_are_enough_clients():
    rng = random.Random(3)
    for _ in range(200):
        clients = [rng.choice("abcdefghij"[: rng.randint(1, 10)]) for _ in range(rng.randint(1, 300))]
        clients += [None] * rng.randint(0, 5)
        share = rng.choice([0.1, 0.2, 0.34, 0.5])
        w = balanced_weights(clients, share)
        total = sum(w)
        held = {c: sum(x for x, k in zip(w, clients) if k == c) for c in set(clients) if c is not None}
        distinct = len(held) + clients.count(None)
        if distinct * share >= 1:
            assert max(held.values()) <= share * total + 1e-6, (held, share)
        else:
            assert w == [1.0] * len(clients)  # too few clients to balance: nobody is favoured
        assert all(0 < x <= 1 for x in w)


def test_one_sample_never_sets_a_high_quantile():
    assert weighted_quantile([0.0] * 19 + [0.8], [1.0] * 20, 0.96) == 0.0
    assert weighted_quantile([0.0] * 18 + [0.8, 0.7], [1.0] * 20, 0.96) == 0.7
    assert weighted_quantile([0.0] * 200 + [0.8] * 20, [1.0] * 220, 0.96) == 0.8


def test_a_client_window_keeps_others_samples_through_a_burst():
    w = ClientWindow(48, 0.2)
    for i in range(48):
        w.append((0.0, f"h{i % 16}"))
    for _ in range(500):
        w.append((-0.9, "attacker"))
    assert len(w) == 48 and sum(1 for e, c in w if c == "attacker") == w.cap == 9
    lone = ClientWindow(48, 0.2)
    for i in range(100):
        lone.append((float(i), "only"))
    assert [e for e, _ in lone] == [float(i) for i in range(52, 100)]  # alone, it is a plain window
