"""Anthropic Messages through the real stack (Envoy, the router, the simulated vLLM engines): a
``/v1/messages`` request is routed on its prompt, its usage is read and learned (JSON and stream),
a misroute is counted, and it is estimated as the chat completion with the same text would be;
``/v1/messages/count_tokens`` takes the default route (no router call, the largest pool)."""

from __future__ import annotations

import pytest
from e2e_helpers import MODEL, access_line, chat_body, metric, post, real_text, rid, wait_metric

MESSAGES = "/v1/messages"


def messages_body(text: str, max_tokens: int | None = 8, **extra) -> dict:
    body = {"model": MODEL, "system": [{"type": "text", "text": "Answer briefly."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


@pytest.fixture(scope="module")
def fresh(make_stack):
    return make_stack("messages")


@pytest.fixture(scope="module")
def underestimating(make_stack):
    """A router that under-estimates on purpose (50 bytes a token) and learns nothing: oversized
    requests go short, and two bodies with the same text get the same estimate."""
    return make_stack("messages-under", {"estimator": {"kind": "fixed-ratio", "settings": {"ratio": 50.0}}})


def test_messages_are_routed_read_and_learned_like_chat(fresh):
    stack = fresh
    assert metric(stack, "extproc_calibration_samples", model=MODEL) == 0
    short, streamed, long = rid("msg-short"), rid("msg-stream"), rid("msg-long")
    reply = post(stack, messages_body("Name three rivers of Europe."), short, path=MESSAGES)
    assert reply.status == 200 and reply.json()["type"] == "message", reply.body[:300]
    reply = post(stack, messages_body("And three of Asia?", stream=True), streamed, path=MESSAGES)
    assert reply.status == 200 and b"event: message_start" in reply.body and b"event: message_delta" in reply.body
    reply = post(stack, messages_body(real_text(12_000), max_tokens=4), long, path=MESSAGES)
    assert reply.status == 200 and reply.json()["usage"]["input_tokens"] > 8192, reply.body[:300]
    lines = {r: access_line(stack, r) for r in (short, streamed, long)}
    assert [lines[r].served_by for r in (short, streamed, long)] == ["short", "short", "long"]
    # estimated, not unreadable (the long one may be counted exactly: its estimate is near 8K)
    assert [lines[r].fields["source"] for r in (short, streamed)] == ["prior", "prior"]
    assert lines[long].fields["source"] in ("prior", "exact") and lines[long].fields["reason"] == "fits"
    # every response of a model still calibrating is read: two JSON, one stream, each learned
    assert wait_metric(stack, "extproc_calibration_samples", 3, model=MODEL) == 3
    assert metric(stack, "extproc_usage_reads_total", outcome="json") == 2
    assert metric(stack, "extproc_usage_reads_total", outcome="stream") == 1
    assert metric(stack, "extproc_misroutes_total") == 0


def test_count_tokens_takes_the_default_route_without_the_router(fresh):
    stack = fresh
    before = metric(stack, "extproc_decisions_total")
    r = rid("msg-count")
    body = messages_body("How many tokens is this?", max_tokens=None)
    reply = post(stack, body, r, path="/v1/messages/count_tokens")
    assert reply.status == 200 and reply.json()["input_tokens"] > 0, reply.body[:300]
    line = access_line(stack, r)
    assert (line.served_by, line.pool) == ("long", "-")
    assert metric(stack, "extproc_decisions_total") == before


def test_a_messages_request_over_the_short_window_is_a_counted_misroute(underestimating):
    stack = underestimating
    r = rid("msg-over")
    reply = post(stack, messages_body(real_text(12_000), max_tokens=16), r, path=MESSAGES)
    assert reply.status == 400, reply.body[:300]
    doc = reply.json()
    assert doc["type"] == "error" and "maximum context length is 8192" in doc["error"]["message"]
    assert access_line(stack, r).served_by == "short"
    assert wait_metric(stack, "extproc_misroutes_total", 1, kind="prompt_over_window") == 1
    assert metric(stack, "extproc_usage_reads_total", outcome="context_error") == 1


def test_a_messages_body_is_estimated_as_its_chat_completion(underestimating):
    stack = underestimating
    text = real_text(2_000)
    a, b = rid("msg-as-chat"), rid("chat-as-msg")
    assert post(stack, messages_body(text, max_tokens=64), a, path=MESSAGES).status == 200
    chat = chat_body(text, max_tokens=64)
    chat["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
    assert post(stack, chat, b).status == 200
    m, c = access_line(stack, a), access_line(stack, b)
    assert (m.fields["budget"], m.decision["estimate"], m.served_by) == \
        (c.fields["budget"], c.decision["estimate"], c.served_by)
    assert m.fields["source"] == c.fields["source"] == "fixed"


def test_messages_are_routed_by_either_routing_filter(either_stack):
    stack = either_stack
    short, long = rid("msg-either-short"), rid("msg-either-long")
    assert post(stack, messages_body("Say hi."), short, path=MESSAGES).status == 200
    assert post(stack, messages_body(real_text(12_000), max_tokens=4), long, path=MESSAGES).status == 200
    lines = access_line(stack, short), access_line(stack, long)
    assert [(line.pool, line.served_by) for line in lines] == [("short", "short"), ("long", "long")]
    assert all(line.fields["reason"] == "fits" for line in lines)
