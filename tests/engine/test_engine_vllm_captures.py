"""The engine against real vLLM 0.32.0's bytes (shared/data/vllm): every captured case the engine can
reproduce, table-driven. Errors must match byte for byte (status, content-type, body); 200s match in
shape (every key, in order, with the same kinds of values) and in every number (usage, finish reasons).

The reference servers served ``meta-llama/Llama-3.1-8B-Instruct`` and ``meta-llama/Meta-Llama-3-8B-Instruct``
with the Llama-3 tokenizer files (the Llama-3 chat template: "Hi" is 11 prompt tokens), so the engine
runs with ``--tokenizer llama3`` and those two served names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from engine_harness import SHARED_REQUESTS

from extproc.tokens import counter_for

DATA = SHARED_REQUESTS.parents[1] / "vllm"
SERVED = ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct")
COUNTER = counter_for("llama3")

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"captured vLLM data not found at {DATA}")


def chat_of(prompt_tokens: int) -> list[dict]:
    """One user message whose chat prompt is exactly ``prompt_tokens`` tokens (10 are the template's)."""
    messages = [{"role": "user", "content": "a" + " a" * (prompt_tokens - 11)}]
    assert COUNTER.count_chat(messages) == prompt_tokens
    return messages


def chat(prompt_tokens: int, **fields: Any) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": SERVED[0], "messages": chat_of(prompt_tokens), **fields}


def text_of(tokens: int) -> str:
    return "a" + " a" * (tokens - 1)


# name -> (path, body); the folder says which window (8K or 64K) served it
CASES: dict[str, tuple[str, dict]] = {
    "errors_8k/chat_chars1_2M": ("/v1/chat/completions", {
        "model": SERVED[0], "messages": [{"role": "user", "content": "a" * (1_200_115 - 116)}], "max_tokens": 64}),
    "errors_8k/chat_prompt100k_max64": chat(100_000, max_tokens=64),
    "errors_8k/chat_prompt70000_max64": chat(70_000, max_tokens=64),
    "errors_8k/chat_prompt8000_max500": chat(8010, max_tokens=500),
    "errors_8k/chat_prompt8182_max1": chat(8182, max_tokens=1),
    "errors_8k/chat_prompt8191_max1": chat(8191, max_tokens=1),
    "errors_8k/chat_prompt8191_nomax": chat(8191),
    "errors_8k/chat_prompt8192_max1": chat(8192, max_tokens=1),
    "errors_8k/chat_prompt8192_nomax": chat(8192),
    "errors_8k/chat_prompt9000_max64": chat(9010, max_tokens=64),
    "errors_8k/chat_prompt9000_max64_stream": chat(9010, max_tokens=64, stream=True, stream_options={"include_usage": True}),
    "errors_8k/chat_prompt9000_mct64": chat(9010, max_completion_tokens=64),
    "errors_8k/chat_prompt9000_n2": chat(9010, max_tokens=64, n=2),
    "errors_8k/chat_prompt9000_nomax": chat(9010),
    "errors_8k/chat_short_max8190": chat(15, max_tokens=8190),
    "errors_8k/chat_short_max9000": chat(15, max_tokens=9000),
    "errors_8k/compl_batch_one_over": ("/v1/completions", {"model": SERVED[0], "prompt": [[7] * 10, [7] * 9000],
                                                          "max_tokens": 16}),
    "errors_8k/compl_chars1_2M": ("/v1/completions", {"model": SERVED[0], "prompt": "a" * 1_200_000, "max_tokens": 16}),
    "errors_8k/compl_ids8192_nomax": ("/v1/completions", {"model": SERVED[0], "prompt": [7] * 8192}),
    "errors_8k/compl_ids9000_max16": ("/v1/completions", {"model": SERVED[0], "prompt": [7] * 9000, "max_tokens": 16}),
    "errors_8k/compl_str9000_max16": ("/v1/completions", {"model": SERVED[0], "prompt": text_of(9000),
                                                         "max_tokens": 16}),
    "errors_8k/responses_9000": ("/v1/responses", {"model": SERVED[0], "input": "a" + " a" * 9000,
                                                   "max_output_tokens": 16}),
    "errors_64k/chat_prompt70000_max64": chat(70_000, max_tokens=64),
    "errors_64k/chat_prompt9000_max64": chat(9010, max_tokens=64),
    "errors_64k/chat_prompt9000_max64_stream": chat(9010, max_tokens=64, stream=True, stream_options={"include_usage": True}),
    "errors_64k/compl_ids9000_max16": ("/v1/completions", {"model": SERVED[0], "prompt": [7] * 9000, "max_tokens": 16}),
}


def shape(value: Any) -> Any:
    """Keys in order and the kind of every value; the numbers of ``usage`` and finish reasons kept."""
    if isinstance(value, dict):
        return [(k, value[k] if k in ("usage", "finish_reason", "object", "type", "status") else shape(value[k]))
                for k in value]
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def sse_events(body: bytes) -> list[Any]:
    out = []
    for frame in body.decode().split("\n\n"):
        if frame:
            data = frame.split("data: ", 1)[1]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def served(serve, path: str, body: dict | bytes, window: int, **config: Any) -> tuple[int, str, bytes]:
    async def scenario(session, engine):
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        async with session.post(path, **kwargs) as resp:
            return resp.status, resp.headers["Content-Type"], await resp.read()

    return serve(scenario, served_names=SERVED, tokenizer="llama3", max_model_len=window,
                 profile="short" if window == 8192 else "long", **config)


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_answers_like_the_captured_vllm(serve, name):
    meta = json.loads((DATA / f"{name}.meta.json").read_text())
    captured = (DATA / f"{name}.body").read_bytes()
    path, body = CASES[name]
    assert meta["path"] == path
    status, content_type, got = served(serve, path, body, 8192 if name.startswith("errors_8k") else 65_536)
    assert status == meta["status"], got[:400]
    assert content_type == meta["headers"]["content-type"]
    if status != 200:
        assert got == captured  # errors byte for byte
    elif content_type.startswith("text/event-stream"):
        mine, theirs = sse_events(got), sse_events(captured)
        assert len(mine) == len(theirs)
        assert [shape(e) for e in mine] == [shape(e) for e in theirs]
    else:
        assert shape(json.loads(got)) == shape(json.loads(captured))


def _exchange(name: str) -> tuple[int, dict[str, str], bytes]:
    raw = (DATA / "responses_8k" / f"{name}.txt").read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


HI = [{"role": "user", "content": "Hi"}]
EXCHANGES: dict[str, tuple[str, dict | bytes]] = {
    "chat_json": ("/v1/chat/completions", {"model": SERVED[0], "messages": HI, "max_tokens": 5}),
    "chat_json_mct": ("/v1/chat/completions", {"model": SERVED[0], "messages": HI, "max_completion_tokens": 4}),
    "chat_alias_model": ("/v1/chat/completions", {"model": SERVED[1], "messages": HI, "max_tokens": 3}),
    "chat_no_model": ("/v1/chat/completions", {"messages": HI, "max_tokens": 3}),
    "chat_parts": ("/v1/chat/completions", {"model": SERVED[0], "max_tokens": 3, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]}),
    "chat_n2": ("/v1/chat/completions", {"model": SERVED[0], "messages": HI, "max_tokens": 3, "n": 2}),
    "chat_stream_usage": ("/v1/chat/completions", {"model": SERVED[0], "messages": HI, "max_tokens": 3,
                                                   "stream": True, "stream_options": {"include_usage": True}}),
    "chat_stream_nousage": ("/v1/chat/completions", {"model": SERVED[0], "messages": HI, "max_tokens": 3,
                                                     "stream": True}),
    "chat_stream_contusage": ("/v1/chat/completions", {
        "model": SERVED[0], "messages": HI, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    "chat_stream_n2_usage": ("/v1/chat/completions", {"model": SERVED[0], "messages": HI, "max_tokens": 2, "n": 2,
                                                      "stream": True, "stream_options": {"include_usage": True}}),
    "chat_other_model": ("/v1/chat/completions", {"model": "nope/model", "messages": HI}),
    "compl_ids": ("/v1/completions", {"model": SERVED[0], "prompt": [1, 2, 3, 4], "max_tokens": 4}),
    "compl_ids_batch": ("/v1/completions", {"model": SERVED[0], "prompt": [[1, 2], [3, 4, 5]], "max_tokens": 2}),
    "compl_str": ("/v1/completions", {"model": SERVED[0], "prompt": text_of(2), "max_tokens": 4}),
    "compl_strs_batch": ("/v1/completions", {"model": SERVED[0], "prompt": [text_of(3), text_of(3)], "max_tokens": 2}),
    "compl_stream_usage": ("/v1/completions", {"model": SERVED[0], "prompt": text_of(2), "max_tokens": 3, "stream": True,
                                               "stream_options": {"include_usage": True}}),
    "responses_json": ("/v1/responses", {"model": SERVED[0], "input": "Hi", "max_output_tokens": 16}),
    "responses_stream": ("/v1/responses", {"model": SERVED[0], "input": "Hi", "max_output_tokens": 16,
                                           "stream": True}),
    "max_tokens_zero": ("/v1/chat/completions", {"model": SERVED[0], "messages": HI, "max_tokens": 0}),
    "stream_opts_nostream": ("/v1/chat/completions", {"model": SERVED[0], "messages": HI,
                                                      "stream_options": {"include_usage": True}}),
    "bad_json": ("/v1/chat/completions", b'{"model":}'),
}


@pytest.mark.parametrize("name", sorted(EXCHANGES))
def test_engine_exchanges_match_the_captured_ones(serve, name):
    status, headers, captured = _exchange(name)
    path, body = EXCHANGES[name]
    got_status, content_type, got = served(serve, path, body, 8192)
    assert got_status == status, got[:400]
    assert content_type == headers["content-type"]
    if status != 200:
        assert got == captured
    elif content_type.startswith("text/event-stream"):
        # vLLM's /v1/responses deltas sometimes carry two tokens: compare runs of same-shaped events
        mine, theirs = _runs(sse_events(got)), _runs(sse_events(captured))
        assert mine == theirs
    else:
        assert shape(json.loads(got)) == shape(json.loads(captured))


def _runs(events: list) -> list:
    out: list = []
    for e in map(shape, events):
        if not out or out[-1] != e:
            out.append(e)
    return out


def test_version_models_and_health_match(serve):
    async def scenario(session, engine):
        out = {}
        for path in ("/version", "/v1/models", "/health"):
            async with session.get(path) as resp:
                out[path] = (resp.status, resp.headers.get("Content-Type"), await resp.read())
        return out

    out = serve(scenario, served_names=SERVED, tokenizer="llama3")
    assert out["/version"][2] == _exchange("version")[2]
    assert out["/version"][1] == "application/json"
    mine, theirs = json.loads(out["/v1/models"][2]), json.loads(_exchange("models")[2])
    assert shape(mine) == shape(theirs)
    assert [m["id"] for m in mine["data"]] == list(SERVED)
    assert out["/health"][0] == 200 and out["/health"][2] == b""


def test_metrics_carry_the_engine_label(serve):
    _, headers, captured = _exchange("metrics_after")

    async def scenario(session, engine):
        async with session.get("/metrics") as resp:
            return resp.headers["Content-Type"], await resp.text()

    content_type, text = serve(scenario, served_names=SERVED, tokenizer="llama3")
    assert content_type == headers["content-type"]
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        line = f'{name}{{engine="0",model_name="{SERVED[0]}"}}'
        assert line in captured.decode() and line in text, name
    success = f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{SERVED[0]}"}}'
    assert success in captured.decode() and success in text
