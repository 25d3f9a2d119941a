"""/v1/messages (+ count_tokens), /v1/responses, /tokenize, n > 1, several served names, and the bounds
that keep one request from slowing the engine more than it would slow vLLM."""

from __future__ import annotations

import json
import time

import pytest
from engine_harness import read_sse

from extproc.engine.counting import counter_for
from extproc.tokens import counter_for as tokens_for
from extproc.engine.versions import VllmVersion

NAMES = ("meta-llama/Llama-3.1-8B-Instruct", "llama")
HI = [{"role": "user", "content": "Hi"}]


def _prompt(messages, family="llama3_1"):
    return tokens_for(family).count_chat(messages)


async def _post(session, path, body):
    async with session.post(path, json=body) as resp:
        return resp.status, await resp.json()


def test_messages_json_stream_and_count_tokens(serve):
    body = {"model": "llama", "system": "Be brief.", "messages": HI, "max_tokens": 3}

    async def scenario(session, engine):
        out = {"json": await _post(session, "/v1/messages", body),
               "count": await _post(session, "/v1/messages/count_tokens", {k: v for k, v in body.items()
                                                                          if k != "max_tokens"})}
        async with session.post("/v1/messages", json=dict(body, stream=True)) as resp:
            out["stream"] = (resp.headers["Content-Type"], await resp.text())
        out["no_max"] = await _post(session, "/v1/messages", {"model": "llama", "messages": HI})
        out["too_long"] = await _post(session, "/v1/messages", dict(body, messages=[
            {"role": "user", "content": "a" + " a" * 9000}]))
        return out

    out = serve(scenario, served_names=NAMES)
    prompt = tokens_for("llama3_1").count_request("messages", body)[0]
    status, msg = out["json"]
    assert status == 200
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["model"] == NAMES[0]
    assert msg["id"].startswith("chatcmpl-") and msg["stop_reason"] == "max_tokens"
    assert msg["usage"] == {"input_tokens": prompt, "output_tokens": 3}
    assert [b["type"] for b in msg["content"]] == ["text"]
    assert out["count"] == (200, {"input_tokens": prompt, "context_management": {"original_input_tokens": prompt}})
    content_type, text = out["stream"]
    assert content_type == "text/event-stream; charset=utf-8"
    frames = [f.split("\n") for f in text.strip().split("\n\n")]
    names = [f[0].removeprefix("event: ") for f in frames]
    assert names == ["message_start", "content_block_start"] + ["content_block_delta"] * 3 + [
        "content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(f[1].removeprefix("data: ")) for f in frames]
    assert [d["type"] for d in data] == names
    assert data[0]["message"]["usage"] == {"input_tokens": prompt, "output_tokens": 0}
    assert data[-2]["usage"] == {"input_tokens": prompt, "output_tokens": 3}
    assert data[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    # a missing required field is FastAPI's validation error (OpenAI envelope), as in vLLM
    assert out["no_max"][0] == 400 and out["no_max"][1]["error"]["param"] == "body.max_tokens"
    # a context-length 400 is Anthropic-shaped
    status, err = out["too_long"]
    assert status == 400 and err["type"] == "error" and err["error"]["type"] == "BadRequestError"
    assert "at least 8193 input tokens" in err["error"]["message"]


def test_responses_json_and_stream(serve):
    body = {"model": NAMES[0], "instructions": "Be brief.", "input": [{"role": "user", "content": "Hi"}],
            "max_output_tokens": 4}

    async def scenario(session, engine):
        out = {"json": await _post(session, "/v1/responses", body)}
        async with session.post("/v1/responses", json=dict(body, stream=True)) as resp:
            out["stream"] = await resp.text()
        return out

    out = serve(scenario, served_names=NAMES)
    prompt = tokens_for("llama3_1").count_request("responses", body)[0]
    status, resp = out["json"]
    assert status == 200 and resp["object"] == "response" and resp["status"] == "incomplete"
    assert resp["usage"]["input_tokens"] == prompt and resp["usage"]["output_tokens"] == 4
    assert resp["usage"]["total_tokens"] == prompt + 4
    frames = [f.split("\n") for f in out["stream"].strip().split("\n\n")]
    names = [f[0].removeprefix("event: ") for f in frames]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    data = [json.loads(f[1].removeprefix("data: ")) for f in frames]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert data[-1]["response"]["usage"]["input_tokens"] == prompt
    assert "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta") == data[-4]["text"]


def test_tokenize_chat_and_prompt(serve):
    async def scenario(session, engine):
        return (await _post(session, "/tokenize", {"model": "llama", "messages": HI}),
                await _post(session, "/tokenize", {"prompt": "Hi there"}),
                await _post(session, "/tokenize", {"prompt": "Hi there", "add_special_tokens": False}),
                await _post(session, "/tokenize", {"model": "other", "prompt": "x"}))

    chat, prompt, bare, unknown = serve(scenario, served_names=NAMES, max_model_len=4096)
    assert chat[0] == 200 and chat[1]["count"] == _prompt(HI) == len(chat[1]["tokens"])
    assert chat[1]["max_model_len"] == 4096 and chat[1]["token_strs"] is None
    assert prompt[1]["tokens"][0] == 128000 and prompt[1]["count"] == bare[1]["count"] + 1
    assert unknown[0] == 404


def test_n_choices_and_batches_sum_usage_like_vllm(serve):
    async def scenario(session, engine):
        return (await _post(session, "/v1/chat/completions", {"messages": HI, "max_tokens": 3, "n": 3}),
                await _post(session, "/v1/completions", {"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 2, "n": 2}))

    chat, compl = serve(scenario, served_names=NAMES)
    assert [c["index"] for c in chat[1]["choices"]] == [0, 1, 2]
    prompt = _prompt(HI)
    # the prompt once, every choice's completion tokens
    assert chat[1]["usage"]["prompt_tokens"] == prompt and chat[1]["usage"]["completion_tokens"] == 9
    assert [c["index"] for c in compl[1]["choices"]] == [0, 1, 2, 3]
    assert compl[1]["usage"]["prompt_tokens"] == 5 and compl[1]["usage"]["completion_tokens"] == 8


def test_tokenizer_family_follows_the_served_name_or_the_flag():
    assert counter_for(None, "meta-llama/Llama-3.1-8B-Instruct").family == "llama3_1"
    assert counter_for(None, "meta-llama/Meta-Llama-3-8B-Instruct").family == "llama3"
    assert counter_for(None, "Qwen/Qwen3-8B").family == "qwen3"
    assert counter_for("llama3", "meta-llama/Llama-3.1-8B-Instruct").family == "llama3"
    with pytest.raises(ValueError):
        counter_for("gpt2", "x")
    assert _prompt(HI, "llama3_1") == _prompt(HI, "llama3") + 25  # the dated system block


def test_version_parsing():
    assert VllmVersion.parse("v0.32.0").release == "0.32.0"
    assert VllmVersion.parse("0.33").clamps_max_tokens and not VllmVersion.parse("0.25").clamps_max_tokens
    for bad in ("0.9", "latest", "1"):
        with pytest.raises(ValueError):
            VllmVersion.parse(bad)


# --- bounded cost ---------------------------------------------------------------------------------


def test_four_thousand_chat_turns_count_fast(serve):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} <|eot_id|>"} for i in range(4000)]

    async def scenario(session, engine):
        t0 = time.monotonic()
        status, body = await _post(session, "/tokenize", {"messages": turns})
        tokenize_s = time.monotonic() - t0
        t0 = time.monotonic()
        chat = await _post(session, "/v1/chat/completions", {"messages": turns, "max_tokens": 1})
        return status, body, tokenize_s, time.monotonic() - t0, chat

    status, body, tokenize_s, chat_s, chat = serve(scenario, profile="long", max_model_len=65_536)
    assert status == 200 and chat[0] == 200
    assert chat[1]["usage"]["prompt_tokens"] == body["count"]
    assert tokenize_s < 3 and chat_s < 3, (tokenize_s, chat_s)  # was 105 s (quadratic in special tokens)


def test_huge_prompt_is_refused_before_tokenizing(serve):
    text = "a" * 9_000_000  # more characters than any 64K-token prompt: never tokenized

    async def scenario(session, engine):
        t0 = time.monotonic()
        status, body = await _post(session, "/v1/completions", {"prompt": text, "max_tokens": 1})
        return status, body, time.monotonic() - t0

    status, body, elapsed = serve(scenario, profile="long", max_model_len=65_536)
    assert status == 400 and body["error"]["param"] == "input_text"
    assert "more than 8388608 characters" in body["error"]["message"]
    assert elapsed < 2, elapsed


def test_body_over_the_bound_is_413(serve):
    async def scenario(session, engine):
        async with session.post("/v1/completions", data=b'{"prompt": "' + b"a" * 2_000_000 + b'"}',
                                headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()

    status, body = serve(scenario, max_body_bytes=1_000_000)
    assert status == 413 and body["error"]["code"] == 413


def test_stream_events_are_well_formed_for_every_api(serve):
    async def scenario(session, engine):
        async with session.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as resp:
            return await read_sse(resp)

    events = serve(scenario, served_names=NAMES)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 2
    assert events[-2]["system_fingerprint"].startswith("vllm-0.32.0-")
