"""Against real vLLM 0.32: Anthropic Messages (``/v1/messages``) is counted, read, routed, judged
and learned from like a chat completion.

* our exact counter's count of a Messages body is vLLM's: its ``usage.input_tokens`` (JSON and the
  stream's ``message_start``) and its ``/v1/messages/count_tokens``; the response reader reads
  those counts and the stream's ``stop_reason`` from vLLM's own bytes, split anywhere;
* behind real Envoy and the router (two real pools, 8K and 64K), a Messages request over the short
  pool's window, one vLLM clamps, and one filling the window are each counted as a misroute of
  their kind, and one that fits is not; with the default router a Messages request is read and
  learned from.

The truth comes from the real server (its usage and count_tokens), never from our own code.
``RECORD_VLLM_MESSAGES=1`` also writes the exchanges the response tables read
(tests/budget/vllm_messages/).
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import time
import uuid

import pytest
from test_probe_misroutes import _metrics, _misroute_lines, _served_pool, _settled, _sum, _words
# the probes' fixtures (module-scoped: this module gets its own stacks): the two real pools, a
# router that under-estimates on purpose (a fixed 50 bytes a token), and the default router
from test_probe_misroutes import default_router, pools, underestimating  # noqa: F401

from extproc.budget.response import ResponseReader, read_response
from extproc.tokens import counter_for

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SHORT, LONG = 8192, 65536
TIER_SPECS = [("llama3_1", SHORT), ("llama3_1", LONG)]  # the servers it uses (conftest starts them together)
# (not EXTPROC_-prefixed: the router's config takes those as settings)
RECORD = os.environ.get("RECORD_VLLM_MESSAGES") == "1"
CAPTURES = pathlib.Path(__file__).resolve().parents[1] / "budget" / "vllm_messages"


def _exchange(port: int, path: str, body: dict, rid: str = "", timeout: float = 300.0):
    """(status, content type, raw head, raw body) of one POST, the bytes as they came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"content-type": "application/json", "x-request-id": rid or uuid.uuid4().hex})
        resp = conn.getresponse()
        raw = resp.read()
        head = f"HTTP/1.1 {resp.status} {resp.reason}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in resp.getheaders() if k.lower() not in ("date", "transfer-encoding"))
        return resp.status, resp.getheader("content-type", ""), head, raw
    finally:
        conn.close()


def _record(name: str, head: str, raw: bytes) -> None:
    if RECORD:
        CAPTURES.mkdir(exist_ok=True)
        (CAPTURES / f"{name}.txt").write_bytes(head.encode() + b"\r\n" + raw)


def _count_tokens(server, body: dict) -> int:
    """The real server's /v1/messages/count_tokens: the truth these tests build prompts with."""
    status, _, _, raw = _exchange(server.port, "/v1/messages/count_tokens",
                                  {k: v for k, v in body.items() if k not in ("max_tokens", "stream")})
    assert status == 200, raw[:300]
    return json.loads(raw)["input_tokens"]


def _events(raw: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in raw.split(b"\n") if line.startswith(b"data:")]


def _text_of(server, tokens: int) -> list[dict]:
    """Messages whose prompt is exactly ``tokens`` tokens on the real server (count_tokens; the
    64K one, whose window holds them all: both serve the same model)."""
    one = [{"role": "user", "content": "hello"}]
    base = _count_tokens(server, {"model": MODEL, "messages": one})
    messages = [{"role": "user", "content": _words(1 + tokens - base)}]
    assert _count_tokens(server, {"model": MODEL, "messages": messages}) == tokens
    return messages


BODIES = {
    "plain": {"messages": [{"role": "user", "content": "Hello, Claude"}]},
    "system_blocks": {"system": [{"type": "text", "text": "You are terse. "},
                                 {"type": "text", "text": "Answer in French."}],
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "Name a river."}]}]},
    "conversation": {"system": "Be brief.", "messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Easy.", "signature": "s"},
                                          {"type": "text", "text": "4"}]},
        {"role": "user", "content": "And 3+3?"}]},
    "tool_round_trip": {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather",
                                           "input": {"city": "Oslo", "unit": "°C"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "12 and rain"}]}]}]},
}


@pytest.mark.parametrize("name", BODIES)
def test_counts_and_reads_equal_vllms(pools, name):
    short, _ = pools
    body = {"model": MODEL, "max_tokens": 3, **BODIES[name]}
    ours = counter_for("llama3_1").count_request("messages", body)
    status, ctype, head, raw = _exchange(short.port, "/v1/messages", body)
    assert status == 200, raw[:300]
    usage = json.loads(raw)["usage"]
    facts = read_response(status, ctype, raw)
    assert ours == [usage["input_tokens"]] == [_count_tokens(short, body)]
    assert (facts.prompt_tokens, facts.prompt_exact, facts.completion_tokens) == \
        (usage["input_tokens"], True, usage["output_tokens"])
    assert facts.finish_length == (json.loads(raw)["stop_reason"] == "max_tokens")
    status, ctype, head, raw = _exchange(short.port, "/v1/messages", {**body, "stream": True})
    events = _events(raw)
    start = next(e for e in events if e["type"] == "message_start")
    delta = next(e for e in events if e["type"] == "message_delta")
    facts = read_response(status, ctype, raw)
    assert facts.streamed and start["message"]["usage"]["input_tokens"] == ours[0] == facts.prompt_tokens
    assert facts.completion_tokens == delta["usage"]["output_tokens"]
    assert facts.finish_length == (delta["delta"]["stop_reason"] == "max_tokens")
    if name == "plain":
        _record("messages_json", *_exchange(short.port, "/v1/messages", body)[2:])
        _record("messages_stream", head, raw)
    for cut in range(1, len(raw)):  # vLLM's own stream bytes, split at every byte
        reader = ResponseReader(status, ctype)
        reader.feed(raw[:cut])
        reader.feed(raw[cut:])
        assert reader.finish() == facts, cut


def test_window_answers_are_read_as_vllm_meant_them(pools):
    """Each window case straight from the 8K server: the reader's kind and count, and the bytes
    the response tables read (recorded with RECORD_VLLM_MESSAGES=1)."""
    short, long = pools
    over, clamp, full = _text_of(long, 9000), _text_of(long, 8100), _text_of(long, SHORT)
    cases = {
        "messages_over": ({"messages": over, "max_tokens": 64}, "prompt_over_window"),
        "messages_over_stream": ({"messages": over, "max_tokens": 64, "stream": True}, "prompt_over_window"),
        "messages_clamped": ({"messages": clamp, "max_tokens": 200}, None),
        "messages_clamped_stream": ({"messages": clamp, "max_tokens": 200, "stream": True}, None),
        "messages_fills": ({"messages": full, "max_tokens": 1}, "prompt_fills_window"),
        "messages_max_over_window": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000},
                                     "output_over_window"),
        "messages_chars": ({"messages": [{"role": "user", "content": "a" * 1_200_000}], "max_tokens": 8},
                           "prompt_over_window"),
        "messages_no_max": ({"messages": [{"role": "user", "content": "hi"}]}, "other"),
        "messages_max_zero": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "other"),
    }
    for name, (body, kind) in cases.items():
        status, ctype, head, raw = _exchange(short.port, "/v1/messages", {"model": MODEL, **body})
        _record(name, head, raw)
        facts = read_response(status, ctype, raw)
        assert facts.error == kind, (name, status, raw[:300])
        if kind is None:  # clamped: a 200 that ran into the window, with the prompt's exact count
            assert status == 200 and facts.finish_length and facts.prompt_tokens == 8100
            assert facts.prompt_tokens + facts.completion_tokens == SHORT
        elif kind == "other":  # pydantic's refusals: vLLM's OpenAI envelope, on this path too
            assert status == 400 and "error" in json.loads(raw), raw[:300]
        else:  # the engine's refusals: Anthropic's envelope
            doc = json.loads(raw)
            assert status == 400 and doc["type"] == "error" and doc["error"]["message"], raw[:300]
    status, _, head, raw = _exchange(short.port, "/v1/messages/count_tokens", {"model": MODEL, "messages": clamp})
    _record("messages_count_tokens", head, raw)
    assert status == 200 and json.loads(raw)["input_tokens"] == 8100


def test_messages_misroutes_are_counted_once_with_their_kind(pools, underestimating):
    """Through Envoy and a router that under-estimates on purpose: every oversized Messages
    request really goes short, and each answer vLLM gives is counted as the chat ones are."""
    _, long = pools
    over, clamp, full, fits = (_text_of(long, n) for n in (9000, 8100, SHORT, 8180))
    probes = [
        ("over the window", {"messages": over, "max_tokens": 64}, "prompt_over_window"),
        ("clamped", {"messages": clamp, "max_tokens": 200}, "output_clamped"),
        ("clamped, streamed", {"messages": clamp, "max_tokens": 200, "stream": True}, "output_clamped"),
        ("fills the window", {"messages": full, "max_tokens": 1}, "prompt_fills_window"),
        ("fits exactly", {"messages": fits, "max_tokens": SHORT - 8180}, None),
    ]
    lines_before = len(_misroute_lines(underestimating))
    rows = []
    for name, body, kind in probes:
        before = _metrics(underestimating)
        rid = f"messages-{uuid.uuid4().hex}"
        status, _, _, raw = _exchange(underestimating.listen_port, "/v1/messages", {"model": MODEL, **body}, rid)
        want = _sum(before, "extproc_misroutes_total") + (kind is not None)
        got = _settled(underestimating, "extproc_misroutes_total", want)
        if kind is None:
            time.sleep(0.3)  # a count that should not come: give it the time one would take
            got = _sum(_metrics(underestimating), "extproc_misroutes_total")
        pool = _served_pool(underestimating, rid)
        rows.append(f"| {name} | {pool} | {status} | {kind or '-'} |")
        assert pool == "short", (name, pool)
        assert got == want, (name, status, raw[:300])
        if kind is not None:
            after = _metrics(underestimating)
            assert _sum(after, "extproc_misroutes_total", kind=kind) - \
                _sum(before, "extproc_misroutes_total", kind=kind) == 1, name
    print("\n" + "\n".join(rows))
    lines = _misroute_lines(underestimating)[lines_before:]
    assert len(lines) == sum(k is not None for *_, k in probes), lines
    assert all("pool=short" in line for line in lines)


def test_messages_are_routed_by_size_and_learned_from(pools, default_router):
    """The default router: a long Messages request goes long, a short one short, and their usage
    (JSON and stream) is read for the calibration like a chat completion's."""
    _, long = pools
    before = _metrics(default_router)
    long_rid, short_rid, stream_rid = (f"learn-{uuid.uuid4().hex}" for _ in range(3))
    status, _, _, raw = _exchange(default_router.listen_port, "/v1/messages",
                                  {"model": MODEL, "messages": _text_of(long, 9000), "max_tokens": 4}, long_rid)
    assert status == 200 and json.loads(raw)["usage"]["input_tokens"] == 9000
    small = {"model": MODEL, "max_tokens": 4, **BODIES["conversation"]}
    assert _exchange(default_router.listen_port, "/v1/messages", small, short_rid)[0] == 200
    assert _exchange(default_router.listen_port, "/v1/messages", {**small, "stream": True}, stream_rid)[0] == 200
    assert [_served_pool(default_router, r) for r in (long_rid, short_rid, stream_rid)] == ["long", "short", "short"]
    json_reads = _settled(default_router, "extproc_usage_reads_total",
                          _sum(before, "extproc_usage_reads_total", outcome="json") + 2, outcome="json")
    stream_reads = _settled(default_router, "extproc_usage_reads_total",
                            _sum(before, "extproc_usage_reads_total", outcome="stream") + 1, outcome="stream")
    assert json_reads - _sum(before, "extproc_usage_reads_total", outcome="json") == 2
    assert stream_reads - _sum(before, "extproc_usage_reads_total", outcome="stream") == 1
    assert _sum(_metrics(default_router), "extproc_misroutes_total") == _sum(before, "extproc_misroutes_total")
