"""Edge-case request bodies for the token counter, shared by the unit tests (tests/tokens) and the
parity test against a real vLLM server (tests/realvllm/test_token_parity.py).

Each case is ``(name, api, body)``: ``api`` is "chat", "completions", "responses" or "messages";
``body`` is the request body without "model" (the tests add it). ``vllm_counts.json`` beside this
file holds what a real vLLM 0.32.0 answered for every case and family (see that test for how it
was measured): ``tokenize`` = POST /tokenize's count (chat and completions shapes only) and
``request`` = the usage of a real request with max_tokens 1 (or the 400 message).
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llama3", "llama3_1", "qwen3")
COUNTS_FILE = Path(__file__).with_name("vllm_counts.json")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "description": "City name"},
                                      "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"]},
    },
}
# the same tool written in another key order with an extra field: vLLM re-serialises it
WEATHER_TOOL_REORDERED = {
    "function": {"parameters": WEATHER_TOOL["function"]["parameters"], "x-extra": 1,
                 "name": "get_weather"},
    "type": "function",
}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}


def _user(text):
    return {"role": "user", "content": text}


def _chat(messages, **kw):
    return {"messages": messages, **kw}


CASES: list[tuple[str, str, dict]] = [
    # -- content and roles ----------------------------------------------------------------------
    ("plain", "chat", _chat([_user("Hello there, how are you?")])),
    ("content_parts", "chat", _chat([{"role": "user", "content": [
        {"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]}])),
    ("content_parts_empty_and_null", "chat", _chat([{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": ""}, {"type": "text", "text": None},
        {"type": "text", "text": "b"}]}])),
    ("content_parts_extra_keys", "chat", _chat([{"role": "user", "content": [
        {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}])),
    ("system_parts", "chat", _chat([{"role": "system", "content": [
        {"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}]},
        _user("Why is the sky blue?")])),
    ("system_then_user", "chat", _chat([{"role": "system", "content": "  You are terse.  "},
                                        _user("Why is the sky blue?")])),
    ("multiple_system", "chat", _chat([{"role": "system", "content": "Rule one."},
                                       {"role": "system", "content": "Rule two."},
                                       _user("Go.")])),
    ("system_not_first", "chat", _chat([_user("Hi"), {"role": "system", "content": "Be brief."},
                                        _user("Explain DNS.")])),
    ("developer", "chat", _chat([{"role": "developer", "content": "Only JSON."}, _user("List 3 primes.")])),
    ("developer_and_system", "chat", _chat([{"role": "system", "content": "Sys."}, _user("Hi"),
                                            {"role": "developer", "content": "Dev."}, _user("Go")])),
    ("custom_role", "chat", _chat([{"role": "critic", "content": "Too long."}, _user("Shorter please.")])),
    ("ipython_role", "chat", _chat([_user("2+2?"), {"role": "ipython", "content": "4"}])),
    ("name_field", "chat", _chat([{"role": "user", "name": "alice", "content": "Hi, I am Alice."}])),
    ("empty_content", "chat", _chat([_user("")])),
    ("null_content", "chat", _chat([{"role": "user", "content": None}])),
    ("missing_content", "chat", _chat([{"role": "user"}])),
    ("whitespace_content", "chat", _chat([_user("  \n padded \n\n ")])),
    ("multilingual", "chat", _chat([_user("Grüße aus München! 東京の天気は？ Привет, мир. 🙂")])),
    # -- assistant turns ------------------------------------------------------------------------
    ("multi_turn", "chat", _chat([_user("Hi"), {"role": "assistant", "content": "Hello! How can I help?"},
                                  _user("Tell me a joke.")])),
    ("assistant_final", "chat", _chat([_user("Write a haiku."),
                                       {"role": "assistant", "content": "Autumn moonlight—"}])),
    ("assistant_final_continue", "chat", _chat(
        [_user("Write a haiku."), {"role": "assistant", "content": "Autumn moonlight—"}],
        add_generation_prompt=False, continue_final_message=True)),
    ("assistant_final_no_gen_prompt", "chat", _chat(
        [_user("Write a haiku."), {"role": "assistant", "content": "Autumn moonlight—"}],
        add_generation_prompt=False)),
    ("continue_without_disabling_gen_prompt", "chat", _chat(
        [_user("Write a haiku."), {"role": "assistant", "content": "Autumn"}],
        continue_final_message=True)),
    ("assistant_think_in_content", "chat", _chat([
        _user("2+2?"), {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        _user("and 3+3?")])),
    ("assistant_reasoning", "chat", _chat([
        _user("2+2?"), {"role": "assistant", "content": "4", "reasoning": "add them"}])),
    ("assistant_reasoning_content", "chat", _chat([
        _user("2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "add them"}])),
    ("assistant_parts_refusal", "chat", _chat([
        _user("Do X"), {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
        _user("Why?")])),
    # -- tools ------------------------------------------------------------------------------------
    ("tools_choice_none", "chat", _chat([_user("Weather in Paris?")], tools=[WEATHER_TOOL],
                                        tool_choice="none")),
    ("tools_reordered_extra", "chat", _chat([_user("Weather in Paris?")],
                                            tools=[WEATHER_TOOL_REORDERED], tool_choice="none")),
    ("tools_with_system", "chat", _chat([{"role": "system", "content": "Use tools."},
                                         _user("Weather in Paris?")], tools=[WEATHER_TOOL],
                                        tool_choice="none")),
    ("tools_default_choice", "chat", _chat([_user("Weather in Paris?")], tools=[WEATHER_TOOL])),
    ("tools_required", "chat", _chat([_user("Weather?")], tools=[WEATHER_TOOL], tool_choice="required")),
    ("tools_empty_list", "chat", _chat([_user("Hi")], tools=[])),
    ("tool_call_round_trip", "chat", _chat([
        _user("Weather in Paris?"), {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 18}"}],
        tools=[WEATHER_TOOL], tool_choice="none")),
    ("tool_call_no_tools", "chat", _chat([
        _user("Weather in Paris?"), {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        _user("Thanks. And tomorrow?")])),
    ("tool_call_bad_json_args", "chat", _chat([
        _user("Weather?"), {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "err"}])),
    ("tool_call_empty_args", "chat", _chat([
        _user("Weather?"), {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}])),
    ("tool_call_list_args", "chat", _chat([
        _user("Weather?"), {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[1, 2]"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}])),
    ("two_tool_calls", "chat", _chat([
        _user("Weather in Paris and Rome?"), {"role": "assistant", "content": None, "tool_calls": [
            CALL, {**CALL, "id": "call_2", "function": {"name": "get_weather",
                                                          "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25"}])),
    ("tool_result_parts", "chat", _chat([
        _user("Weather?"), {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": [
            {"type": "text", "text": "18 C"}, {"type": "text", "text": "sunny"}]}])),
    ("tool_call_missing_id", "chat", _chat([
        _user("Weather?"), {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}])),
    ("tools_no_user_message", "chat", _chat([{"role": "system", "content": "Use tools."}],
                                            tools=[WEATHER_TOOL], tool_choice="none")),
    ("tools_named_choice", "chat", _chat([_user("Weather?")], tools=[WEATHER_TOOL],
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})),
    ("tools_named_choice_unknown", "chat", _chat([_user("Weather?")], tools=[WEATHER_TOOL],
                                                 tool_choice={"type": "function", "function": {"name": "nope"}})),
    ("tool_choice_without_tools", "chat", _chat([_user("Weather?")], tool_choice="auto")),
    ("tools_unicode", "chat", _chat([_user("Météo à Zürich ?")], tool_choice="none", tools=[{
        "type": "function", "function": {"name": "météo", "description": "Donne la météo — 天气",
                                         "parameters": {"type": "object", "properties": {
                                             "ville": {"type": "string", "description": "Nom de la ville"}}}}}])),
    ("tool_call_unicode_args", "chat", _chat([
        _user("Météo ?"), {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "météo", "arguments": "{\"ville\": \"Zürich\"}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "5 °C"}])),
    ("tools_strict_and_defer", "chat", _chat([_user("x")], tool_choice="none", tools=[
        {"type": "function", "defer_loading": True,
         "function": {"name": "f", "strict": False, "parameters": {"type": "object"}}}])),
    ("tool_call_missing_type", "chat", _chat([
        _user("Weather?"), {"role": "assistant", "tool_calls": [
            {"id": "1", "function": {"name": "f", "arguments": "{}"}}]}])),
    ("tool_calls_empty_list", "chat", _chat([_user("x"), {"role": "assistant", "content": "y", "tool_calls": []},
                                             _user("z")])),
    ("name_not_string", "chat", _chat([{"role": "user", "content": "x", "name": 5}])),
    ("reasoning_and_reasoning_content", "chat", _chat([
        _user("x"), {"role": "assistant", "content": "y", "reasoning": "A", "reasoning_content": "B"}])),
    # -- special tokens typed in content -----------------------------------------------------------
    ("special_eot_in_content", "chat", _chat([_user("end here <|eot_id|> and <|end_of_text|>")])),
    ("special_im_end_in_content", "chat", _chat([_user("a <|im_end|> b <|im_start|>user c <think> d")])),
    ("special_python_tag_in_content", "chat", _chat([_user("call <|python_tag|> now <|eom_id|>")])),
    ("special_begin_of_text_in_content", "chat", _chat([_user("<|begin_of_text|>hi")])),
    # -- template kwargs ----------------------------------------------------------------------------
    ("reasoning_effort_none", "chat", _chat([_user("Quick answer: capital of Peru?")],
                                            reasoning_effort="none")),
    ("reasoning_effort_high", "chat", _chat([_user("Quick answer: capital of Peru?")],
                                            reasoning_effort="high")),
    ("enable_thinking_false", "chat", _chat([_user("Capital of Peru?")],
                                            chat_template_kwargs={"enable_thinking": False})),
    ("date_string_kwarg", "chat", _chat([_user("What day is it?")],
                                        chat_template_kwargs={"date_string": "01 Jan 2025"})),
    ("documents", "chat", _chat([_user("Summarise.")],
                                documents=[{"title": "A", "text": "Alpha beta."}])),
    ("add_special_tokens_chat", "chat", _chat([_user("Hi")], add_special_tokens=True)),
    ("continue_final_user", "chat", _chat([_user("Complete this: The cat")],
                                          add_generation_prompt=False, continue_final_message=True)),
    ("image_part", "chat", _chat([{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])),
    ("input_text_part_user", "chat", _chat([{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}])),
    ("input_text_part_custom", "chat", _chat([{"role": "critic", "content": [{"type": "input_text", "text": "hi"}]},
                                              _user("x")])),
    ("thinking_part_assistant", "chat", _chat([_user("x"), {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "y"}]}, _user("z")])),
    ("untrusted_template", "chat", _chat([_user("Hi")], chat_template="{{ messages }}")),
    ("empty_messages", "chat", _chat([])),
    ("string_parts_user", "chat", _chat([{"role": "user", "content": ["a", "b"]}])),
    ("string_parts_system", "chat", _chat([{"role": "system", "content": ["a", {"type": "text", "text": "b"}]},
                                           _user("x")])),
    ("string_parts_assistant", "chat", _chat([_user("x"), {"role": "assistant", "content": [
        "a", {"type": "text", "text": "b"}]}, _user("y")])),
    ("string_parts_tool", "chat", _chat([_user("x"), {"role": "tool", "tool_call_id": "c", "content": [
        "a", {"type": "text", "text": "b"}]}])),
    ("string_parts_custom", "chat", _chat([{"role": "critic", "content": ["a", {"type": "text", "text": "b"}]},
                                           _user("x")])),
    ("null_content_assistant", "chat", _chat([_user("x"), {"role": "assistant", "content": None},
                                              _user("y")])),
    ("null_content_system", "chat", _chat([{"role": "system", "content": None}, _user("x")])),
    ("unknown_part_type", "chat", _chat([{"role": "custom", "content": [{"type": "foo", "text": "a"}]}])),
    # -- completions --------------------------------------------------------------------------------
    ("completion_str", "completions", {"prompt": "Once upon a time"}),
    ("completion_special_tokens", "completions", {"prompt": "<|eot_id|> x <|im_end|> y <|begin_of_text|>"}),
    ("completion_no_special", "completions", {"prompt": "Once upon a time", "add_special_tokens": False}),
    ("completion_batch", "completions", {"prompt": ["One", "Two words", "Three short words"]}),
    ("completion_ids", "completions", {"prompt": [1, 2, 3, 4, 5]}),
    ("completion_ids_batch", "completions", {"prompt": [[1, 2, 3], [4, 5]]}),
    ("completion_empty", "completions", {"prompt": ""}),
    ("completion_empty_in_batch", "completions", {"prompt": ["a", ""]}),
    ("completion_ids_empty_inner", "completions", {"prompt": [[1, 2], []]}),
    ("completion_mixed", "completions", {"prompt": ["a", [1, 2]]}),
    ("completion_suffix", "completions", {"prompt": "def f(", "suffix": "return 1"}),
    # -- responses ----------------------------------------------------------------------------------
    ("responses_str", "responses", {"input": "Tell me a fact about owls."}),
    ("responses_instructions", "responses", {"input": "Tell me a fact about owls.",
                                             "instructions": "Answer in one sentence."}),
    ("responses_items", "responses", {"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                     {"type": "input_text", "text": "there"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hello!"}, {"type": "output_text", "text": "Ignored?"}]},
        {"role": "user", "content": "What's up?"}]}),
    ("responses_developer", "responses", {"input": [
        {"role": "developer", "content": "Be formal."}, {"role": "user", "content": "hey"}]}),
    ("responses_function_call", "responses", {"input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "18 C"}],
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather.",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": "none"}),
    ("responses_reasoning_item", "responses", {"input": [
        {"role": "user", "content": "2+2?"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "add"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "4"}]},
        {"role": "user", "content": "3+3?"}]}),
    ("responses_reasoning_effort_none", "responses", {"input": "Hi", "reasoning": {"effort": "none"}}),
    ("responses_tool_output_parts", "responses", {"input": [
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_text", "text": "18 C"}, {"type": "input_text", "text": "sunny"}]}]}),
    ("responses_partial_assistant", "responses", {"input": [
        {"role": "user", "content": "Name a color."},
        {"type": "message", "role": "assistant", "status": "incomplete",
         "content": [{"type": "output_text", "text": "The color is"}]}]}),
    ("responses_truncation_auto", "responses", {"input": "Hi", "truncation": "auto"}),
    # -- anthropic messages -------------------------------------------------------------------------
    ("messages_plain", "messages", {"max_tokens": 16, "messages": [_user("Hello, Claude")]}),
    ("messages_system_str", "messages", {"max_tokens": 16, "system": "You are a pirate.",
                                         "messages": [_user("Hello")]}),
    ("messages_system_blocks", "messages", {"max_tokens": 16, "system": [
        {"type": "text", "text": "You are a pirate."}, {"type": "text", "text": " Say arr."}],
        "messages": [_user("Hello")]}),
    ("messages_text_blocks", "messages", {"max_tokens": 16, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Part one."},
                                     {"type": "text", "text": "Part two."}]}]}),
    ("messages_tool_use", "messages", {"max_tokens": 16, "tool_choice": {"type": "none"}, "tools": [
        {"name": "get_weather", "description": "Weather.",
         "input_schema": {"properties": {"city": {"type": "string"}}, "required": ["city"]}}],
        "messages": [
            _user("Weather in Paris?"),
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "tu1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "tu1", "content": "18 C"},
                {"type": "text", "text": "Thanks!"}]}]}),
    ("messages_tool_result_blocks", "messages", {"max_tokens": 16, "messages": [
        _user("Weather?"),
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "tu1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "tu1",
             "content": [{"type": "text", "text": "-3 C"}, {"type": "text", "text": "snow"}]}]}]}),
    ("messages_tools_default_choice", "messages", {"max_tokens": 16, "tools": [
        {"name": "f", "input_schema": {"type": "object"}}], "messages": [_user("Hi")]}),
    ("messages_thinking_disabled", "messages", {"max_tokens": 16, "thinking": {"type": "disabled"},
                                                "messages": [_user("Hi")]}),
    ("messages_assistant_prefill", "messages", {"max_tokens": 16, "messages": [
        _user("Name a color."), {"role": "assistant", "content": "The color is"}]}),
    ("messages_inline_system", "messages", {"max_tokens": 16, "system": "Top.", "messages": [
        _user("Hi"), {"role": "system", "content": "Inline rule."}, _user("Go")]}),
    ("messages_assistant_tool_result", "messages", {"max_tokens": 16, "messages": [
        _user("x"), {"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "r"}]}]},
        _user("y")]}),
    ("messages_image", "messages", {"max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}),
    ("messages_thinking_blocks", "messages", {"max_tokens": 16, "messages": [
        _user("2+2?"), {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "add", "signature": "s"}, {"type": "text", "text": "4"}]},
        _user("3+3?")]}),
    ("messages_unicode_tool_use", "messages", {"max_tokens": 16, "tool_choice": {"type": "none"}, "tools": [
        {"name": "météo", "input_schema": {"type": "object", "properties": {"ville": {"type": "string"}}}}],
        "messages": [_user("Météo ?"), {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "météo", "input": {"ville": "Zürich"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "5 °C"}]}]}),
]

# Context-window cases: (name, api, body, expected) for a server with --max-model-len 8192,
# ``expected`` the usage (a list, one per prompt) or a substring of the 400's message; the same
# for every family (measured on vLLM 0.32.0).
WINDOW = 8192
_LONG = "The quick brown fox jumps over the lazy dog. " * 1000   # ~10K tokens in every family
_OVER = ("This model's maximum context length is 8192 tokens. However, your prompt contains at "
         "least 8193 input tokens, which exceeds this limit even without any output tokens.")
WINDOW_CASES: list[tuple[str, str, dict, object]] = [
    ("chat_over_window", "chat", _chat([_user(_LONG)], max_tokens=1), _OVER),
    ("chat_truncate_100", "chat", _chat([_user(_LONG)], max_tokens=1, truncate_prompt_tokens=100), [100]),
    ("chat_truncate_minus_1", "chat", _chat([_user(_LONG)], max_tokens=1, truncate_prompt_tokens=-1), [8191]),
    ("chat_truncate_over_window", "chat", _chat([_user("x")], max_tokens=1, truncate_prompt_tokens=9000),
     "truncate_prompt_tokens=9000 cannot be greater than max_model_len = 8192."),
    ("chat_max_tokens_over_window", "chat", _chat([_user("x")], max_tokens=9000),
     "max_tokens=9000 cannot be greater than max_model_len=8192. Please request fewer output tokens."),
    ("chat_max_completion_tokens_over_window", "chat", _chat([_user("x")], max_completion_tokens=9000),
     "max_completion_tokens=9000 cannot be greater than max_model_len=8192."),
    ("chat_too_many_chars", "chat", _chat([_user("a" * 1_300_000)], max_tokens=1),
     "characters (more than 1048576 characters, which is the upper bound for 8192 input tokens)"),
    ("completion_over_window", "completions", {"prompt": _LONG, "max_tokens": 1}, _OVER),
    ("completion_ids_over_window", "completions", {"prompt": [100] * 9000, "max_tokens": 1},
     "However, your prompt contains 9000 input tokens"),
    ("completion_ids_fill_window", "completions", {"prompt": [100] * 8192, "max_tokens": 1},
     "max_tokens must be at least 1, got 0."),
    ("completion_ids_window_less_1", "completions", {"prompt": [100] * 8191, "max_tokens": 1}, [8191]),
    ("completion_ids_truncate_50", "completions",
     {"prompt": [100] * 9000, "max_tokens": 1, "truncate_prompt_tokens": 50}, [50]),
    ("completion_text_truncate_minus_1", "completions",
     {"prompt": _LONG, "max_tokens": 1, "truncate_prompt_tokens": -1}, [8191]),
    ("responses_over_window", "responses", {"input": _LONG, "max_output_tokens": 1}, _OVER),
    ("responses_truncation_auto_long", "responses",
     {"input": _LONG, "max_output_tokens": 1, "truncation": "auto"}, [8191]),
    ("messages_over_window", "messages", {"max_tokens": 1, "messages": [_user(_LONG)]}, _OVER),
    ("messages_max_tokens_over_window", "messages", {"max_tokens": 9000, "messages": [_user("x")]},
     "max_completion_tokens=9000 cannot be greater than max_model_len=8192."),
]

CASE_NAMES = [c[0] for c in CASES]
assert len(set(CASE_NAMES)) == len(CASE_NAMES)


def load_counts() -> dict:
    """{case: {family: {"tokenize": int | {"error": str}, "request": [int] | {"error": str}}}}"""
    if not COUNTS_FILE.is_file():
        return {}
    return json.loads(COUNTS_FILE.read_text(encoding="utf-8"))
