"""BudgetRouter.explain: the decision route() makes with the numbers behind it (margin, kind of
content, family, calibration key, the request path's size bound), and nothing learned by asking;
restore_json: the one validation of snapshots, at start-up and from the operator API."""

from __future__ import annotations

import json
import math

import pytest

from extproc.budget import BudgetRouter, BudgetSettings
from extproc.budget.calibrate import OVERFLOW_KEY, paper_category

PROSE = "The river runs past the old mill and under the stone bridge before it reaches the sea. " * 20


def chat(text: str, model: str = "meta-llama/Meta-Llama-3-8B-Instruct", **extra) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 100,
                       **extra}).encode()


def _teach(router: BudgetRouter, model: str, n: int) -> None:
    for i in range(n):
        d, obs = router.route_learnable(chat(PROSE + f" {i}", model))
        router.observe(obs, int(d.prompt_tokens * 1.1))


def test_explain_is_route_plus_why_and_changes_nothing():
    router = BudgetRouter()
    _teach(router, "m1", 25)
    before = json.dumps(router.snapshot())
    for body in (chat(PROSE, "m1"), chat(PROSE * 40, "m1"), chat("hi", "fresh-model"), b"{bad"):
        ex = router.explain(body)
        d = router.route(body)
        assert (ex.decision.pool, ex.decision.budget_tokens, ex.decision.prompt_tokens, ex.decision.source,
                ex.decision.margin, ex.decision.content_kind) == \
            (d.pool, d.budget_tokens, d.prompt_tokens, d.source, d.margin, d.content_kind)
    assert json.dumps(router.snapshot()) == before


def test_explain_names_the_margin_kind_family_and_key():
    router = BudgetRouter()
    fresh = router.explain(chat(PROSE, "m1"))
    d = fresh.decision
    assert (fresh.family, fresh.calibration_key, fresh.calibration_samples) == ("llama3", None, 0)
    assert d.source == "prior" and d.margin == router.families["llama3"].margin and d.content_kind == ""
    assert d.budget_tokens - d.output_tokens >= math.floor(d.prompt_tokens * (1 + d.margin)) - 1

    _teach(router, "m1", 25)
    learned = router.explain(chat(PROSE, "m1"))
    assert learned.decision.source == "calibrated" and learned.calibration_key == "m1"
    assert learned.calibration_samples == 25 and learned.decision.content_kind == "prose"
    assert learned.decision.margin == pytest.approx(max(router.estimator.s.margin_floor,
                                                        router.calibration("m1")["margins"]["prose"]), abs=1e-4)
    assert router.explain(chat(PROSE, "Qwen/Qwen3-8B")).family == "qwen3"

    unread = router.explain(b"{bad")
    assert (unread.family, unread.calibration_key, unread.size_bound_tokens) == ("", None, None)


def test_explain_gives_the_size_bound_the_request_path_decides_on():
    router = BudgetRouter()
    short = router.explain(chat("What is the capital of France?"))
    assert short.size_bound_tokens == router.route(chat("What is the capital of France?"), by_size=True).prompt_tokens
    assert short.size_bound_tokens >= short.decision.prompt_tokens
    assert router.explain(chat(PROSE * 60)).size_bound_tokens is None  # too long for the bound to prove it fits
    tools = chat("hi", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert router.explain(tools).size_bound_tokens is None  # re-rendered JSON: no cheap bound


def test_calibration_key_reads_the_overflow_state_once_the_table_is_full():
    router = BudgetRouter(BudgetSettings(estimator_settings={"max_keys": 3}))
    for model in ("a", "b", "c", "d"):
        _teach(router, model, 2)
    assert set(router.estimator.keys()) == {"a", "b", OVERFLOW_KEY}
    for model, key in (("a", "a"), ("c", OVERFLOW_KEY), ("never-seen", OVERFLOW_KEY)):
        assert router.calibration_key(model) == key
        assert router.calibration(model) == router.calibration(key)
    assert BudgetRouter().calibration_key("a") is None


def test_paper_estimator_explains_its_ratio_margin_and_category():
    router = BudgetRouter(BudgetSettings(estimator="paper-ema"))
    d = router.explain(chat(PROSE)).decision
    _, obs = router.route_learnable(chat(PROSE))
    assert d.content_kind == "prose"
    s = router.estimator.s
    c = 4.48
    assert d.margin == pytest.approx(c / (c - s.gamma * c * s.prior_sigma) - 1)
    assert paper_category(obs.prompts[0]) == d.content_kind


@pytest.mark.parametrize("text, why", [
    (b"{", "not JSON"), (b"[]", "not a calibration snapshot"), (b'"x"', "not a calibration snapshot"),
    (b"[" * 100_000, "not JSON"),
])
def test_restore_json_refuses_with_a_reason_and_keeps_the_state(text, why):
    router = BudgetRouter()
    _teach(router, "m1", 3)
    before = json.dumps(router.snapshot())
    with pytest.raises(ValueError, match=why):
        router.restore_json(text)
    assert json.dumps(router.snapshot()) == before


def test_restore_json_of_a_malformed_key_keeps_the_state():
    router = BudgetRouter()
    _teach(router, "m1", 3)
    doc = router.snapshot()
    before = json.dumps(doc)
    broken = json.loads(before)
    del broken["keys"]["m1"]["theta"]
    broken["keys"] = {"z": broken["keys"]["m1"], **router.snapshot()["keys"]}
    with pytest.raises(ValueError, match="malformed"):
        router.restore_json(json.dumps(broken))
    assert json.dumps(router.snapshot()) == before
    other = BudgetRouter()
    other.restore_json(before)
    assert json.dumps(other.snapshot()) == before
