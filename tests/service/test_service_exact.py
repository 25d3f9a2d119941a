"""Exact counts in the routing door: a close decision is counted and decided on the count (source
``exact``), learned at once, not at risk; a failed count leaves the estimate's decision, saying
so; far decisions are never counted; the headers, access-log fields, metrics and explain say
which source was asked and why. The pool source runs against a real simulated engine."""

from __future__ import annotations

import asyncio
import inspect

import orjson
from service_harness import long_text

from extproc.budget import BudgetRouter
from extproc.config import parse_config
from extproc.engine import EngineConfig, OutputPolicy, start_engine
from extproc.engine.versions import VllmVersion
from extproc.exact import ExactCounts
from extproc.fleet.instance import profile_named
from extproc.service.metrics import Metrics
from extproc.service.router import Router, Routed
from extproc.tokens import counter_for

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
# a fresh router has learned nothing: its estimates are the priors', which the guards distrust
WHY = "distrusted estimate near short (8192)"


def make_router(exact: dict | None, **service) -> Router:
    cfg = parse_config({"service": {"calibration_samples": 0, "usage_sample_rate": 0.0, **service},
                        **({"exact": exact} if exact is not None else {})})
    ex = ExactCounts(cfg.exact) if exact is not None else None
    if ex is not None and ex.rule_for(MODEL) is not None and ex.rule_for(MODEL).source == "local":
        ex.warm(MODEL)
    return Router(BudgetRouter(cfg.budget), cfg.service, Metrics(), ex)


def body_with_prompt(tokens: int, max_tokens: int) -> tuple[bytes, int]:
    """A chat body whose true prompt is ``tokens`` (± a few), and its true count."""
    c = counter_for("llama3")
    text = long_text(tokens)
    messages = [{"role": "user", "content": text}]
    n = c.count_chat(messages)
    while n > tokens:
        text = text[: int(len(text) * tokens / n) - 1]
        messages = [{"role": "user", "content": text}]
        n = c.count_chat(messages)
    return orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens}), n


async def route(r: Router, body: bytes) -> Routed:
    out = r.route(body, "/v1/chat/completions", ended_by_log=True, client="c1")
    return await out if inspect.isawaitable(out) else out


def metric(r: Router, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(s.value for m in r.metrics.registry.collect() for s in m.samples
               if s.name == name and want <= set(s.labels.items()))


def test_a_close_request_is_decided_on_its_exact_count_and_learned():
    r = make_router({"models": [{"model": "*llama-3*", "source": "local", "family": "llama3"}]})
    body, n = body_with_prompt(7000, 8192 - 7000)  # fits short exactly: prompt + max_tokens <= 8192
    assert r.budget.close(r.budget.route_learnable(body)[0], None) is not None
    before = r.budget.estimator.samples(MODEL)
    routed = asyncio.run(route(r, body))
    d = routed.decision
    assert (d.source, d.pool, d.prompt_tokens, d.budget_tokens) == ("exact", "short", n, n + 8192 - 7000)
    assert r.budget.estimator.samples(MODEL) == before + 1     # learned at once, no response needed
    assert not r.at_risk(d, routed.pool) and not routed.read and routed.observation is None
    headers = dict(r.decision_headers(routed))
    assert headers["x-token-source"] == "exact"
    assert headers["x-token-exact"] == f"local counted; {WHY}"
    assert r.decision_fields(routed)["exact"] == headers["x-token-exact"]
    assert f"exact: local, {WHY}" in d.detail
    # prompt + reserve is the window to the token: one exact count decides it (no margin, no second pass)
    assert metric(r, "extproc_exact_counts_total", source="local", outcome="counted") == 1
    assert metric(r, "extproc_exact_count_seconds_count", source="local") == 1


def test_without_exact_counts_the_same_request_is_estimated_and_read():
    r = make_router(None)
    body, _ = body_with_prompt(7000, 8192 - 7000)
    routed = asyncio.run(route(r, body))
    assert routed.decision.source != "exact" and isinstance(r.route(body, "/v1/chat/completions"), Routed)
    assert routed.read == r.at_risk(routed.decision, routed.pool)
    assert "x-token-exact" not in dict(r.decision_headers(routed))


def test_far_requests_are_never_counted_and_stay_synchronous():
    r = make_router({"models": [{"model": "*", "source": "local", "family": "llama3"}]})
    small, _ = body_with_prompt(200, 64)
    huge, _ = body_with_prompt(30_000, 64)
    for body in (small, huge):
        out = r.route(body, "/v1/chat/completions")
        assert isinstance(out, Routed) and out.exact is None
    assert metric(r, "extproc_exact_counts_total") == 0


def test_models_without_a_rule_keep_the_estimate():
    r = make_router({"models": [{"model": "qwen*", "source": "local"}]})
    body, _ = body_with_prompt(7000, 8192 - 7000)
    out = r.route(body, "/v1/chat/completions")
    assert isinstance(out, Routed) and out.decision.source != "exact"


def test_a_failed_pool_count_leaves_the_estimate_and_says_why():
    # nothing listens on port 9: refused at once (or a timeout): either way the estimate decides
    r = make_router({"models": [{"model": "*", "source": "pool", "pool_url": "http://127.0.0.1:9"}],
                     "pool": {"timeout_s": 0.5}})
    body, _ = body_with_prompt(7000, 8192 - 7000)
    routed = asyncio.run(route(r, body))
    d = routed.decision
    assert d.source != "exact" and routed.read == r.at_risk(d, routed.pool)
    outcome = "error" if metric(r, "extproc_exact_counts_total", source="pool", outcome="error") else "timeout"
    assert metric(r, "extproc_exact_counts_total", source="pool", outcome=outcome) == 1
    assert dict(r.decision_headers(routed))["x-token-exact"] == f"pool {outcome}; {WHY}"
    assert f"exact: pool {outcome}, {WHY}" in d.detail


def test_the_pool_source_in_the_door_and_in_explain():
    async def run():
        engine = await start_engine(EngineConfig(
            profile=profile_named("short"), model=None, time_scale=0.0, output_policy=OutputPolicy(16),
            served_names=(MODEL,), vllm_version=VllmVersion.parse("0.32"), tokenizer="llama3"))
        r = make_router({"models": [{"model": "*", "source": "pool", "pool_url": engine.url}],
                         "pool": {"timeout_s": 5.0}})
        try:
            over, n_over = body_with_prompt(7200, 8192 - 7200 + 30)   # 30 tokens too many for short
            routed = await route(r, over)
            placed = await r.explain(over, "/v1/chat/completions")
            return routed, n_over, placed, metric(r, "extproc_exact_counts_total", source="pool", outcome="counted")
        finally:
            await r.exact.close()
            await engine.close()

    routed, n, placed, counted = asyncio.run(run())
    assert (routed.decision.source, routed.decision.pool, routed.decision.prompt_tokens) == ("exact", "long", n)
    assert routed.exact == f"pool counted; {WHY}"
    assert placed.explanation.decision.source == "exact" and placed.pool == "long"
    assert f"exact: pool, {WHY}" in placed.explanation.decision.detail
    assert counted == 1  # explain counts too but records nothing


def test_the_client_guards_bound_what_exact_counts_teach():
    r = make_router({"models": [{"model": "*", "source": "local", "family": "llama3"}]})
    r.budget.guard.cap = 1  # one sample per client in the window
    body, _ = body_with_prompt(7000, 8192 - 7000)

    async def twice():
        return [await route(r, body) for _ in range(2)]

    before = r.budget.estimator.samples(MODEL)
    first, second = asyncio.run(twice())
    assert first.decision.source == second.decision.source == "exact"
    assert r.budget.estimator.samples(MODEL) == before + 1   # the second sample of client c1 is refused


def test_once_calibrated_the_reason_is_closeness_alone():
    r = make_router({"models": [{"model": "*", "source": "local", "family": "llama3"}]})
    for tokens in range(2000, 2000 + 25 * 150, 150):  # calibrated after 20 samples
        body, n = body_with_prompt(tokens, 64)
        r.budget.observe(r.budget.route_learnable(body)[1], n)
    body, _ = body_with_prompt(7100, 8192 - 7100)
    routed = asyncio.run(route(r, body))
    assert routed.exact == "local counted; close to short (8192)"
    assert routed.decision.source == "exact" and routed.decision.pool == "short"


def test_a_reloaded_config_brings_new_rules_and_keeps_the_loaded_tokenizers():
    from extproc.service.app import Service

    async def run():
        service = Service(parse_config({"exact": {"models": [{"model": "*", "source": "local", "family": "llama3"}]}}))
        before = service.router.exact
        before.warm(MODEL)
        service.apply_config(parse_config({"exact": {"models": [{"model": "*", "source": "off"}]}}))
        after = service.router.exact
        await asyncio.gather(*service._retired)
        return before, after

    before, after = asyncio.run(run())
    assert after is not before and after.local is before.local and after.rule_for(MODEL) is None


def test_offline_explain_counts_as_the_service_does():
    from extproc.explain import LocalExplainer
    from extproc.operator.v1 import operator_pb2 as pb

    explainer = LocalExplainer(parse_config({"exact": {"models": [{"model": "*", "source": "local",
                                                                   "family": "llama3"}]}}), learn=False)
    try:
        body, n = body_with_prompt(7000, 8192 - 7000)
        resp = explainer.explain(body, "/v1/chat/completions")
        far = explainer.explain(body_with_prompt(200, 64)[0], "/v1/chat/completions")
    finally:
        explainer.close()
    assert resp.source == pb.SOURCE_EXACT and resp.prompt_tokens == n and f"exact: local, {WHY}" in resp.detail
    assert far.source != pb.SOURCE_EXACT
