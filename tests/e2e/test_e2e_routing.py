"""Routing through the real Envoy: which pool served each request (per the Envoy access log)."""

from __future__ import annotations

import json

import pytest
from e2e_helpers import MODEL, access_line, chat_body, get, metric, metrics, post, real_text, rid, router_alive


@pytest.fixture
def stack(either_stack):
    """Each test here runs through both routing filters (ext_authz and ext_proc)."""
    return either_stack


def test_short_chat_is_served_by_short(stack):
    r = rid("short")
    reply = post(stack, chat_body("What is the capital of France?", max_tokens=16), r)
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["usage"]["completion_tokens"] == 16
    line = access_line(stack, r)
    assert line.served_by == "short", line.raw
    assert line.pool == "short"
    assert line.decision["decided_pool"] == "short" and line.decision["reason"] == "fits"
    assert 0 < int(line.fields["budget"]) <= 8192


def test_long_real_text_is_served_by_long(stack):
    text = real_text(40_000)
    r = rid("long40k")
    reply = post(stack, chat_body(f"Summarise these documents:\n\n{text}", max_tokens=16), r)
    assert reply.status == 200, reply.body[:300]
    true_prompt = reply.json()["usage"]["prompt_tokens"]
    assert 30_000 < true_prompt < 65_536  # the engine's own count: really a long request
    line = access_line(stack, r)
    assert line.served_by == "long", line.raw
    assert line.decision["decided_pool"] == "long" and line.decision["reason"] == "fits"
    assert int(line.fields["budget"]) >= true_prompt  # conservative: never below the truth


def test_short_prompt_with_large_output_reserve_is_served_by_long(stack):
    r = rid("maxtok")
    reply = post(stack, chat_body("Write a very long story.", max_tokens=20_000), r)
    assert reply.status == 200, reply.body[:300]
    line = access_line(stack, r)
    assert line.served_by == "long", line.raw
    assert line.decision["budget"] - line.decision["estimate"] >= 20_000  # the output reserve
    assert int(line.fields["budget"]) > 20_000


def test_spoofed_router_headers_are_ignored(stack):
    """A client cannot pick its pool or fake provenance: the router's values win."""
    spoof = {"x-token-pool": "short", "x-token-budget": "1", "x-token-estimate": "1", "x-token-source": "spoofed",
             "x-token-reason": "fits", "x-token-read": "1", "x-token-decision": "spoofed-id",
             "x-token-exact": "spoofed"}
    r = rid("spoof")
    reply = post(stack, chat_body(real_text(12_000), max_tokens=16), r, headers=spoof)
    assert reply.status == 200, reply.body[:300]
    line = access_line(stack, r)
    assert line.served_by == "long", line.raw
    assert line.pool == "long"
    assert int(line.fields["budget"]) > 8192
    assert line.fields["source"] != "spoofed" and line.fields.get("exact") != "spoofed"

    # and the other way: a short request that claims the long pool still goes short
    r2 = rid("spoof-short")
    reply = post(stack, chat_body("hi", max_tokens=8), r2, headers={"x-token-pool": "long"})
    assert reply.status == 200
    assert access_line(stack, r2).served_by == "short"


def test_malformed_json_goes_to_long_and_router_survives(stack):
    before = metrics(stack)
    r = rid("badjson")
    reply = post(stack, b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"', r)
    assert reply.status == 400
    assert b"JSON decode error" in reply.body  # the engine's (vLLM's) answer, not Envoy's
    line = access_line(stack, r)
    assert line.served_by == "long", line.raw
    assert line.decision is not None and line.decision["reason"] == "unreadable"  # the router did decide

    assert router_alive(stack)
    after = metrics(stack)
    assert metric(after, "extproc_stream_errors_total") == metric(before, "extproc_stream_errors_total")
    r2 = rid("after-bad")
    assert post(stack, chat_body("hi", max_tokens=4), r2).status == 200
    assert access_line(stack, r2).served_by == "short"


def test_eight_mib_body_is_served_by_long(stack):
    unit = "The quick brown fox jumps over the lazy dog while the river keeps running. "
    content = (unit * ((8 << 20) // len(unit) + 1))[: 8 << 20]
    body = json.dumps(chat_body(content, max_tokens=16)).encode()
    assert len(body) > 8 << 20
    r = rid("8mib")
    reply = post(stack, body, r, timeout=120)
    assert reply.status not in (413, 503), reply.body[:300]
    # ~1.9M tokens: no pool holds it, so the long engine answers vLLM's context-length 400
    assert b"maximum context length is 65536" in reply.body, reply.body[:300]
    line = access_line(stack, r)
    assert line.served_by == "long", line.raw
    assert line.decision is not None and line.decision["reason"] == "too_large"  # decided, not failed open
    assert router_alive(stack)


def test_non_llm_paths_bypass_the_router(stack):
    before = metric(stack, "extproc_decisions_total")
    for path in ("/v1/models", "/health"):
        r = rid("get")
        reply = get(stack, path, r)
        assert reply.status == 200, (path, reply.body[:200])
        line = access_line(stack, r)
        assert line.served_by == "long", line.raw
        assert line.decision is None  # no routing metadata: the router never saw it
    models = get(stack, "/v1/models", rid("models")).json()
    assert models["data"][0]["id"] == MODEL
    assert metric(stack, "extproc_decisions_total") == before
