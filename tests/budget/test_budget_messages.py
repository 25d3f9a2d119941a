"""read_request / route on Anthropic Messages bodies (``/v1/messages``): read as vLLM 0.32 turns
them into a chat, measured like that chat, and the size bound still a true upper bound (checked
against the exact counter, which converts them as vLLM does)."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from extproc.budget import BudgetRouter, read_request
from extproc.budget.features import measure
from extproc.tokens.counter import anthropic_to_messages

MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def body(doc: dict) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()


def one(doc: dict):
    shape = read_request(body({"model": MODEL, "max_tokens": 64, **doc}), MESSAGES)
    assert shape.error is None, shape.error
    assert shape.api == "messages" and len(shape.prompts) == 1
    return shape, shape.prompts[0]


def same_features(actual, text: str) -> None:
    assert actual is not None
    np.testing.assert_array_equal(actual, measure(text))


@pytest.fixture(scope="module")
def router() -> BudgetRouter:
    return BudgetRouter()


def test_the_path_names_the_api_and_count_tokens_is_no_generation(router):
    doc = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert read_request(body(doc), "/v1/messages").api == "messages"
    assert read_request(body(doc), "/anthropic/v1/messages/?beta=true").api == "messages"
    # count_tokens renders and counts, nothing runs in a KV cache: no budget, the largest pool
    d = router.route(body(doc), "/v1/messages/count_tokens")
    assert (d.api, d.pool, d.reason) == ("count_tokens", "long", "unreadable")
    assert "not a generation" in d.detail


@pytest.mark.parametrize("system, text", [
    ("Be brief.", "Be brief."),
    ([{"type": "text", "text": "Be brief."}], "Be brief."),
    ([{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}], "Be \nbrief."),
    # Claude Code's attribution block: vLLM drops it
    ([{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=9f2"},
      {"type": "text", "text": "Be brief."}], "Be brief."),
])
def test_system_is_one_turn_of_text(system, text):
    shape, p = one({"system": system, "messages": [{"role": "user", "content": "Hello."}]})
    assert (p.messages, p.chat, p.media, p.tools) == (2, 1, 0, 0)
    same_features(p.text_features, text + "\nHello.")
    assert p.json_features is None and not shape.template_extras


def test_text_blocks_measure_like_chat_content_parts():
    blocks = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]
    _, p = one({"messages": [{"role": "user", "content": blocks}]})
    chat = read_request(body({"messages": [{"role": "user", "content": "First part.\nSecond part."}]}), CHAT)
    np.testing.assert_array_equal(p.text_features, chat.prompts[0].text_features)
    assert p.text_bytes == chat.prompts[0].text_bytes and p.messages == 1


def test_images_are_media_and_lift_the_size_bound(router):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 50_000}}
    doc = {"model": MODEL, "max_tokens": 16,
           "messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]}
    _, p = one(doc)
    assert p.media == 1 and p.text_bytes == len("What is it?")  # the base64 is not text
    d = router.route(body(doc), MESSAGES, by_size=True)
    assert d.source != "bound"
    assert d.prompt_tokens >= router.settings.media_tokens


def test_tool_use_is_its_name_and_input_json_and_lifts_the_bound(router):
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
    doc = {"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, call]}]}
    shape, p = one(doc)
    same_features(p.text_features, "Weather?\nChecking.\nget_weather")
    same_features(p.json_features, '{"city":"Oslo"}')
    assert shape.template_extras and p.messages == 2


@pytest.mark.parametrize("content, text", [
    ("12 degrees", "12 degrees"),
    ([{"type": "text", "text": "12"}, {"type": "text", "text": "degrees"}], "12\ndegrees"),
])
def test_a_users_tool_result_is_a_tool_turn(content, text):
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": content}
    shape, p = one({"messages": [{"role": "user", "content": [result]}]})
    assert p.messages == 1  # the user message made only of tool results is no turn: its tool turn is
    same_features(p.text_features, text)
    assert shape.template_extras  # the tool turn carries its id, which some templates print
    _, p = one({"messages": [{"role": "user", "content": [result, {"type": "text", "text": "Thanks."}]}]})
    assert p.messages == 2


def test_images_in_a_tool_result_are_media_in_a_user_turn_of_their_own():
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    result = {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "a chart"}, image, image]}
    _, p = one({"messages": [{"role": "user", "content": [result]}]})
    assert (p.media, p.messages) == (2, 2)
    same_features(p.text_features, "a chart")


def test_an_assistants_tool_result_is_text_after_tool_result():
    result = {"type": "tool_result", "tool_use_id": "t", "content": "42"}
    _, p = one({"messages": [{"role": "user", "content": "Ask."}, {"role": "assistant", "content": [result]}]})
    same_features(p.text_features, "Ask.\nTool result: \n42")
    listed = {**result, "content": [{"type": "text", "text": "42"}]}
    _, p = one({"messages": [{"role": "assistant", "content": [listed]}]})
    assert p.json_features is not None  # Python's str() of the blocks: not their text bytes, so measured as JSON


def test_tools_are_measured_in_the_chat_shape_vllm_renders():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tool = {"name": "get_weather", "description": "Current weather", "input_schema": schema}
    _, p = one({"messages": [{"role": "user", "content": "hi"}], "tools": [tool, {"name": "noop", "input_schema": {}}]})
    chat_tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                    "parameters": schema}},
                  {"type": "function", "function": {"name": "noop", "parameters": {}}}]
    chat = read_request(body({"messages": [{"role": "user", "content": "hi"}], "tools": chat_tools}), CHAT)
    np.testing.assert_array_equal(p.json_features, chat.prompts[0].json_features)
    assert p.tools == 2


def test_thinking_blocks_are_text_and_redacted_ones_nothing():
    blocks = [{"type": "thinking", "thinking": "Let me see.", "signature": "abc"},
              {"type": "redacted_thinking", "data": "Z" * 500}, {"type": "text", "text": "Yes."}]
    _, p = one({"messages": [{"role": "assistant", "content": blocks}]})
    same_features(p.text_features, "Let me see.\nYes.")


def test_output_config_schema_is_a_schema():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    _, p = one({"messages": [{"role": "user", "content": "hi"}],
                "output_config": {"format": {"type": "json_schema", "schema": schema}}})
    same_features(p.schema_features, orjson.dumps(schema).decode())


def test_max_tokens_is_the_reserve_and_other_fields_change_nothing(router):
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}
    plain = router.route(body(base), MESSAGES)
    assert (plain.output_tokens, plain.requested_output, plain.detail) == (300, 300, "max_tokens")
    extra = {**base, "stop_sequences": ["\n\nHuman:"], "stream": True, "temperature": 0.2, "top_k": 5,
             "metadata": {"user_id": "u1"}, "thinking": {"type": "enabled", "budget_tokens": 1024},
             "tool_choice": {"type": "auto"}, "max_completion_tokens": 9000, "max_output_tokens": 9000}
    d = router.route(body(extra), MESSAGES)
    assert (d.budget_tokens, d.prompt_tokens, d.output_tokens, d.pool) == \
        (plain.budget_tokens, plain.prompt_tokens, 300, plain.pool)


def test_missing_max_tokens_gets_the_default_reserve_and_a_note(router):
    # vLLM requires it and answers 400 on any pool; the prompt is still understood
    doc = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    d = router.route(body(doc), MESSAGES)
    assert (d.reason, d.output_tokens, d.requested_output) == ("fits", router.settings.default_output_tokens, None)
    assert d.detail == "default output reserve; max_tokens missing (required by /v1/messages)"
    shape = read_request(body({**doc, "max_tokens": "100"}), MESSAGES)
    assert shape.notes == ["invalid max_tokens"] and shape.output_tokens is None


def test_estimates_equal_the_chat_vllm_converts_them_into(router):
    """A text-only Messages body and the chat completion vLLM turns it into (the exact counter's
    conversion) get the same estimate: one calibration serves both APIs."""
    doc = {"model": MODEL, "max_tokens": 128, "system": [{"type": "text", "text": "You are terse."}],
           "messages": [{"role": "user", "content": "Name three rivers in Europe."},
                        {"role": "assistant", "content": [{"type": "text", "text": "Danube, Rhine, Volga."}]},
                        {"role": "user", "content": [{"type": "text", "text": "And one in Asia?"}]}]}
    chat = {"model": MODEL, "max_tokens": 128,
            "messages": anthropic_to_messages(doc["system"], doc["messages"], merge_inline_system=False)}
    m, c = router.route(body(doc), MESSAGES), router.route(body(chat), CHAT)
    assert (m.prompt_tokens, m.budget_tokens, m.source) == (c.prompt_tokens, c.budget_tokens, c.source)
    m, c = router.route(body(doc), MESSAGES, by_size=True), router.route(body(chat), CHAT, by_size=True)
    assert (m.prompt_tokens, m.source) == (c.prompt_tokens, "bound")


@pytest.mark.parametrize("family", ["llama3", "llama3_1", "qwen3"])
def test_the_size_bound_is_above_the_exact_count(router, family, dev_requests):
    """The bound (bytes + per-turn tokens + the template allowance) is never below what vLLM
    counts for a Messages body, on every real dev body made Anthropic and each family."""
    from extproc.tokens import counter_for

    counter = counter_for(family)
    checked = 0
    for row in dev_requests[:60]:
        chat = row["body"]["messages"]
        system = "".join(m["content"] for m in chat if m["role"] == "system")
        turns = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                 for m in chat if m["role"] != "system"]
        doc = {"model": MODEL, "max_tokens": 16, "messages": turns, **({"system": system} if system else {})}
        shape = read_request(body(doc), MESSAGES, measured=False)
        bound = router._size_bound(shape.prompts)
        assert bound is not None and not shape.template_extras
        exact = counter.count_request("messages", doc)[0]
        assert exact <= bound, (exact, bound)
        # and with room to spare: it holds with 64 of the template allowance's 1,024 tokens
        assert exact <= bound - router.settings.template_allowance_tokens + 64, (exact, bound)
        checked += 1
    assert checked == 60


@pytest.mark.parametrize("doc, error", [
    ({"messages": "hi"}, "messages missing or not a list"),
    ({"system": "x"}, "messages missing or not a list"),
    ({"messages": ["hi"]}, "a message is not an object"),
])
def test_bodies_that_cannot_be_read_go_to_the_largest_pool(router, doc, error):
    d = router.route(body({"model": MODEL, "max_tokens": 8, **doc}), MESSAGES)
    assert (d.pool, d.reason, d.detail) == ("long", "unreadable", error)


@pytest.mark.parametrize("odd", [
    {"role": "user", "content": [1, None, ["x"], {"type": 5}, {"type": "tool_use", "input": "not an object"}]},
    {"role": "narrator", "content": "Once."},
    {"role": ["user"], "content": {"type": "text", "text": "hi"}},
    {"role": "user", "content": [{"type": "tool_result", "content": [{"type": "image"}, 7, {"type": "x"}]}]},
    {"role": "system", "content": [{"type": "tool_addition", "tool": {"type": "tool_definition", "definition": {}}}]},
    {"role": "assistant", "content": [{"type": "text", "text": None}, {"type": "thinking", "thinking": {"a": 1}}]},
])
def test_odd_blocks_are_measured_never_crash_and_never_bound(router, odd):
    doc = {"model": MODEL, "max_tokens": 8, "system": [{"type": "image"}, 3], "messages": [odd]}
    shape = read_request(body(doc), MESSAGES)
    assert shape.error is None
    d = router.route(body(doc), MESSAGES, by_size=True)
    assert d.reason == "fits" and d.source != "bound"


def test_deep_nesting_is_unreadable_not_a_crash(router):
    deep = "[" * 100_000 + "]" * 100_000
    raw = ('{"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_use", '
           '"input": {"a": ' + deep + '}}]}]}').encode()
    d = router.route(raw, MESSAGES)
    assert (d.pool, d.reason) == ("long", "unreadable")


def test_hypothesis_arbitrary_messages_bodies():
    """Any JSON in the Messages fields and blocks routes: a decision whose invariants hold, and
    learning from it never raises."""
    from test_budget_robustness import check

    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    router = BudgetRouter()  # its own: this test also observes
    scalars = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.text(max_size=30)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
    kinds = st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking",
                             "tool_reference", "tool_addition", "document", None, 3])
    block = st.fixed_dictionaries({"type": kinds}, optional={
        "text": values, "thinking": values, "name": values, "input": values, "content": values | st.lists(
            st.fixed_dictionaries({"type": kinds}, optional={"text": values}), max_size=3),
        "source": values, "tool_use_id": values})
    content = values | st.lists(block | values, max_size=4)
    message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system"]) | values,
                                                  "content": content})
    doc = st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}, optional={
        "system": content, "tools": values | st.lists(values, max_size=3), "max_tokens": values,
        "output_config": values, "model": values, "chat_template_kwargs": values})

    @hypothesis.settings(max_examples=200, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(doc=doc)
    def prop(doc):
        raw = json.dumps(doc).encode()
        d, obs = router.route_learnable(raw, MESSAGES)
        check(router, d)
        assert d.reason in ("fits", "too_large")  # a list of objects is always read
        check(router, router.route(raw, MESSAGES, by_size=True))
        router.observe(obs, d.prompt_tokens + 5)

    prop()
