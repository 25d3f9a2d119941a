"""The simulated engine's OpenAI API over real HTTP: counts, limits, errors, streams, metrics."""

from __future__ import annotations

import copy

import pytest
from engine_harness import metric, metric_values, read_sse

from extproc.tokens import counter_for as tokens_for

LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
QWEN = "Qwen/Qwen3-8B"


# --- prompt counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model,family", [(LLAMA, "llama3"), (QWEN, "qwen3")])
def test_chat_prompt_tokens_equal_recorded_vllm_counts(serve, shared_requests, model, family):
    async def scenario(session, engine):
        mismatches = []
        for row in shared_requests:
            body = copy.deepcopy(row["body"])
            body["model"] = model
            body["max_tokens"] = 1  # the count is of the prompt; one output token keeps this fast
            async with session.post("/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                usage = (await resp.json())["usage"]
            if usage["prompt_tokens"] != row["prompt_tokens"][family]:
                mismatches.append((row["prompt_tokens"][family], usage["prompt_tokens"]))
        return mismatches

    assert serve(scenario, model=model) == []


def test_unmodified_shared_body_reports_recorded_usage(serve, shared_requests):
    row = min(shared_requests, key=lambda r: r["body"]["max_tokens"] + r["prompt_tokens"]["llama3"])

    async def scenario(session, engine):
        async with session.post("/v1/chat/completions", json=row["body"]) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    body = serve(scenario, model=row["body"]["model"])
    assert body["usage"]["prompt_tokens"] == row["prompt_tokens"]["llama3"]
    assert body["usage"]["completion_tokens"] == row["body"]["max_tokens"]
    assert body["usage"]["total_tokens"] == row["prompt_tokens"]["llama3"] + row["body"]["max_tokens"]


def test_completions_count_token_ids_strings_and_batches(serve):
    text = "The quick brown fox jumps over the lazy dog."

    async def scenario(session, engine):
        out = {}
        for name, prompt in {"ids": list(range(50)), "id_lists": [[1, 2, 3], [4, 5, 6, 7, 8]],
                             "string": text, "strings": [text, text + text]}.items():
            async with session.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3}) as resp:
                assert resp.status == 200, await resp.text()
                out[name] = await resp.json()
        return out

    out = serve(scenario, model=LLAMA)
    one = tokens_for("llama3").count_prompt(text)
    assert out["ids"]["usage"]["prompt_tokens"] == 50
    assert out["id_lists"]["usage"] == {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14,
                                        "prompt_tokens_details": None, "completion_tokens_details": None}
    assert [c["index"] for c in out["id_lists"]["choices"]] == [0, 1]
    assert out["string"]["usage"]["prompt_tokens"] == one
    assert out["strings"]["usage"]["prompt_tokens"] == one + tokens_for("llama3").count_prompt(text + text)
    assert out["ids"]["object"] == "text_completion"
    assert out["ids"]["choices"][0]["finish_reason"] == "length"
    assert len(out["ids"]["choices"][0]["text"].split()) == 3


# --- context window ----------------------------------------------------------------------------------


def _at_least(window: int) -> str:
    return (f"This model's maximum context length is {window} tokens. However, your prompt contains at least "
            f"{window + 1} input tokens, which exceeds this limit even without any output tokens. Please reduce the "
            f"length of the input prompt. (parameter=input_tokens, value={window + 1})")


def _context_message_025(max_len: int, output: int, prompt: int) -> str:
    return (f"This model's maximum context length is {max_len} tokens. However, you requested {output} "
            f"output tokens and your prompt contains {prompt} input tokens, for a total of {prompt + output} "
            "tokens. Please reduce the length of the input prompt or the number of requested output tokens.")


def _context_message_011(max_len: int, output: int, prompt: int) -> str:
    return (f"This model's maximum context length is {max_len} tokens. However, you requested {prompt + output} "
            f"tokens ({prompt} in the messages, {output} in the completion). Please reduce the length of the "
            "messages or completion.")


def _context_cases(row: dict, count: int) -> dict:
    return {
        "ids": ("/v1/completions", {"prompt": [7] * 10_000, "max_tokens": 64}),
        "chat_over_by_one": ("/v1/chat/completions", dict(row["body"], max_tokens=8192 - count + 1)),
        "chat_exact_fit": ("/v1/chat/completions", dict(row["body"], max_tokens=8192 - count)),
        "max_completion_tokens_wins": ("/v1/chat/completions",
                                       dict(row["body"], max_tokens=1, max_completion_tokens=8192)),
        "prompt_alone_fills_window": ("/v1/completions", {"prompt": [7] * 8192}),
        "text_over_window": ("/v1/completions", {"prompt": "a" + " a" * 20_000, "max_tokens": 8}),
    }


async def _post_all(session, cases: dict) -> dict:
    out = {}
    for name, (path, body) in cases.items():
        async with session.post(path, json=body) as resp:
            out[name] = (resp.status, await resp.json())
    return out


def test_context_window_like_vllm_032(serve, shared_requests):
    """0.32+: over the window is a 400 ("at least" for text); prompt + max_tokens over it is clamped."""
    row = shared_requests[0]
    count = row["prompt_tokens"]["llama3"]

    async def scenario(session, engine):
        out = await _post_all(session, _context_cases(row, count))
        out["metrics"] = await metric_values(session)
        return out

    out = serve(scenario, model=LLAMA)
    status, body = out["ids"]
    assert status == 400
    assert body == {"error": {
        "message": "This model's maximum context length is 8192 tokens. However, your prompt contains 10000 input "
                   "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the "
                   "input prompt. (parameter=input_tokens, value=10000)",
        "type": "BadRequestError", "param": "input_tokens", "code": 400}}
    # prompt + max_tokens over the window: served, max_tokens clamped, total == window
    for name in ("chat_over_by_one", "chat_exact_fit"):
        status, body = out[name]
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 8192 - count
        assert body["usage"]["total_tokens"] == 8192
        assert body["choices"][0]["finish_reason"] == "length"
    status, body = out["max_completion_tokens_wins"]
    assert status == 200 and body["usage"]["total_tokens"] == 8192
    status, body = out["prompt_alone_fills_window"]
    assert status == 400
    assert body["error"]["message"] == "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
    status, body = out["text_over_window"]
    assert status == 400 and body["error"]["message"] == _at_least(8192)
    rejected = {k: v for k, v in out["metrics"].items() if k.startswith("vllm_sim:requests_rejected_total")}
    assert sum(v for k, v in rejected.items() if 'reason="context_length"' in k) == 3


@pytest.mark.parametrize("version,wording", [("0.25", _context_message_025), ("0.11", _context_message_011)])
def test_older_releases_refuse_prompt_plus_max_tokens_in_their_words(serve, shared_requests, version, wording):
    row = shared_requests[0]
    count = row["prompt_tokens"]["llama3"]

    async def scenario(session, engine):
        out = await _post_all(session, _context_cases(row, count))
        async with session.get("/version") as resp:
            out["version"] = await resp.json()
        return out

    out = serve(scenario, model=LLAMA, vllm_version=version)
    assert out["version"] == {"version": f"{version}.0"}
    assert out["ids"][0] == 400
    assert out["ids"][1]["error"]["message"] == wording(8192, 64, 10_000)
    assert out["chat_over_by_one"][0] == 400
    assert out["chat_over_by_one"][1]["error"]["message"] == wording(8192, 8192 - count + 1, count)
    assert out["chat_exact_fit"][0] == 200
    assert out["chat_exact_fit"][1]["usage"]["completion_tokens"] == 8192 - count
    assert out["max_completion_tokens_wins"][1]["error"]["message"] == wording(8192, 8192, count)
    assert out["text_over_window"][0] == 400
    message = out["text_over_window"][1]["error"]["message"]  # counted whole: 20,001 tokens
    assert "contains 20001 input tokens" in message or "(20001 in the messages" in message, message
    assert out["prompt_alone_fills_window"][0] == 400
    if version == "0.25":
        assert out["prompt_alone_fills_window"][1]["error"]["message"] == wording(8192, 0, 8192)


def test_without_max_tokens_output_follows_policy_capped_by_window(serve):
    async def scenario(session, engine):
        out = []
        for prompt in ([1] * 100, [1] * 8000):
            async with session.post("/v1/completions", json={"prompt": prompt}) as resp:
                assert resp.status == 200, await resp.text()
                out.append(await resp.json())
        return out

    short, long = serve(scenario, output_tokens=256)
    assert short["usage"]["completion_tokens"] == 256
    assert short["choices"][0]["finish_reason"] == "stop"
    assert long["usage"]["completion_tokens"] == 8192 - 8000
    assert long["choices"][0]["finish_reason"] == "length"


# --- streaming ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_usage_only_when_asked(serve, include_usage):
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 7,
            "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}

    async def scenario(session, engine):
        async with session.post("/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            return await read_sse(resp)

    events = serve(scenario, model=LLAMA)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == LLAMA for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    token_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(token_chunks) == 7
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 6 + ["length"]
    prompt = tokens_for("llama3").count_chat(body["messages"])
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {"prompt_tokens": prompt, "completion_tokens": 7, "total_tokens": prompt + 7}
        assert all("usage" not in c for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)
        assert all(c["choices"] for c in chunks)


def test_completions_stream_with_usage_counts_emitted_tokens(serve):
    async def scenario(session, engine):
        body = {"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}
        async with session.post("/v1/completions", json=body) as resp:
            assert resp.status == 200
            return await read_sse(resp)

    events = serve(scenario)
    assert events[-1] == "[DONE]"
    *tokens, usage = events[:-1]
    assert all(c["object"] == "text_completion" for c in events[:-1])
    per_choice = {0: 0, 1: 0}
    for c in tokens:
        per_choice[c["choices"][0]["index"]] += 1
    assert per_choice == {0: 4, 1: 4}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(tokens) == 8
    assert usage["usage"]["prompt_tokens"] == 5


# --- errors ------------------------------------------------------------------------------------------


def test_malformed_bodies_get_vllms_400s(serve):
    cases = [
        ("/v1/chat/completions", b"{not json", "Bad Request", "body.1"),
        ("/v1/chat/completions", b"[1, 2]", "Bad Request", "body"),
        ("/v1/chat/completions", b'{"model": "meta-llama/Meta-Llama-3-70B-Instruct"}', "Bad Request", "body.messages"),
        ("/v1/chat/completions", b'{"messages": "hello"}', "Bad Request", "body.messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "nine"}',
         "Bad Request", "body.max_tokens"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
         "BadRequestError", "max_tokens"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "BadRequestError", None),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"a": 1}}',
         "BadRequestError", "stream_options"),
        ("/v1/completions", b'{"prompt": []}', "Bad Request", "body.prompt"),
        ("/v1/completions", b'{"prompt": [1, "a"]}', "Bad Request", "body.prompt"),
        ("/v1/completions", b'{}', "BadRequestError", "prompt"),
        ("/v1/completions", b'', "Bad Request", "body"),
        ("/v1/chat/completions", b'{"model": ' + b"[" * 1000 + b"]" * 1000 + b', "messages": []}', "Bad Request", None),
        ("/v1/chat/completions", b'{"model": ' + b"[" * 100 + b"]" * 100 + b', "messages": []}', "Bad Request",
         "body.model"),
    ]

    async def scenario(session, engine):
        out = []
        for path, raw, _, _ in cases:
            async with session.post(path, data=raw, headers={"Content-Type": "application/json"}) as resp:
                out.append((resp.status, await resp.json()))
        async with session.post("/v1/chat/completions", data=b"{}") as resp:  # no JSON content type
            out.append((resp.status, await resp.json()))
        async with session.get("/health") as resp:  # still serving
            out.append((resp.status, None))
        return out

    results = serve(scenario)
    for (path, raw, err_type, param), (status, body) in zip(cases, results):
        assert status == 400, (path, raw[:80], status, body)
        assert body["error"]["code"] == 400 and body["error"]["type"] == err_type, (raw[:80], body)
        assert body["error"]["param"] == param, (raw[:80], body)
        assert body["error"]["message"]
    deep = results[len(cases) - 2][1]["error"]
    assert deep["message"] == "There was an error parsing the body"  # like vLLM under Python 3.11, never a 500
    assert results[len(cases)][1]["error"]["message"] == (
        "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed")
    assert results[-1][0] == 200


def test_unknown_model_is_404_like_vllm(serve):
    async def scenario(session, engine):
        body = {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}
        async with session.post("/v1/chat/completions", json=body) as resp:
            return resp.status, await resp.json()

    status, body = serve(scenario, served_names=("a/b", "c"))
    assert status == 404
    assert body == {"error": {"message": "The model `gpt-4` does not exist. Valid aliases: a/b, c.",
                              "type": "NotFoundError", "param": "model", "code": 404}}


# --- models, health, metrics -------------------------------------------------------------------------


def test_models_health_and_metrics(serve):
    async def scenario(session, engine):
        async with session.get("/v1/models") as resp:
            models = (resp.status, await resp.json())
        async with session.get("/health") as resp:
            health = resp.status
        before = await metric_values(session)
        body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
        async with session.post("/v1/chat/completions", json=body) as resp:
            usage = (await resp.json())["usage"]
        async with session.get("/metrics") as resp:
            content_type = resp.headers["Content-Type"]
        return models, health, before, usage, await metric_values(session), content_type

    models, health, before, usage, after, content_type = serve(scenario, model=LLAMA, max_model_len=4096)
    assert models[0] == 200
    assert [m["id"] for m in models[1]["data"]] == [LLAMA]
    assert models[1]["data"][0]["max_model_len"] == 4096 and models[1]["object"] == "list"
    assert health == 200
    assert content_type.startswith("text/plain")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert metric(before, name) == 0.0
        assert f'{name}{{engine="0",model_name="{LLAMA}"}}' in after
    assert metric(after, "vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert metric(after, "vllm:generation_tokens_total") == usage["completion_tokens"] == 5
    assert after[f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{LLAMA}"}}'] == 1.0
    assert metric(after, "vllm:num_requests_running") == 0.0
    assert metric(after, "vllm:kv_cache_usage_perc") == 0.0
