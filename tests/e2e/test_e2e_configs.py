"""Router configurations through the stack: a bad estimator's misroutes are counted, shadow mode.
(Spillover, on the pools' own load with several replicas: test_e2e_spillover.py.)"""

from __future__ import annotations

import pytest
from e2e_helpers import access_line, chat_body, metric, post, real_text, rid, wait_metric


# -- misroutes ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def underestimating(make_stack):
    # 50 bytes per token: a ~10K-token prompt looks like ~1K tokens
    return make_stack("misroute", {"estimator": {"kind": "fixed-ratio", "settings": {"ratio": 50.0}}})


def test_context_length_misroute_is_counted(underestimating):
    stack = underestimating
    r = rid("misroute")
    reply = post(stack, chat_body(real_text(10_000), max_tokens=16), r)
    assert reply.status == 400
    assert b"maximum context length is 8192" in reply.body, reply.body[:300]
    line = access_line(stack, r)
    assert line.served_by == "short", line.raw
    assert line.decision["source"] == "fixed"
    assert wait_metric(stack, "extproc_misroutes_total", 1, pool="short") >= 1
    assert metric(stack, "extproc_usage_reads_total", outcome="context_error") >= 1
    assert metric(stack, "extproc_misroutes_total", pool="long") == 0


# -- shadow ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shadow(make_stack):
    return make_stack("shadow", {"service": {"shadow": True}})


def test_shadow_mode_serves_long_and_logs_the_decision(shadow):
    stack = shadow
    r = rid("shadow")
    reply = post(stack, chat_body("hi there", max_tokens=4), r)
    assert reply.status == 200
    line = access_line(stack, r)
    assert line.served_by == "long", line.raw
    assert line.pool == "long"
    assert line.decision["decided_pool"] == "short", line.raw
    assert line.decision["pool"] == "long"
    assert '"x-token-shadow":"short"' in line.raw  # what the operator reads in the access log


# -- include_usage injection ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def injecting(make_stack):
    return make_stack("inject", {"service": {"routing_filter": "ext_proc", "inject_stream_usage": True}})


def _events(raw: bytes) -> list[dict | str]:
    import json

    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def test_injected_usage_is_learned_and_kept_from_the_client(injecting):
    stack = injecting
    body = chat_body("Count to three.", max_tokens=6, stream=True)  # no stream_options: client did not ask
    before = metric(stack, "extproc_calibration_samples", model=body["model"])
    reply = post(stack, body, rid("inject"))
    assert reply.status == 200
    events = _events(reply.body)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert all("usage" not in e for e in chunks), "the client got a usage event it did not ask for"
    assert all(e["choices"] for e in chunks)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)  # the content is all there
    assert wait_metric(stack, "extproc_usage_reads_total", 1, outcome="stream") >= 1
    assert metric(stack, "extproc_calibration_samples", model=body["model"]) == before + 1


def test_client_that_asked_for_usage_still_gets_it(injecting):
    stack = injecting
    body = chat_body("Count to three.", max_tokens=6, stream=True, stream_options={"include_usage": True})
    reply = post(stack, body, rid("asked"))
    usage = [e for e in _events(reply.body) if isinstance(e, dict) and "usage" in e and not e["choices"]]
    assert len(usage) == 1 and usage[0]["usage"]["prompt_tokens"] > 0
