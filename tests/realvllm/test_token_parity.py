"""extproc.tokens against a real vLLM 0.32.0: the counter's numbers are the server's numbers.

Three servers (llama3, llama3_1, qwen3; tiny random models with the real tokenizer files) answer:
* POST /tokenize for the 150 dev bodies' messages (``count``) and for their text as a
  /v1/completions-style prompt — against ``TokenCounter.count_tokenize``, ``count_request`` and
  ``count_prompt``;
* every edge case of tests/tokens/token_cases.py: /tokenize where it takes the shape (chat messages,
  a string prompt), and a real request with max_tokens 1 for every API (chat and completions usage;
  /v1/responses and /v1/messages ``usage.input_tokens``; /v1/messages/count_tokens) — a 400 must be
  a 400 for the counter too (a TemplateError), with vLLM's wording where vLLM words it itself.

``EXTPROC_RECORD_VLLM_COUNTS=1`` writes what the servers answered for the edge cases to
tests/tokens/vllm_counts.json, which the offline unit tests (tests/tokens) compare with.

What vLLM does that is easy to get wrong is written down in extproc/tokens/counter.py, next to
the code that does the same.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tokens"))
from token_cases import CASES, COUNTS_FILE, FAMILIES, WINDOW, WINDOW_CASES, load_counts  # noqa: E402

from extproc.tokens import TemplateError, counter_for  # noqa: E402

DEV_REQUESTS = HERE.parents[2] / "shared" / "data" / "requests" / "dev_requests.jsonl"
RECORD = os.environ.get("EXTPROC_RECORD_VLLM_COUNTS") == "1"
# "<|python_tag|>" is id 128258 for Llama-3.1 (its config names a token its tokenizer.json lacks, so
# transformers appends it): past the tiny model's 128,256-row embedding — /tokenize only
SKIP_REQUEST = {("special_python_tag_in_content", "llama3_1")}
TIER_SPECS = [(f, WINDOW) for f in FAMILIES]  # the servers it uses (conftest starts them together)
TOKENIZE_CHAT_KEYS = {"messages", "add_generation_prompt", "continue_final_message",
                      "add_special_tokens", "chat_template", "chat_template_kwargs", "tools"}


@pytest.fixture(scope="module")
def servers(real_vllm):
    srvs = real_vllm.servers([(f, WINDOW) for f in FAMILIES])
    return dict(zip(FAMILIES, srvs))


@pytest.fixture(scope="module")
def dev_bodies():
    if not DEV_REQUESTS.is_file():
        pytest.skip(f"shared data not found at {DEV_REQUESTS} (expected ../shared/data next to the "
                    "project root)")
    rows = [json.loads(line) for line in DEV_REQUESTS.read_text(encoding="utf-8").splitlines() if line]
    assert len(rows) == 150
    return rows


def post(srv, path: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps({**body, "model": srv.model}).encode(),
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def _error(body: dict) -> dict:
    err = body.get("error")
    if isinstance(err, dict):
        return {"error": err.get("message", "")}
    return {"error": body.get("message") or json.dumps(body)[:500]}


def measure(srv, name: str, api: str, body: dict) -> dict:
    """What the real server answers for one edge case (the shape of vllm_counts.json)."""
    fam = srv.family
    out: dict = {}
    if api == "chat":
        s, b = post(srv, "/tokenize", {k: v for k, v in body.items() if k in TOKENIZE_CHAT_KEYS})
        out["tokenize"] = b["count"] if s == 200 else _error(b)
        if (name, fam) not in SKIP_REQUEST:
            s, b = post(srv, "/v1/chat/completions", {**body, "max_tokens": 1})
            out["request"] = [b["usage"]["prompt_tokens"]] if s == 200 else _error(b)
    elif api == "completions":
        if isinstance(body["prompt"], str):
            s, b = post(srv, "/tokenize", body)
            out["tokenize"] = b["count"] if s == 200 else _error(b)
        s, b = post(srv, "/v1/completions", {**body, "max_tokens": 1, "return_token_ids": True})
        if s == 200:
            counts = [len(c["prompt_token_ids"]) for c in sorted(b["choices"], key=lambda c: c["index"])]
            assert sum(counts) == b["usage"]["prompt_tokens"]
            out["request"] = counts
        else:
            out["request"] = _error(b)
    elif api == "responses":
        s, b = post(srv, "/v1/responses", {**body, "max_output_tokens": 1})
        out["request"] = [b["usage"]["input_tokens"]] if s == 200 else _error(b)
    elif api == "messages":
        s, b = post(srv, "/v1/messages", {**body, "max_tokens": 1})
        out["request"] = [b["usage"]["input_tokens"]] if s == 200 else _error(b)
        s, b = post(srv, "/v1/messages/count_tokens", {k: v for k, v in body.items() if k != "max_tokens"})
        out["count_tokens"] = b["input_tokens"] if s == 200 else _error(b)
    return out


def ours(fn):
    try:
        return fn()
    except TemplateError as e:
        return {"error": str(e)}


def same(want, got) -> bool:
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return False
        if "validation error" in want["error"]:  # pydantic's report: a 400 is a 400
            return True
        if "is not a multimodal model" in want["error"]:
            return "is not a multimodal model" in got["error"]  # vLLM names the served model
        return got["error"] in want["error"]   # vLLM appends " (parameter=...)"
    return want == got


# -- the 150 dev bodies ---------------------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMILIES)
def test_dev_bodies_tokenize_chat(servers, dev_bodies, fam):
    srv, c = servers[fam], counter_for(fam)
    wrong = []
    for i, row in enumerate(dev_bodies):
        s, b = post(srv, "/tokenize", {"messages": row["body"]["messages"]})
        assert s == 200, b
        mine = c.count_tokenize({"messages": row["body"]["messages"]})
        req = c.count_request("chat", row["body"])[0]
        if not (b["count"] == mine == req):
            wrong.append((i, b["count"], mine, req))
        if fam in row["prompt_tokens"]:  # the data file's counts came from the same vLLM
            assert b["count"] == row["prompt_tokens"][fam], (i, b["count"], row["prompt_tokens"])
    assert not wrong, f"{fam}: {len(wrong)}/150 differ (index, vLLM, count_tokenize, count_request): {wrong[:5]}"


@pytest.mark.parametrize("fam", FAMILIES)
def test_dev_bodies_tokenize_prompt(servers, dev_bodies, fam):
    srv, c = servers[fam], counter_for(fam)
    wrong = []
    for i, row in enumerate(dev_bodies):
        text = row["body"]["messages"][-1]["content"]
        s, b = post(srv, "/tokenize", {"prompt": text})
        assert s == 200, b
        if b["count"] != c.count_prompt(text) or b["tokens"] != c.encode(text, add_special_tokens=True):
            wrong.append((i, b["count"], c.count_prompt(text)))
    assert not wrong, f"{fam}: {len(wrong)}/150 prompts differ: {wrong[:5]}"


@pytest.mark.parametrize("fam", FAMILIES)
def test_dev_bodies_usage_of_real_requests(servers, dev_bodies, fam):
    """/tokenize is what a request counts: the usage of real chat completions (every 10th body)."""
    srv, c = servers[fam], counter_for(fam)
    for row in dev_bodies[::10]:
        s, b = post(srv, "/v1/chat/completions", {**row["body"], "max_tokens": 1, "stream": False})
        assert s == 200, b
        assert b["usage"]["prompt_tokens"] == c.count_request("chat", row["body"])[0]


# -- the edge cases ------------------------------------------------------------------------------

_recorded: dict = {}


@pytest.mark.parametrize("name,api,body", CASES, ids=[c[0] for c in CASES])
def test_edge_case(servers, name, api, body):
    answers = {fam: measure(servers[fam], name, api, body) for fam in FAMILIES}
    _recorded[name] = answers
    diffs = []
    for fam, want in answers.items():
        c = counter_for(fam)
        for kind, value in want.items():
            if kind == "tokenize":
                got = ours(lambda: c.count_tokenize(body))
            elif kind == "request":
                got = ours(lambda: c.count_request(api, body))
            else:
                got = ours(lambda: c.count_request(api, body)[0])
            if not same(value, got):
                diffs.append(f"{fam} {kind}: vLLM {value!r}, ours {got!r}")
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("name,api,body,expected", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_window_case(servers, name, api, body, expected):
    """The context-window checks (--max-model-len 8192): the counter with max_model_len answers
    what the server answers, count or 400, and the expectation written in token_cases holds."""
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
            "responses": "/v1/responses", "messages": "/v1/messages"}[api]
    for fam in FAMILIES:
        s, b = post(servers[fam], path, body)
        if s == 200:
            u = b["usage"]
            want = [u["prompt_tokens"] if "prompt_tokens" in u else u["input_tokens"]]
        else:
            want = _error(b)
        got = ours(lambda: counter_for(fam).count_request(api, body, max_model_len=WINDOW))
        if api == "completions" and isinstance(got, list):
            got = [sum(got)]
        assert same(want, got), f"{fam}: vLLM {want!r}, ours {got!r}"
        if isinstance(expected, str):
            assert isinstance(want, dict) and expected in want["error"], (fam, want)
        else:
            assert want == expected, (fam, want)


def test_record_edge_cases():
    """With EXTPROC_RECORD_VLLM_COUNTS=1: the answers above, into tests/tokens/vllm_counts.json."""
    if not RECORD:
        pytest.skip("EXTPROC_RECORD_VLLM_COUNTS is not 1")
    if len(_recorded) != len(CASES):
        pytest.skip("not every edge case ran in this session")
    merged = {**load_counts(), **_recorded}
    COUNTS_FILE.write_text(json.dumps(merged, indent=1, ensure_ascii=False, sort_keys=True) + "\n",
                           encoding="utf-8")
