"""Router configurations through the stack: a bad estimator's misroutes are counted, spillover
under in-flight limits, shadow mode."""

from __future__ import annotations

import threading
import time

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


# -- spillover ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["ext_authz", "ext_proc"])
def spilling(make_stack, request):
    # ~20 ms per token unscaled: at 0.4, 200 output tokens take well over a second. In-flight
    # counts come down from the routing stream's end (ext_proc) or Envoy's access-log stream
    # (ext_authz).
    return make_stack(f"spillover-{request.param}",
                      {"service": {"routing_filter": request.param, "spillover": {"short": 1}}}, time_scale=0.4)


def test_spillover_to_long_when_short_is_at_its_limit(spilling):
    stack = spilling
    ids = [rid("spill-a"), rid("spill-b")]
    replies: dict[str, object] = {}

    def send(r: str) -> None:
        replies[r] = post(stack, chat_body("Tell me a long story about a lighthouse.", max_tokens=200), r,
                          timeout=60)

    threads = [threading.Thread(target=send, args=(r,)) for r in ids]
    t0 = time.monotonic()
    threads[0].start()
    time.sleep(0.3)  # the first is in flight on short
    threads[1].start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    assert all(replies[r].status == 200 for r in ids), {r: replies[r].status for r in replies}
    assert elapsed > 1.0  # the engine really was slow enough to overlap them
    a, b = access_line(stack, ids[0]), access_line(stack, ids[1])
    assert a.served_by == "short", a.raw
    assert b.served_by == "long", b.raw
    assert b.decision["decided_pool"] == "short" and b.decision["spilled_from"] == "short"
    assert metric(stack, "extproc_spillovers_total", from_pool="short", to_pool="long") >= 1

    # both finished: the in-flight count went back down, so short takes the next one again
    deadline = time.monotonic() + 5
    while metric(stack, "extproc_inflight_requests", pool="short") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = rid("spill-c")
    assert post(stack, chat_body("hi", max_tokens=2), r).status == 200
    assert access_line(stack, r).served_by == "short"
    assert metric(stack, "extproc_inflight_requests", pool="short") == 0


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
