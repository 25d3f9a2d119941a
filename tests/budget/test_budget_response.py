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
    raw = (base / f"{name}.txt").read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
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
@pytest.mark.parametrize("envelope", ["nested", "flat", "text"])
def test_every_release_wording_in_every_envelope(message, kind, window, prompt, exact, output, envelope):
    body = {"nested": json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                            "code": 400}}),
            "flat": json.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400}),
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
