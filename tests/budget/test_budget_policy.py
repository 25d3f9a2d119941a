"""Pool choice: smallest pool that holds the budget; too large → largest; pool validation."""

from __future__ import annotations

import json

import orjson
import pytest

from extproc.budget import DEFAULT_POOLS, BudgetRouter, BudgetSettings, Pool, choose_pool
from extproc.budget.policy import order_pools, pools_that_fit
from extproc.budget.request import read_request

UNSORTED = (Pool("xl", 131072), Pool("s", 4096), Pool("m", 16384), Pool("l", 65536))


@pytest.fixture(scope="module")
def router() -> BudgetRouter:
    return BudgetRouter(BudgetSettings(pools=UNSORTED))


def exact(router: BudgetRouter, prompt_tokens: int, output_tokens: int):
    """Route a token-id prompt: its budget is exactly prompt_tokens + output_tokens."""
    body = orjson.dumps({"prompt": [1] * prompt_tokens, "max_tokens": output_tokens})
    d = router.route(body, "/v1/completions")
    assert (d.source, d.budget_tokens) == ("exact", prompt_tokens + output_tokens)
    return d


def test_pools_are_ordered_by_capacity(router):
    assert [p.name for p in router.pools] == ["s", "m", "l", "xl"]
    assert [p.max_context for p in router.pools] == [4096, 16384, 65536, 131072]
    assert order_pools(list(reversed(DEFAULT_POOLS))) == DEFAULT_POOLS


@pytest.mark.parametrize("budget,pool,fits", [
    (2, "s", ("s", "m", "l", "xl")),
    (4095, "s", ("s", "m", "l", "xl")),
    (4096, "s", ("s", "m", "l", "xl")),          # exactly the capacity fits
    (4097, "m", ("m", "l", "xl")),
    (16384, "m", ("m", "l", "xl")),
    (16385, "l", ("l", "xl")),
    (65536, "l", ("l", "xl")),
    (65537, "xl", ("xl",)),
    (131072, "xl", ("xl",)),
])
def test_smallest_pool_that_holds_the_budget(router, budget, pool, fits):
    d = exact(router, budget - 1, 1)
    assert (d.pool, d.reason, d.fits) == (pool, "fits", fits)


@pytest.mark.parametrize("prompt,out", [(131072, 1), (1, 131072), (200_000, 0)])
def test_too_large_goes_to_the_largest(router, prompt, out):
    d = exact(router, prompt, out)
    assert (d.pool, d.reason, d.fits) == ("xl", "too_large", ())


def test_zero_output_reserve_is_respected(router):
    d = exact(router, 4096, 0)
    assert (d.pool, d.output_tokens, d.detail) == ("s", 0, "max_tokens")


def test_max_tokens_alone_pushes_a_short_prompt_to_long():
    r = BudgetRouter()
    body = {"model": "m", "messages": [{"role": "user", "content": "Write a long story."}]}
    small = r.route(orjson.dumps(body))
    assert (small.pool, small.fits) == ("short", ("short", "long"))
    headroom = 8192 - (small.budget_tokens - small.output_tokens)
    at_edge = r.route(orjson.dumps({**body, "max_tokens": headroom}))
    assert (at_edge.pool, at_edge.budget_tokens, at_edge.reason) == ("short", 8192, "fits")
    over = r.route(orjson.dumps({**body, "max_tokens": headroom + 1}))
    assert (over.pool, over.budget_tokens, over.fits, over.reason) == ("long", 8193, ("long",), "fits")
    assert over.prompt_tokens == small.prompt_tokens < 30
    huge = r.route(orjson.dumps({**body, "max_completion_tokens": 65536}))
    assert (huge.pool, huge.reason) == ("long", "too_large")


def test_default_output_reserve_counts(router):
    body = orjson.dumps({"prompt": [1] * 3072})
    d = router.route(body, "/v1/completions")
    assert (d.budget_tokens, d.output_tokens, d.pool) == (4096, 1024, "s")
    r = BudgetRouter(BudgetSettings(pools=UNSORTED, default_output_tokens=1025))
    assert r.route(body, "/v1/completions").pool == "m"


def test_estimated_prompt_budget_includes_the_margin():
    r = BudgetRouter()
    d = r.route(orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 3000}],
                              "max_tokens": 0}))
    assert d.source == "prior"
    assert d.budget_tokens > d.prompt_tokens  # conservative: point estimate plus the safety margin
    assert d.budget_tokens < d.prompt_tokens * 1.5


def test_single_pool():
    r = BudgetRouter(BudgetSettings(pools=(Pool("only", 1000),)))
    assert exact(r, 500, 500).pool == "only"
    d = exact(r, 500, 501)
    assert (d.pool, d.reason, d.fits) == ("only", "too_large", ())
    assert r.route(b"garbage").pool == "only"


@pytest.mark.parametrize("pools,match", [
    ((Pool("a", 100), Pool("a", 200)), "names"),
    ((Pool("a", 100), Pool("b", 100)), "capacities"),
    ((Pool("a", 0), Pool("b", 100)), "positive"),
    ((Pool("a", -5),), "positive"),
    ((), "at least one"),
])
def test_invalid_pools_raise_at_construction(pools, match):
    with pytest.raises(ValueError, match=match):
        BudgetRouter(BudgetSettings(pools=pools))
    if pools:
        with pytest.raises(ValueError, match=match):
            order_pools(pools)


def test_choose_pool_and_pools_that_fit_units():
    pools = order_pools(UNSORTED)
    assert choose_pool(pools, 0) == (pools[0], True)
    assert choose_pool(pools, 16384) == (pools[1], True)
    assert choose_pool(pools, 10 ** 9) == (pools[-1], False)
    assert [p.name for p in pools_that_fit(pools, 20000)] == ["l", "xl"]
    assert pools_that_fit(pools, 10 ** 9) == ()


def test_unreadable_goes_to_the_largest_of_unsorted_pools(router):
    d = router.route(b"{not json")
    assert (d.pool, d.reason) == ("xl", "unreadable")


# -- deciding by size alone (route(by_size=True)) ---------------------------------------------------

def _chat(content: str, max_tokens: int | None = 64, **extra) -> bytes:
    doc = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": content}], **extra}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    return json.dumps(doc).encode()


def test_a_short_plain_chat_is_decided_by_its_size_and_the_bound_holds_the_real_count():
    from extproc.tokens import counter_for

    router = BudgetRouter()
    text = "What is the capital of France? " * 20
    d, obs = router.decide(router.read(_chat(text)), by_size=True)
    assert d.source == "bound" and d.pool == "short" and d.reason == "fits"
    for family in ("llama3", "qwen3"):
        assert d.prompt_tokens >= counter_for(family).count_chat([{"role": "user", "content": text}])
    assert d.budget_tokens == d.prompt_tokens + 64
    assert obs is None and router.observe(obs, 200) is None  # nothing measured: nothing to learn
    full = router.route(_chat(text))
    assert full.source == "prior" and full.prompt_tokens < d.prompt_tokens


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}},
])
def test_json_the_template_renders_is_never_bounded_by_size(extra):
    assert BudgetRouter().route(_chat("hi", **extra), by_size=True).source != "bound"


def test_media_and_long_prompts_get_the_estimate():
    router = BudgetRouter()
    image = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:,x"}}]
    assert router.route(_chat(image), by_size=True).source != "bound"
    long = router.route(_chat("word " * 5000), by_size=True)  # 25 KB: the bound cannot prove it fits 8K
    assert long.source == "prior" and long.pool == "short"
    assert router.route(_chat("hi", max_tokens=8000), by_size=True).source == "prior"  # the reserve too


def test_the_size_bound_holds_every_real_request(dev_requests):
    """On real request bodies, the bound is never below what vLLM counted, for either family."""
    router = BudgetRouter()
    for row in dev_requests:
        d = router.route(json.dumps(row["body"]).encode(), by_size=True)
        bound = router._size_bound(read_request(json.dumps(row["body"]).encode(), measured=False).prompts)
        assert bound is not None
        assert bound >= max(row["prompt_tokens"].values()), row["prompt_tokens"]
        if d.source == "bound":
            assert d.prompt_tokens == bound


@pytest.mark.parametrize("messages,extra", [
    ([{"role": "1" * 40000, "content": "hi"}], {}),                              # a role the template prints
    ([{"role": "tool", "tool_call_id": "x", "content": "<" * 6000}], {}),        # tool content: tojson-escaped
    ([{"role": "user", "name": "n" * 30000, "content": "hi"}], {}),               # fields beyond role/content
    ([{"role": "user", "content": "hi"}], {"chat_template_kwargs": {"date_string": "1" * 40000}}),
    ([{"role": "user", "content": "hi"}], {"documents": [{"text": "x" * 40000}]}),
    ([{"role": "user", "content": "hi"}], {"chat_template": "{{ messages }}"}),
])
def test_what_a_template_may_render_beyond_the_text_is_never_bounded_by_size(messages, extra):
    body = json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": messages, "max_tokens": 8,
                       **extra}).encode()
    assert BudgetRouter().route(body, by_size=True).source != "bound"


def test_responses_api_bodies_are_never_bounded_by_size():
    body = json.dumps({"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 8}).encode()
    assert BudgetRouter().route(body, path="/v1/responses", by_size=True).source != "bound"
