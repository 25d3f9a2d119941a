"""The token counter against real vLLM counts: the 150 dev request bodies (vLLM's usage for them),
the 1,292 dev texts (the real tokenizers' counts), and the edge cases of token_cases.py (what a
real vLLM 0.32.0 answered for each, recorded in vllm_counts.json by
tests/realvllm/test_token_parity.py with EXTPROC_RECORD_VLLM_COUNTS=1)."""

from __future__ import annotations

import pytest

from extproc.tokens import TemplateError, TokenCounter, counter_for
from token_cases import CASES, FAMILIES, WINDOW, WINDOW_CASES, load_counts

RECORDED = load_counts()


# -- dev data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fam", ["llama3", "qwen3"])
def test_dev_requests_exact(dev_requests, counters, fam):
    c = counters[fam]
    wrong = []
    for i, row in enumerate(dev_requests):
        got = c.count_request("chat", row["body"])
        if got != [row["prompt_tokens"][fam]]:
            wrong.append((i, got, row["prompt_tokens"][fam]))
    assert not wrong, f"{len(wrong)}/150 dev bodies differ from vLLM's prompt_tokens: {wrong[:5]}"


@pytest.mark.parametrize("fam,key", [("llama3", "llama3"), ("llama3_1", "llama3"), ("qwen3", "qwen3")])
def test_dev_texts_exact(dev_texts, counters, fam, key):
    c = counters[fam]
    wrong = [(r["id"], len(c.encode(r["text"])), r["tokens"][key]) for r in dev_texts
             if len(c.encode(r["text"])) != r["tokens"][key]]
    assert not wrong, f"{len(wrong)}/{len(dev_texts)} texts differ: {wrong[:5]}"


def test_count_chat_equals_count_request(dev_requests, counters):
    for row in dev_requests[:20]:
        for fam in ("llama3", "qwen3"):
            c = counters[fam]
            assert c.count_chat(row["body"]["messages"]) == row["prompt_tokens"][fam]


# -- edge cases, as a real vLLM answered them ----------------------------------------------------

def _ours(fn):
    try:
        return fn()
    except TemplateError as e:
        return {"error": str(e)}


def _same(want, got) -> bool:
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return False
        w = want["error"]
        if "validation error" in w:  # pydantic's report: only the fact of a 400 is compared
            return True
        if "is not a multimodal model" in w:
            return "is not a multimodal model" in got["error"]  # vLLM names the served model
        return got["error"] in w   # vLLM appends " (parameter=...)"
    return want == got


CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,api,body", CASES, ids=CASE_IDS)
def test_edge_case_matches_vllm(counters, name, api, body):
    if name not in RECORDED:
        pytest.skip(f"no recorded vLLM answer for {name} (run tests/realvllm/test_token_parity.py with "
                    "EXTPROC_RECORD_VLLM_COUNTS=1)")
    diffs = []
    for fam in FAMILIES:
        c = counters[fam]
        want = RECORDED[name].get(fam, {})
        for kind, value in want.items():
            if kind == "tokenize":
                got = _ours(lambda: c.count_tokenize(body))
            elif kind == "request":
                got = _ours(lambda: c.count_request(api, body))
            else:  # count_tokens: /v1/messages/count_tokens
                got = _ours(lambda: c.count_request(api, body)[0])
            if not _same(value, got):
                diffs.append(f"{fam} {kind}: vLLM {value!r} ours {got!r}")
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("name,api,body,expected", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_window_case_matches_vllm(counters, name, api, body, expected):
    for fam in FAMILIES:
        got = _ours(lambda: counters[fam].count_request(api, body, max_model_len=WINDOW))
        if isinstance(expected, str):
            assert isinstance(got, dict) and expected in got["error"], (fam, got)
        else:
            assert got == expected, fam


def test_recorded_counts_cover_every_case():
    if not RECORDED:
        pytest.skip("vllm_counts.json absent")
    missing = [n for n in CASE_IDS if n not in RECORDED]
    assert not missing, f"cases without a recorded vLLM answer: {missing}"


# -- what the templates do (the reasons the hand-written templates were wrong) ---------------------

def test_llama31_always_has_dated_system_block(counters):
    p = counters["llama3_1"].render_chat([{"role": "user", "content": "hi"}])
    assert p.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                        "Cutting Knowledge Date: December 2023\nToday Date: ")
    assert p.endswith("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    llama3 = counters["llama3"].count_chat([{"role": "user", "content": "hi"}])
    assert counters["llama3_1"].count_chat([{"role": "user", "content": "hi"}]) == llama3 + 25


def test_content_parts_joined_with_newline(counters):
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    for c in counters.values():
        assert c.render_chat([{"role": "user", "content": parts}]) == \
            c.render_chat([{"role": "user", "content": "one\ntwo"}])


def test_llama3_ignores_tools_llama31_and_qwen3_render_them(counters):
    msgs = [{"role": "user", "content": "weather?"}]
    tool = [{"type": "function", "function": {"name": "get_weather", "description": None,
                                              "parameters": {"type": "object"}}}]
    assert counters["llama3"].render_chat(msgs, tools=tool) == counters["llama3"].render_chat(msgs)
    assert '"name": "get_weather"' in counters["llama3_1"].render_chat(msgs, tools=tool)
    q = counters["qwen3"].render_chat(msgs, tools=tool)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather", "description": null' in q


def test_qwen3_think_block_on_final_assistant_turn(counters):
    q = counters["qwen3"]
    final = q.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                          add_generation_prompt=False)
    assert final.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nyo<|im_end|>\n")
    middle = q.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                            {"role": "user", "content": "again"}])
    assert "<|im_start|>assistant\nyo<|im_end|>" in middle


def test_special_token_typed_in_content_is_one_token(counters):
    c = counters["llama3"]
    base = c.count_chat([{"role": "user", "content": "a b"}])
    assert c.count_chat([{"role": "user", "content": "a <|eot_id|> b"}]) == base + 2  # " " + token
    assert c.encode("<|eot_id|>") == [128009]
    q = counters["qwen3"]
    assert q.encode("<|im_end|>") == [151645]
    assert len(q.encode("<think>")) == 1  # an added (non-special) token is atomic too
    # Llama-3.1's config names tokens its tokenizer.json does not have: transformers adds them
    assert len(counters["llama3_1"].encode("<|python_tag|>")) == 1
    assert len(counters["llama3"].encode("<|python_tag|>")) > 1


def test_completion_prompts_bos_only_where_the_post_processor_adds_one(counters):
    assert counters["llama3_1"].count_prompt("hello") == counters["llama3_1"].count_text("hello") + 1
    # the Llama-3 tokenizer.json here has a ByteLevel-only post-processor: no BOS
    assert counters["llama3"].count_prompt("hello") == counters["llama3"].count_text("hello")
    assert counters["qwen3"].count_prompt("hello") == counters["qwen3"].count_text("hello")
    assert counters["llama3_1"].count_request("completions", {"prompt": ["a", "b c"]}) == [2, 3]
    assert counters["qwen3"].count_request("completions", {"prompt": [[1, 2, 3], [4]]}) == [3, 1]


def test_tool_call_arguments_string_parsed_to_object(counters):
    q = counters["qwen3"]
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a":  1}'}}
    p = q.render_chat([{"role": "user", "content": "x"},
                       {"role": "assistant", "content": "", "tool_calls": [call]}])
    assert '{"name": "f", "arguments": {"a": 1}}' in p  # re-dumped by tojson, not the raw string


def test_request_options(counters):
    c = counters["qwen3"]
    body = {"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    with pytest.raises(TemplateError, match="--enable-auto-tool-choice"):
        c.count_request("chat", body)
    n = c.count_request("chat", body, enable_auto_tool_choice=True, tool_call_parser="hermes")
    assert n == c.count_request("chat", {**body, "tool_choice": "none"})
    long = {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 10}
    with pytest.raises(TemplateError, match="maximum context length is 1024 tokens"):
        c.count_request("chat", long, max_model_len=1024)
    with pytest.raises(TemplateError, match="max_tokens=9000 cannot be greater than max_model_len=8192"):
        c.count_request("chat", {**long, "max_tokens": 9000}, max_model_len=8192)
    with pytest.raises(ValueError, match="unknown api"):
        c.count_request("embeddings", long)


# -- API ----------------------------------------------------------------------------------------

def test_counter_for_memoised_and_unknown_family(counters):
    assert counter_for("qwen3") is counters["qwen3"]
    with pytest.raises(KeyError):
        counter_for("gpt2")
    c = counters["llama3_1"]
    assert (c.name, c.family, c.bos_token, c.eos_token) == \
        ("llama3_1", "llama3_1", "<|begin_of_text|>", "<|eot_id|>")
    assert counters["qwen3"].bos_token is None and "<|im_end|>" in counters["qwen3"].special_tokens
    assert c.encode("hi", add_special_tokens=True)[0] == 128000


def _copy_tokenizer(tmp_path, counters, config_extra=None, template_file=None):
    import json
    import shutil

    from extproc.tokens.files import family_dir

    src = family_dir("qwen3")
    shutil.copyfile(src / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(config_extra or {})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (tmp_path / "chat_template.jinja").write_text(template_file)
    return tmp_path


def test_from_dir_template_file_wins_and_named_templates(tmp_path, counters):
    d = _copy_tokenizer(tmp_path, counters, template_file="{{ messages[0].content }}!")
    c = TokenCounter.from_dir(d)
    assert c.render_chat([{"role": "user", "content": "hi"}]) == "hi!"
    (d / "chat_template.jinja").unlink()
    named = [{"name": "default", "template": "D{{ messages[0].content }}"},
             {"name": "tool_use", "template": "T{{ tools|length }}"}]
    d2 = _copy_tokenizer(tmp_path, counters, {"chat_template": named})
    c2 = TokenCounter.from_dir(d2)
    assert c2.render_chat([{"role": "user", "content": "hi"}]) == "Dhi"
    assert c2.render_chat([{"role": "user", "content": "hi"}], tools=[{"type": "function"}]) == "T1"


def _with_template(counters, tmp_path, src, **kw) -> TokenCounter:
    return counters["qwen3"].with_chat_template(src, **kw)


def test_raise_exception_and_template_errors(tmp_path, counters):
    c = _with_template(counters, tmp_path, "{{ raise_exception('no way') }}")
    with pytest.raises(TemplateError, match="no way"):
        c.count_chat([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="empty conversation"):
        counters["qwen3"].count_chat([])


def test_jinja_environment_like_transformers(tmp_path, counters):
    src = ("{% for m in messages %}{{ m | tojson }}{% if loop.first %}{% continue %}{% endif %}"
           "{% endfor %}\n  {% generation %}{{ '<b>' | tojson(indent=2) }}{% endgeneration %}"
           "|{{ strftime_now('%Y') | length }}|{{ bos_token }}")
    c = _with_template(counters, tmp_path, src)
    out = c.render_chat([{"role": "user", "content": "é<&>"}])
    # tojson keeps non-ASCII and HTML characters; trim_blocks/lstrip_blocks; loopcontrols
    assert out == '{"role": "user", "content": "é<&>"}"<b>"|4|'


def test_bounded_render(tmp_path, counters):
    forever = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
               "{% endfor %}{% endfor %}{% endfor %}")
    c = _with_template(counters, tmp_path, forever, render_timeout=0.3)
    import time
    t = time.monotonic()
    with pytest.raises(TemplateError, match="timed out"):
        c.count_chat([{"role": "user", "content": "x"}])
    assert time.monotonic() - t < 3
    # the thread is usable afterwards (no stray asynchronous exception)
    assert counters["qwen3"].count_chat([{"role": "user", "content": "x"}]) > 0
    time.sleep(0.4)
    assert counters["qwen3"].count_chat([{"role": "user", "content": "x"}]) > 0
    for src in ("{{ 'x' * 10**9 }}", "{{ 'x' | center(10**9) }}", "{{ 'x'.ljust(10**9) }}",
                "{{ 7 ** 99999999 }}",
                "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
                "{% set ns = namespace(s='xx') %}{% for i in range(64) %}"
                "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}"):
        c = _with_template(counters, tmp_path, src)
        with pytest.raises(TemplateError):
            c.count_chat([{"role": "user", "content": "x"}])


def test_linear_time_many_turns(counters):
    """4,000 turns well under a second, and 4x the turns about 4x the time (CPU time of this
    thread: the machine may be busy with other work)."""
    import time

    def turns(k):
        return [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": f"turn {i}: the quick brown fox <|eot_id|> jumps"} for i in range(k)]

    def cpu(fn):
        best = float("inf")
        for _ in range(3):
            t = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t)
        return best

    for fam in ("llama3", "llama3_1", "qwen3"):
        c = counters[fam]
        many, few = turns(4000), turns(1000)
        assert c.count_chat(many) > 4000 * 10
        t_many, t_few = cpu(lambda: c.count_chat(many)), cpu(lambda: c.count_chat(few))
        assert t_many < 0.8, f"{fam}: 4,000 turns took {t_many:.2f} s of CPU"
        assert t_many < 6 * t_few + 0.02, f"{fam}: not linear: {t_few:.3f} s -> {t_many:.3f} s"


def test_thread_safe(counters):
    from concurrent.futures import ThreadPoolExecutor
    c = counters["llama3_1"]
    bodies = [{"messages": [{"role": "user", "content": f"message number {i} " * (i % 7 + 1)}]}
              for i in range(64)]
    want = [c.count_request("chat", b) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: c.count_request("chat", b), bodies * 4))
    assert got == want * 4


def test_caller_body_not_mutated(counters):
    import copy
    body = {"messages": [{"role": "user", "content": "x"},
                         {"role": "assistant", "tool_calls": [
                             {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "developer", "content": "d"}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}
    before = copy.deepcopy(body)
    for c in counters.values():
        c.count_request("chat", body)
        c.count_request("responses", {"input": [{"role": "user", "content": "x"},
                                                {"type": "function_call", "call_id": "1", "name": "f",
                                                 "arguments": "{}"}]})
    assert body == before
