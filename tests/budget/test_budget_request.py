"""read_request / route on every OpenAI body shape: what is measured as text, JSON, schema, media."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from extproc.budget import BudgetRouter, read_request
from extproc.budget.features import FEATURE_NAMES, measure, utf8_len
from extproc.budget.request import MAX_OUTPUT_TOKENS

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"


def body(doc: dict, ensure_ascii: bool = False) -> bytes:
    return json.dumps(doc, ensure_ascii=ensure_ascii).encode("utf-8")


def one_prompt(doc: dict, path: str = CHAT):
    shape = read_request(body(doc), path)
    assert shape.error is None, shape.error
    assert len(shape.prompts) == 1
    return shape, shape.prompts[0]


def assert_features(actual, text: str) -> None:
    assert actual is not None
    np.testing.assert_array_equal(actual, measure(text))


def jdump(value) -> str:
    return orjson.dumps(value).decode()


@pytest.fixture(scope="module")
def router() -> BudgetRouter:
    return BudgetRouter()


# --- chat -------------------------------------------------------------------------------------

def test_chat_string_content():
    shape, p = one_prompt({"model": "meta-llama/Llama-3.1-8B-Instruct",
                           "messages": [{"role": "user", "content": "Hello, world!"}]})
    assert shape.api == "chat"
    assert shape.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert (p.messages, p.chat, p.media, p.exact_tokens) == (1, 1, 0, None)
    assert_features(p.text_features, "Hello, world!")
    assert p.json_features is None and p.schema_features is None
    assert p.text_bytes == 13
    assert shape.output_tokens is None and shape.output_field is None and shape.notes == []


def test_chat_all_roles_are_turns_and_their_text_is_joined():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Use metric units."},
            {"role": "user", "content": "How far is it?"},
            {"role": "assistant", "content": "Twelve kilometres."},
            {"role": "tool", "content": "distance=12km", "tool_call_id": "c1"}]
    _, p = one_prompt({"messages": msgs})
    assert p.messages == 5
    # the four roles every template has are in its per-turn tokens; any other is printed: its text counts
    joined = "\n".join(m["content"] for m in msgs[:4]) + "\ntool\ndistance=12km"
    assert_features(p.text_features, joined)
    assert p.text_bytes == len(joined)


@pytest.mark.parametrize("role", ["narrator", "Ärztin", "x" * 3000, "user "])
def test_custom_role_names_are_text_and_keep_the_size_bound(role):
    shape, p = one_prompt({"messages": [{"role": role, "content": "Once upon a time."}]})
    assert_features(p.text_features, role + "\nOnce upon a time.")
    assert p.text_bytes == utf8_len(role) + len("\nOnce upon a time.")
    assert not shape.template_extras  # the role's bytes are in text_bytes: the bound still holds


def test_name_fields_are_text_and_keep_the_size_bound():
    shape, p = one_prompt({"messages": [{"role": "user", "name": "alice_smith", "content": "Hi."}]})
    assert_features(p.text_features, "Hi.\nalice_smith")
    assert not shape.template_extras
    shape, _ = one_prompt({"messages": [{"role": "user", "content": "Hi.", "tool_call_id": "x"}]})
    assert shape.template_extras  # a field templates may print that is not gathered: no bound


def test_a_role_that_is_not_a_string_is_measured_and_not_bounded():
    shape, p = one_prompt({"messages": [{"role": {"r": "user"}, "content": "Hi."}]})
    assert shape.template_extras and p.json_features is not None


def test_special_token_strings_in_content_are_counted_apart_and_cut_from_the_text():
    from extproc.budget.priors import load_priors

    llama, qwen = load_priors()["llama3"].specials, load_priors()["qwen3"].specials
    text = "Start<|eot_id|> middle <|start_header_id|>user<|end_header_id|> end <think>x</think> <|im_end|>"
    shape = read_request(body({"messages": [{"role": "user", "content": text}]}), measured=False)
    p = shape.prompts[0].measure(llama)
    assert p.special == 3  # Llama-3's three; <think> and <|im_end|> are text to it
    assert_features(p.text_features, "Start\x00 middle \x00user\x00 end <think>x</think> <|im_end|>")
    assert p.text_bytes == len(text)  # the size bound still counts every byte
    q = read_request(body({"messages": [{"role": "user", "content": text}]}), measured=False).prompts[0]
    assert q.measure(qwen).special == 3  # Qwen3's: <think>, </think>, <|im_end|>
    plain = read_request(body({"messages": [{"role": "user", "content": "a < b and <|x|>"}]})).prompts[0]
    assert plain.special == 0


def test_content_parts_text_joined_like_string_content():
    parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
    _, p = one_prompt({"messages": [{"role": "user", "content": parts}]})
    _, q = one_prompt({"messages": [{"role": "user", "content": "First part.\nSecond part."}]})
    np.testing.assert_array_equal(p.text_features, q.text_features)
    assert p.text_bytes == q.text_bytes == len("First part.\nSecond part.")
    assert p.media == 0 and p.json_features is None


def test_media_parts_are_counted_not_measured(router):
    data_url = "data:image/png;base64," + "A" * 50_000
    parts = [{"type": "text", "text": "Describe these."},
             {"type": "image_url", "image_url": {"url": data_url}},
             {"type": "input_audio", "input_audio": {"data": "B" * 20_000, "format": "wav"}},
             {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    shape, p = one_prompt({"messages": [{"role": "user", "content": parts}]})
    assert p.media == 3
    assert_features(p.text_features, "Describe these.")
    assert p.text_bytes == len("Describe these.")  # base64 payloads are not text
    assert p.json_features is None
    # each media part adds media_tokens (1024) to the estimate and the budget
    d = router.route(body({"messages": [{"role": "user", "content": parts}]}))
    d0 = router.route(body({"messages": [{"role": "user", "content": [parts[0]]}]}))
    assert d.prompt_tokens - d0.prompt_tokens == 3 * router.settings.media_tokens
    assert d.budget_tokens - d0.budget_tokens == 3 * router.settings.media_tokens


def test_unknown_part_type_is_counted_as_json_not_dropped():
    part = {"type": "custom_widget", "payload": {"rows": [1, 2, 3], "title": "quarterly numbers"}}
    _, p = one_prompt({"messages": [{"role": "user", "content": [{"type": "text", "text": "See:"}, part]}]})
    assert_features(p.text_features, "See:")
    assert_features(p.json_features, jdump(part))
    assert p.text_bytes == len("See:") + len(jdump(part))
    assert p.media == 0


def test_message_name_and_reasoning_are_text():
    _, p = one_prompt({"messages": [{"role": "user", "name": "alice", "content": "hi"},
                                    {"role": "assistant", "content": "ok", "reasoning_content": "think"}]})
    assert_features(p.text_features, "hi\nalice\nok\nthink")


@pytest.mark.parametrize("arguments", ['{"city": "Paris", "days": 3}', {"city": "Paris", "days": 3}],
                         ids=["string-json", "dict"])
def test_assistant_tool_call_arguments_are_json(arguments):
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    _, p = one_prompt({"messages": msgs})
    assert p.messages == 3
    assert_features(p.text_features, "Weather?\nget_weather\ntool\nsunny")
    expected_json = arguments if isinstance(arguments, str) else jdump(arguments)
    assert_features(p.json_features, expected_json)
    assert p.text_bytes == len("Weather?\nget_weather\ntool\nsunny") + len(expected_json)


def test_legacy_function_call_is_json():
    msgs = [{"role": "assistant", "function_call": {"name": "lookup", "arguments": '{"q": "x"}'}}]
    _, p = one_prompt({"messages": msgs})
    assert_features(p.text_features, "lookup")
    assert_features(p.json_features, '{"q": "x"}')


TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL2 = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("key,tools", [("tools", [TOOL, TOOL2]),
                                       ("functions", [TOOL["function"], TOOL2["function"]])])
def test_tool_schemas_are_json(key, tools, router):
    doc = {"messages": [{"role": "user", "content": "hi"}], key: tools}
    _, p = one_prompt(doc)
    assert_features(p.text_features, "hi")
    assert_features(p.json_features, "\n".join(jdump(t) for t in tools))
    assert p.schema_features is None
    # tools make the prompt estimate larger than the same chat without them where the family's
    # template renders them (Qwen3's does; Llama-3's own template ignores tools altogether)
    qwen = {"model": "Qwen/Qwen3-8B"}
    bare = router.route(body({**qwen, "messages": [{"role": "user", "content": "hi"}]}))
    assert router.route(body({**qwen, **doc})).prompt_tokens > bare.prompt_tokens + 20
    llama = {"model": "meta-llama/Meta-Llama-3-8B-Instruct"}
    bare = router.route(body({**llama, "messages": [{"role": "user", "content": "hi"}]}))
    assert router.route(body({**llama, **doc})).prompt_tokens == bare.prompt_tokens


def test_response_format_json_schema_is_schema():
    schema = {"name": "answer", "schema": {"type": "object", "properties": {"answer": {"type": "string"}}}}
    _, p = one_prompt({"messages": [{"role": "user", "content": "hi"}],
                       "response_format": {"type": "json_schema", "json_schema": schema}})
    assert_features(p.schema_features, jdump(schema))
    assert p.json_features is None
    assert p.text_bytes == 2 + len(jdump(schema))


def test_response_format_text_is_not_a_schema():
    _, p = one_prompt({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}})
    assert p.schema_features is None


# --- completions ------------------------------------------------------------------------------

def test_completions_string_prompt():
    shape, p = one_prompt({"model": "m", "prompt": "Once upon a time"}, COMPLETIONS)
    assert shape.api == "completions"
    assert (p.chat, p.messages, p.exact_tokens) == (0, 0, None)
    assert_features(p.text_features, "Once upon a time")
    assert p.text_bytes == 16


def test_completions_list_of_strings_gives_one_prompt_each(router):
    prompts = ["short", "a much longer prompt " * 50, "medium prompt here"]
    shape = read_request(body({"prompt": prompts}), COMPLETIONS)
    assert shape.error is None
    assert len(shape.prompts) == 3
    for p, text in zip(shape.prompts, prompts):
        assert_features(p.text_features, text)
        assert p.text_bytes == len(text)
    # the batch needs room for its longest prompt, not the sum
    d_all = router.route(body({"prompt": prompts}), COMPLETIONS)
    d_long = router.route(body({"prompt": prompts[1]}), COMPLETIONS)
    assert d_all.prompt_tokens == d_long.prompt_tokens
    assert d_all.budget_tokens == d_long.budget_tokens


def test_completions_token_ids_are_exact(router):
    shape, p = one_prompt({"prompt": list(range(1000, 1777))}, COMPLETIONS)
    assert p.exact_tokens == 777
    assert p.text_features is None and p.text_bytes == 0
    d = router.route(body({"prompt": list(range(1000, 1777)), "max_tokens": 23}), COMPLETIONS)
    assert (d.prompt_tokens, d.budget_tokens, d.source, d.output_tokens) == (777, 800, "exact", 23)


def test_completions_list_of_token_id_lists(router):
    shape = read_request(body({"prompt": [[1, 2, 3], list(range(500)), [7]]}), COMPLETIONS)
    assert shape.error is None
    assert [p.exact_tokens for p in shape.prompts] == [3, 500, 1]
    d = router.route(body({"prompt": [[1, 2, 3], list(range(500)), [7]], "max_tokens": 10}), COMPLETIONS)
    assert (d.prompt_tokens, d.budget_tokens, d.source) == (500, 510, "exact")


def test_completions_suffix_is_measured():
    _, p = one_prompt({"prompt": "def f(", "suffix": "    return x\n"}, COMPLETIONS)
    assert_features(p.text_features, "def f(\n    return x\n")


# --- responses --------------------------------------------------------------------------------

def test_responses_input_string_and_instructions():
    shape, p = one_prompt({"model": "m", "input": "Tell me a joke.", "instructions": "You are funny."}, RESPONSES)
    assert shape.api == "responses"
    assert p.messages == 2 and p.chat == 1
    assert_features(p.text_features, "You are funny.\nTell me a joke.")


def test_responses_input_item_list():
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Look at this"},
                                          {"type": "input_image", "image_url": "https://e.com/a.png"}]},
             {"type": "function_call", "name": "search", "arguments": '{"q": "cats"}', "call_id": "c1"},
             {"type": "function_call_output", "call_id": "c1", "output": "3 results"},
             {"role": "assistant", "content": "Done."}]
    _, p = one_prompt({"input": items, "tools": [{"type": "function", "name": "search"}]}, RESPONSES)
    assert p.messages == 4
    assert p.media == 1
    assert_features(p.text_features, "Look at this\nsearch\n3 results\nDone.")
    assert_features(p.json_features, '{"q": "cats"}\n' + jdump({"type": "function", "name": "search"}))


def test_responses_text_format_json_schema_is_schema():
    fmt = {"type": "json_schema", "name": "x", "schema": {"type": "object"}}
    _, p = one_prompt({"input": "hi", "text": {"format": fmt}}, RESPONSES)
    assert_features(p.schema_features, jdump(fmt))


# --- output reserve ---------------------------------------------------------------------------

BASE = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("fields,expected,field", [
    ({"max_completion_tokens": 11, "max_tokens": 22, "max_output_tokens": 33}, 11, "max_completion_tokens"),
    ({"max_tokens": 22, "max_output_tokens": 33}, 22, "max_tokens"),
    ({"max_output_tokens": 33}, 33, "max_output_tokens"),
    ({"max_completion_tokens": None, "max_tokens": 22}, 22, "max_tokens"),
    ({}, None, None),
])
def test_output_reserve_precedence(fields, expected, field, router):
    shape = read_request(body({**BASE, **fields}))
    assert (shape.output_tokens, shape.output_field) == (expected, field)
    d = router.route(body({**BASE, **fields}))
    out = expected if expected is not None else router.settings.default_output_tokens
    assert d.output_tokens == out
    assert d.budget_tokens - out == router.route(body(BASE)).budget_tokens - 1024
    assert d.detail.startswith(field or "default output reserve")


def test_n_does_not_change_the_budget(router):
    one = router.route(body({**BASE, "max_tokens": 500}))
    many = router.route(body({**BASE, "max_tokens": 500, "n": 8, "best_of": 8}))
    assert (many.budget_tokens, many.prompt_tokens, many.pool) == (one.budget_tokens, one.prompt_tokens, one.pool)
    assert many.output_tokens == 500 and many.fits == one.fits


@pytest.mark.parametrize("bad", [-1, -5, "100", True, False, 1.5, [10], {"n": 1}])
def test_invalid_max_tokens_is_noted_and_default_used(bad, router):
    shape = read_request(body({**BASE, "max_tokens": bad}))
    assert shape.error is None
    assert shape.output_tokens is None
    assert shape.notes == ["invalid max_tokens"]
    d = router.route(body({**BASE, "max_tokens": bad}))
    assert d.reason == "fits"
    assert d.output_tokens == router.settings.default_output_tokens == 1024
    assert d.detail == "default output reserve; invalid max_tokens"


def test_invalid_field_falls_through_to_the_next_one():
    shape = read_request(body({**BASE, "max_completion_tokens": -3, "max_tokens": 40}))
    assert (shape.output_tokens, shape.output_field, shape.notes) == (40, "max_tokens", ["invalid max_completion_tokens"])


def test_integral_float_max_tokens_is_accepted_and_huge_is_clamped():
    assert read_request(body({**BASE, "max_tokens": 256.0})).output_tokens == 256
    assert read_request(body({**BASE, "max_tokens": 10 ** 30})).output_tokens == MAX_OUTPUT_TOKENS


# --- decoded text, not escape bytes ---------------------------------------------------------------

CJK = "中文分词与大型语言模型的推理服务：上下文长度、批处理以及显存管理。" * 20


@pytest.mark.parametrize("path,doc", [
    (CHAT, {"messages": [{"role": "user", "content": CJK}], "tools": [{"description": CJK}]}),
    (COMPLETIONS, {"prompt": CJK}),
    (RESPONSES, {"input": CJK}),
])
def test_ascii_escaped_cjk_measures_like_utf8(path, doc, router):
    escaped, raw = body(doc, ensure_ascii=True), body(doc, ensure_ascii=False)
    assert len(escaped) > 1.8 * len(raw)  # \uXXXX is 6 bytes against UTF-8's 3
    a, b = read_request(escaped, path), read_request(raw, path)
    assert a.prompts[0].text_bytes == b.prompts[0].text_bytes
    assert a.prompts[0].text_bytes >= utf8_len(CJK) == 3 * len(CJK)
    for kind in ("text_features", "json_features", "schema_features"):
        fa, fb = getattr(a.prompts[0], kind), getattr(b.prompts[0], kind)
        assert (fa is None) == (fb is None)
        if fa is not None:
            np.testing.assert_array_equal(fa, fb)
    cjk = FEATURE_NAMES.index("n:h")
    assert a.prompts[0].text_features[cjk] >= len(CJK) - 20 * 2  # ideographs (not the full-width ，。 forms)
    da, db = router.route(escaped, path), router.route(raw, path)
    assert (da.prompt_tokens, da.budget_tokens, da.pool) == (db.prompt_tokens, db.budget_tokens, db.pool)


def test_api_inferred_from_body_when_path_unknown():
    assert read_request(body({"messages": [{"role": "user", "content": "x"}]}), "/other").api == "chat"
    assert read_request(body({"prompt": "x"}), "").api == "completions"
    assert read_request(body({"input": "x"}), "/x").api == "responses"
    s = read_request(body({"foo": 1}), "/x")
    assert (s.api, s.error) == ("unknown", "not an OpenAI chat, completions or responses body")


def test_path_query_and_trailing_slash():
    assert read_request(body({"prompt": "x"}), "/v1/completions/?a=1").api == "completions"
    assert read_request(body({"messages": []}), "/v1/chat/completions?x=/v1/completions").api == "chat"


def test_model_name_truncated():
    assert read_request(body({**BASE, "model": "m" * 1000})).model == "m" * 200


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
