"""The response reader and the misroute judge on real vLLM 0.32 bytes (shared/data/vllm), every
older wording, and bodies split at every byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.budget.response import (
    OUTPUT_CLAMPED, OUTPUT_OVER_WINDOW, PROMPT_FILLS_WINDOW, PROMPT_OVER_WINDOW, Misroute, ResponseFacts,
    ResponseReader, judge, parse_error, read_response,
)

VLLM = Path(__file__).resolve().parents[2].parent / "shared/data/vllm"
LB, EXACT = False, True


def _captured(folder: str, name: str) -> tuple[int, str, bytes]:
    base = VLLM / folder
    if not base.is_dir():
        pytest.skip(f"real vLLM answers not found at {base} (expected ../shared/data/vllm next to the project root)")
    if folder.startswith("errors"):
        meta = json.loads((base / f"{name}.meta.json").read_text())
        return meta["status"], meta["headers"].get("content-type", ""), (base / f"{name}.body").read_bytes()
    return _exchange(base / f"{name}.txt")


def _exchange(path: Path) -> tuple[int, str, bytes]:
    """(status, content type, body) of a whole recorded HTTP exchange."""
    head, _, body = path.read_bytes().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("content-type", ""), body


def _requested(name: str) -> int | None:
    """The max_tokens each captured case asked for (its name says: _max64, _mct64, _nomax)."""
    for part in name.split("_"):
        for prefix in ("max", "mct"):
            if part.startswith(prefix) and part[len(prefix):].isdigit():
                return int(part[len(prefix):])
    return None


# (folder, case, pool capacity) -> the misroute vLLM shows, or None
CASES = [
    ("errors_8k", "chat_chars1_2M", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "chat_prompt100k_max64", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "chat_prompt70000_max64", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "chat_prompt8000_max500", 8192, Misroute(OUTPUT_CLAMPED, 8010, EXACT)),
    ("errors_8k", "chat_prompt8182_max1", 8192, None),
    ("errors_8k", "chat_prompt8191_max1", 8192, None),
    ("errors_8k", "chat_prompt8191_nomax", 8192, Misroute(OUTPUT_CLAMPED, 8191, EXACT)),  # ran into the window
    ("errors_8k", "chat_prompt8192_max1", 8192, Misroute(PROMPT_FILLS_WINDOW, 8192, EXACT)),
    ("errors_8k", "chat_prompt8192_nomax", 8192, Misroute(PROMPT_FILLS_WINDOW, 8192, EXACT)),
    ("errors_8k", "chat_prompt9000_max64", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "chat_prompt9000_max64_stream", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "chat_prompt9000_mct64", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "chat_prompt9000_n2", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "chat_prompt9000_nomax", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "chat_short_max8190", 8192, Misroute(OUTPUT_CLAMPED, 15, EXACT)),
    ("errors_8k", "chat_short_max9000", 8192, Misroute(OUTPUT_OVER_WINDOW, None, LB)),
    ("errors_8k", "compl_batch_one_over", 8192, Misroute(PROMPT_OVER_WINDOW, 9000, EXACT)),
    ("errors_8k", "compl_chars1_2M", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "compl_ids8192_nomax", 8192, Misroute(PROMPT_FILLS_WINDOW, 8192, EXACT)),
    ("errors_8k", "compl_ids9000_max16", 8192, Misroute(PROMPT_OVER_WINDOW, 9000, EXACT)),
    ("errors_8k", "compl_str9000_max16", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_8k", "responses_9000", 8192, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("errors_64k", "chat_prompt70000_max64", 65536, Misroute(PROMPT_OVER_WINDOW, 65537, LB)),
    ("errors_64k", "chat_prompt9000_max64", 65536, None),
    ("errors_64k", "chat_prompt9000_max64_stream", 65536, None),
    ("errors_64k", "compl_ids9000_max16", 65536, None),
]


@pytest.mark.parametrize("folder, case, capacity, expected", CASES, ids=[f"{f}/{c}" for f, c, _, _ in CASES])
def test_every_captured_vllm_answer_is_judged_as_vllm_meant_it(folder, case, capacity, expected):
    status, ctype, body = _captured(folder, case)
    facts = read_response(status, ctype, body)
    prompts = 2 if "batch" in case else 1
    assert judge(facts, capacity, _requested(case), prompts) == expected


@pytest.mark.parametrize("case, prompt, completion, streamed", [
    ("chat_json", 11, 5, False), ("chat_json_mct", None, None, False), ("chat_n2", 11, 6, False),
    ("chat_parts", None, None, False), ("chat_stream_usage", 11, 3, True), ("chat_stream_n2_usage", 11, None, True),
    ("chat_stream_contusage", None, None, True), ("compl_ids", None, None, False),
    ("compl_ids_batch", 5, 4, False), ("compl_strs_batch", 6, 4, False), ("compl_stream_usage", None, None, True),
    ("responses_json", 11, None, False), ("responses_stream", 11, None, True),
])
def test_usage_of_every_captured_success(case, prompt, completion, streamed):
    status, ctype, body = _captured("responses_8k", case)
    facts = read_response(status, ctype, body)
    assert facts.status == 200 and facts.streamed == streamed and facts.complete
    assert facts.prompt_tokens is not None and facts.prompt_exact
    if prompt is not None:
        assert facts.prompt_tokens == prompt
    if completion is not None:
        assert facts.completion_tokens == completion
    assert judge(facts, 8192, 16) is None


def test_a_stream_without_usage_counts_its_chunks_and_shows_no_prompt():
    status, ctype, body = _captured("responses_8k", "chat_stream_nousage")
    facts = read_response(status, ctype, body)
    assert facts.prompt_tokens is None and facts.finish_length
    assert facts.completion_tokens == body.count(b'"delta":{"content"')  # one chunk per generated token
    assert judge(facts, 8192, facts.completion_tokens) is None
    assert judge(facts, 8192, facts.completion_tokens + 100) == Misroute(OUTPUT_CLAMPED, None, False)


@pytest.mark.parametrize("case", ["bad_json", "chat_other_model", "stream_opts_nostream"])
def test_other_errors_are_not_misroutes(case):
    status, ctype, body = _captured("responses_8k", case)
    facts = read_response(status, ctype, body)
    assert facts.error == "other" and judge(facts, 8192, 64) is None


def test_max_tokens_zero_asked_by_the_client_is_its_own_error():
    status, ctype, body = _captured("responses_8k", "max_tokens_zero")
    facts = read_response(status, ctype, body)
    assert facts.error == PROMPT_FILLS_WINDOW
    assert judge(facts, 8192, 0) is None


@pytest.mark.parametrize("message, kind, window, prompt, exact, output", [
    # 0.32+
    ("This model's maximum context length is 8192 tokens. However, your prompt contains at least 8193 input "
     "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input "
     "prompt. (parameter=input_tokens, value=8193)", PROMPT_OVER_WINDOW, 8192, 8193, False, None),
    ("This model's maximum context length is 8192 tokens. However, your prompt contains 9000 input tokens, which "
     "exceeds this limit even without any output tokens.", PROMPT_OVER_WINDOW, 8192, 9000, True, None),
    ("This model's maximum context length is 8192 tokens. However, your prompt contains 1200115 characters (more "
     "than 1048576 characters, which is the upper bound for 8192 input tokens).", PROMPT_OVER_WINDOW, 8192, 8193,
     False, None),
    ("max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", PROMPT_FILLS_WINDOW, None, None,
     False, None),
    ("max_tokens=9000 cannot be greater than max_model_len=8192. Please request fewer output tokens.",
     OUTPUT_OVER_WINDOW, 8192, None, False, 9000),
    # the same check where the request set max_completion_tokens (/v1/messages sets both)
    ("max_completion_tokens=9000 cannot be greater than max_model_len=8192. Please request fewer output "
     "tokens. (parameter=max_completion_tokens, value=9000)", OUTPUT_OVER_WINDOW, 8192, None, False, 9000),
    # ~0.20-0.31
    ("This model's maximum context length is 8192 tokens. However, you requested 64 output tokens and your prompt "
     "contains 10000 input tokens, for a total of 10064 tokens. Please reduce the length of the input prompt or "
     "the number of requested output tokens.", PROMPT_OVER_WINDOW, 8192, 10000, True, 64),
    ("This model's maximum context length is 8192 tokens. However, you requested 64 output tokens and your prompt "
     "contains at least 10000 input tokens, for a total of at least 10064 tokens.", PROMPT_OVER_WINDOW, 8192,
     10000, False, 64),
    ("This model's maximum context length is 8192 tokens. However, you requested 500 output tokens and your prompt "
     "contains 8000 input tokens, for a total of 8500 tokens.", OUTPUT_OVER_WINDOW, 8192, 8000, True, 500),
    # 0.11
    ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the "
     "messages, 1000 in the completion). Please reduce the length of the messages or completion.",
     OUTPUT_OVER_WINDOW, 4096, 4000, True, 1000),
    ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4500 in the "
     "messages, 500 in the completion).", PROMPT_OVER_WINDOW, 4096, 4500, True, 500),
    # between
    ("This model's maximum context length is 8192 tokens. However, your request has 9000 input tokens. Please "
     "reduce the length of the input messages.", PROMPT_OVER_WINDOW, 8192, 9000, True, None),
    ("'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum context length is 8192 "
     "tokens and your request has 300 input tokens (8000 > 8192 - 300).", OUTPUT_OVER_WINDOW, 8192, 300, True, 8000),
])
@pytest.mark.parametrize("envelope", ["nested", "flat", "anthropic", "text"])
def test_every_release_wording_in_every_envelope(message, kind, window, prompt, exact, output, envelope):
    body = {"nested": json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                            "code": 400}}),
            "flat": json.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400}),
            # /v1/messages: vLLM's error in Anthropic's envelope (anthropic/api_router.py)
            "anthropic": json.dumps({"type": "error", "error": {"type": "BadRequestError", "message": message}}),
            "text": message}[envelope].encode()
    facts = parse_error(400, body)
    assert (facts.error, facts.window, facts.prompt_tokens, facts.prompt_exact, facts.requested_output) == \
        (kind, window, prompt, exact, output)
    assert judge(facts, 8192, output or 64) is not None


def test_the_same_words_on_another_status_are_not_a_context_error():
    body = json.dumps({"error": {"message": "max_tokens must be at least 1, got 0."}}).encode()
    assert parse_error(500, body).error == "other"
    assert parse_error(400, b"\xff\xfe garbage").error == "other"


@pytest.mark.parametrize("folder, case", [("responses_8k", "chat_stream_usage"), ("responses_8k", "responses_stream"),
                                          ("responses_8k", "chat_stream_nousage"), ("errors_8k", "chat_short_max8190")])
def test_split_at_every_byte_reads_the_same(folder, case):
    status, ctype, body = _captured(folder, case)
    whole = read_response(status, ctype, body)
    step = max(1, len(body) // 400)  # every byte for small bodies; the 54 KB clamp in 400 cuts
    for cut in range(1, len(body), step):
        reader = ResponseReader(status, ctype)
        reader.feed(body[:cut])
        reader.feed(body[cut:])
        assert reader.finish() == whole, cut


def test_bounded_inputs_give_an_incomplete_answer_not_a_crash():
    from extproc.budget.response import MAX_JSON_BODY, MAX_SSE_LINE

    reader = ResponseReader(200, "application/json")
    for _ in range(MAX_JSON_BODY // (1 << 20) + 2):
        reader.feed(b" " * (1 << 20))
    assert reader.finish() == ResponseFacts(200, complete=False)
    reader = ResponseReader(200, "text/event-stream")
    reader.feed(b"data: " + b"x" * (MAX_SSE_LINE + 10))
    reader.feed(b'\n\ndata: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1}}\n\n')
    assert reader.finish().prompt_tokens == 7
    assert read_response(200, "application/json", b"[1, 2").complete is False
    assert read_response(200, "application/json", b'{"usage": {"prompt_tokens": "7"}}').prompt_tokens is None
    assert read_response(200, "application/json", b'{"usage": {"prompt_tokens": true}}').prompt_tokens is None


# -- Anthropic Messages (/v1/messages): real vLLM 0.32 exchanges recorded by
# tests/realvllm/test_messages.py (RECORD_VLLM_MESSAGES=1), an 8K Llama-3.1 server ------------------

MESSAGES = Path(__file__).resolve().parent / "vllm_messages"

# (case, pool capacity, max_tokens asked) -> the misroute vLLM shows, or None
MESSAGES_CASES = [
    ("messages_over", 8192, 64, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("messages_over_stream", 8192, 64, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("messages_chars", 8192, 8, Misroute(PROMPT_OVER_WINDOW, 8193, LB)),
    ("messages_clamped", 8192, 200, Misroute(OUTPUT_CLAMPED, 8100, EXACT)),
    ("messages_clamped_stream", 8192, 200, Misroute(OUTPUT_CLAMPED, 8100, EXACT)),
    ("messages_clamped", 65536, 200, None),
    ("messages_clamped_stream", 65536, 200, None),
    ("messages_fills", 8192, 1, Misroute(PROMPT_FILLS_WINDOW, 8192, EXACT)),
    ("messages_max_over_window", 8192, 9000, Misroute(OUTPUT_OVER_WINDOW, None, LB)),
    ("messages_json", 8192, 3, None),
    ("messages_stream", 8192, 3, None),
    ("messages_no_max", 8192, None, None),   # pydantic's 400 (max_tokens required), OpenAI's envelope
    ("messages_max_zero", 8192, 0, None),    # "max_tokens must be positive": the client's own 400
    ("messages_count_tokens", 8192, None, None),  # no generation, and no usage to read
]


def _messages(name: str) -> tuple[int, str, bytes]:
    return _exchange(MESSAGES / f"{name}.txt")


def _events(body: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in body.split(b"\n") if line.startswith(b"data:")]


@pytest.mark.parametrize("case, capacity, requested, expected", MESSAGES_CASES,
                         ids=[f"{c}@{cap}" for c, cap, _, _ in MESSAGES_CASES])
def test_every_recorded_messages_answer_is_judged_as_vllm_meant_it(case, capacity, requested, expected):
    facts = read_response(*_messages(case))
    assert judge(facts, capacity, requested) == expected


@pytest.mark.parametrize("case", ["messages_json", "messages_clamped"])
def test_messages_json_usage_and_stop_reason(case):
    status, ctype, body = _messages(case)
    doc = json.loads(body)
    facts = read_response(status, ctype, body)
    assert (facts.prompt_tokens, facts.prompt_exact, facts.completion_tokens, facts.streamed) == \
        (doc["usage"]["input_tokens"], True, doc["usage"]["output_tokens"], False)
    assert facts.finish_length == (doc["stop_reason"] == "max_tokens") is True


@pytest.mark.parametrize("case", ["messages_stream", "messages_clamped_stream"])
def test_messages_stream_events_message_start_and_message_delta(case):
    status, ctype, body = _messages(case)
    events = _events(body)
    start, = (e for e in events if e["type"] == "message_start")
    delta, = (e for e in events if e["type"] == "message_delta")
    facts = read_response(status, ctype, body)
    assert facts.streamed and facts.prompt_exact
    assert facts.prompt_tokens == start["message"]["usage"]["input_tokens"] == delta["usage"]["input_tokens"]
    assert facts.completion_tokens == delta["usage"]["output_tokens"]
    assert facts.finish_length == (delta["delta"]["stop_reason"] == "max_tokens") is True
    # the stream's prompt is known from its first event on (message_start), before any token
    reader = ResponseReader(status, ctype)
    reader.feed(body[: body.index(b"event: content_block_start")])
    assert reader.prompt_tokens == facts.prompt_tokens


def test_messages_cache_counts_are_part_of_the_prompt():
    """vLLM reports Anthropic's input_tokens without the cached prompt (prompt_tokens - cache_read
    - cache_creation, with --enable-prompt-tokens-details): the prompt is their sum."""
    status, ctype, body = _messages("messages_json")
    doc = json.loads(body)
    prompt = doc["usage"]["input_tokens"]
    doc["usage"] = {"input_tokens": prompt - 20, "output_tokens": 3, "cache_read_input_tokens": 16,
                    "cache_creation_input_tokens": 4}
    assert read_response(status, ctype, json.dumps(doc).encode()).prompt_tokens == prompt
    doc["usage"] = {"input_tokens": 0, "output_tokens": 3, "cache_read_input_tokens": prompt}
    assert read_response(status, ctype, json.dumps(doc).encode()).prompt_tokens == prompt  # all cached
    status, ctype, body = _messages("messages_stream")
    cached = body.replace(b'"usage":{"input_tokens":%d' % prompt,
                          b'"usage":{"cache_read_input_tokens":30,"input_tokens":%d' % (prompt - 30))
    assert cached != body and read_response(status, ctype, cached).prompt_tokens == prompt
    # the Responses API's input_tokens already include its cached ones (input_tokens_details)
    responses = {"usage": {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 1}}
    assert read_response(200, "application/json", json.dumps(responses).encode()).prompt_tokens == 11


@pytest.mark.parametrize("case", [c for c in sorted({c for c, *_ in MESSAGES_CASES})])
def test_messages_split_at_every_byte_reads_the_same(case):
    status, ctype, body = _messages(case)
    whole = read_response(status, ctype, body)
    step = max(1, len(body) // 1500)  # every byte but in the 12 KB clamped stream (every 7th)
    for cut in range(1, len(body), step):
        reader = ResponseReader(status, ctype)
        reader.feed(body[:cut])
        reader.feed(body[cut:])
        assert reader.finish() == whole, cut
