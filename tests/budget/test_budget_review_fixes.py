"""Regressions for defects found in review: each of these once raised, misrouted or lost state."""

import json

import orjson
import pytest

from extproc.budget import BudgetRouter
from extproc.budget.usage import UsageEventStripper, parse_context_error, with_stream_usage


@pytest.fixture
def router():
    return BudgetRouter()


@pytest.mark.parametrize("part_type", [["text"], {"a": 1}, 3, None])
def test_content_part_type_of_any_json_type_routes(router, part_type):
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": part_type, "text": "hi"}]}]})
    d = router.route(body)
    assert (d.reason, d.pool) == ("fits", "short")
    d = router.route(orjson.dumps({"model": "m", "input": [{"content": [{"type": part_type}]}]}), "/v1/responses")
    assert d.reason in ("fits", "unreadable")


@pytest.mark.parametrize("field", ["previous_response_id", "conversation"])
def test_responses_continuing_stored_state_go_to_the_largest_pool(router, field):
    d = router.route(orjson.dumps({"model": "m", "input": "and then?", field: "resp_123"}), "/v1/responses")
    assert (d.pool, d.reason) == ("long", "unreadable")
    assert "stored state" in d.detail


@pytest.mark.parametrize("message, expected", [
    ("This model's maximum context length is 8192 tokens. However, your request has 9000 input tokens. "
     "Please reduce the length of the input messages.", (8192, 9000, 0, True)),
    ("'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum context length is 8192 "
     "tokens and your request has 300 input tokens (8000 > 8192 - 300).", (8192, 300, 8000, True)),
    ("This model's maximum context length is 8192 tokens. However, you requested 64 output tokens and your prompt "
     "contains at least 10000 input tokens, for a total of at least 10064 tokens.", (8192, 10000, 64, False)),
    ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the "
     "messages, 1000 in the completion). Please reduce the length of the messages or completion.",
     (4096, 4000, 1000, True)),
    ("Bad request: temperature must be non-negative", None),
])
def test_every_vllm_context_length_shape(message, expected):
    body = json.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400}).encode()
    got = parse_context_error(body)
    assert (None if got is None else (got.max_context, got.prompt_tokens, got.output_tokens, got.exact)) == expected


def test_no_injection_when_usage_would_ride_on_every_chunk():
    assert with_stream_usage(b'{"stream":true,"stream_options":{"continuous_usage_stats":true}}') is None
    assert with_stream_usage(b'{"stream":false}') is None
    assert json.loads(with_stream_usage(b'{"stream":true}'))["stream_options"] == {"include_usage": True}


def test_stripper_exact_over_every_split_and_both_line_endings():
    for sep in (b"\n\n", b"\r\n\r\n"):
        kept = b'data: {"choices":[{"delta":{"content":"a"}}]}' + sep
        usage = b'data: {"choices":[],"usage":{"prompt_tokens":42,"completion_tokens":1}}' + sep
        done = b"data: [DONE]" + sep
        stream = kept + usage + done
        for cut in range(1, len(stream)):
            st = UsageEventStripper()
            out = st.feed(stream[:cut]) + st.feed(stream[cut:]) + st.finish()
            assert out == kept + done and st.prompt_tokens == 42


@pytest.mark.parametrize("corrupt", [
    lambda v: v.update(theta=[float("nan")] * len(v["theta"])),
    lambda v: v.update(errors=[]),
    lambda v: v["margins"].update(prose=float("inf")),
    lambda v: v.update(P="x"),
])
def test_corrupt_snapshots_are_refused_not_half_restored(router, corrupt):
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there " * 300}]})
    router.observe(router.route(body), 1000)
    doc = json.loads(json.dumps(router.snapshot()))
    corrupt(doc["keys"]["m"])
    fresh = BudgetRouter()
    with pytest.raises((ValueError, TypeError, KeyError, AttributeError)):
        fresh.restore(doc)
    assert fresh.route(body).budget_tokens > 1024  # still estimating from the prior, not from NaN


def test_stripper_passes_content_before_its_event_completes():
    st = UsageEventStripper()
    head = b'data: {"id":"c1","choices":[{"delta":{"content":"hel'
    assert st.feed(head) == head  # a content event: nothing held back, even half of it
    assert st.feed(b'lo"}}]}\n') == b'lo"}}]}\n'
    assert st.feed(b'\ndata: {"id":"c1","choices":[],"usage":{"prompt_tokens":7}}') == b"\n"
    assert st.feed(b"\n\ndata: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert st.finish() == b"" and st.prompt_tokens == 7


def test_stripper_keeps_comments_and_unknown_events():
    st = UsageEventStripper()
    stream = b": keep-alive\n\nevent: ping\ndata: {}\n\ndata: {\"choices\":[],\"usage\":\"not an object\"}\n\n"
    out = b"".join(st.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + st.finish()
    assert out == stream and st.prompt_tokens is None
