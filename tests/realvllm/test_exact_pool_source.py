"""The pool exact source against real vLLM 0.32: what extproc.exact's pool source reads from a real
server's POST /tokenize is the prompt count a real request to that server reports, and the local
source's count is the same number.

Two servers (llama3_1 and qwen3, tiny random models with the real tokenizer files, the windows of
test_token_parity so a tier run shares them): real dev request bodies, a completions prompt, the
two things /tokenize does not do as a request does (Qwen3's ``reasoning_content``,
``reasoning_effort``), and a real server's answer arriving after the source's timeout.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import pathlib

import orjson
import pytest

from extproc.exact import ExactCounts, ExactRule, ExactSettings, PoolSettings

HERE = pathlib.Path(__file__).resolve().parent
DEV_REQUESTS = HERE.parents[2] / "shared" / "data" / "requests" / "dev_requests.jsonl"
WINDOW = 8192
FAMILIES = ("llama3_1", "qwen3")
TIER_SPECS = [(f, WINDOW) for f in FAMILIES]  # the servers it uses (conftest starts them together)


@pytest.fixture(scope="module")
def servers(real_vllm):
    return dict(zip(FAMILIES, real_vllm.servers([(f, WINDOW) for f in FAMILIES])))


@pytest.fixture(scope="module")
def dev_bodies() -> list[dict]:
    if not DEV_REQUESTS.is_file():
        pytest.skip(f"shared data not found at {DEV_REQUESTS}")
    return [json.loads(line)["body"] for line in DEV_REQUESTS.read_text(encoding="utf-8").splitlines() if line][:40]


def request_prompt_tokens(srv, path: str, body: dict) -> int | None:
    """usage.prompt_tokens of a real one-token request (None: vLLM refused it)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
    try:
        conn.request("POST", path, body=json.dumps({**body, "model": srv.model, "max_tokens": 1}).encode(),
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return json.loads(raw)["usage"]["prompt_tokens"] if resp.status == 200 else None


def counts(srv, family: str, api: str, bodies: list[dict], **pool) -> list[tuple]:
    """(pool source's count, local source's count) for each body, against one server."""
    settings = ExactSettings(rules=(ExactRule("*", "pool", pool_url=srv.url),),
                             pool=PoolSettings(**{"timeout_s": 30.0, **pool}))
    local = ExactCounts(ExactSettings(rules=(ExactRule("*", "local", family=family),)))
    local.warm(srv.model)

    async def run():
        remote = ExactCounts(settings)
        try:
            out = []
            for body in bodies:
                raw = orjson.dumps({**body, "model": srv.model})
                out.append((await remote.count(srv.model, api, raw), await local.count(srv.model, api, raw)))
            return out
        finally:
            await remote.close()

    return asyncio.run(run())


@pytest.mark.parametrize("family", FAMILIES)
def test_pool_counts_are_what_real_requests_report(servers, dev_bodies, family):
    srv = servers[family]
    wrong, checked = [], 0
    for body, (pool, local) in zip(dev_bodies, counts(srv, family, "chat", dev_bodies)):
        truth = request_prompt_tokens(srv, "/v1/chat/completions", body)
        if truth is None:
            continue  # a body this server refuses (tools without a tool parser): nothing to route
        checked += 1
        assert (pool.source, pool.outcome, local.outcome) == ("pool", "counted", "counted")
        if not pool.tokens == local.tokens == truth:
            wrong.append((pool.tokens, local.tokens, truth))
    assert checked >= 30 and not wrong, wrong[:5]


def test_pool_counts_a_completions_prompt(servers, dev_bodies):
    srv = servers["llama3_1"]
    bodies = [{"prompt": b["messages"][-1]["content"]} for b in dev_bodies[:10]]
    for body, (pool, local) in zip(bodies, counts(srv, "llama3_1", "completions", bodies)):
        assert pool.outcome == "counted"
        assert pool.tokens == local.tokens == request_prompt_tokens(srv, "/v1/completions", body)


def test_what_tokenize_lacks_is_sent_as_a_request_means_it(servers):
    """Qwen3's template renders an assistant's ``reasoning`` and reads ``enable_thinking``: a real
    request renames ``reasoning_content`` and turns ``reasoning_effort`` into the template
    argument; /tokenize does neither, so the source sends them that way."""
    srv = servers["qwen3"]
    bodies = [
        {"messages": [{"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
                      {"role": "user", "content": "And 3+3?"}]},
        {"messages": [{"role": "user", "content": "Say hi."}], "reasoning_effort": "none"},
        {"messages": [{"role": "user", "content": "Say hi."}], "reasoning_effort": "high"},
    ]
    for body, (pool, local) in zip(bodies, counts(srv, "qwen3", "chat", bodies)):
        assert pool.outcome == "counted"
        assert pool.tokens == local.tokens == request_prompt_tokens(srv, "/v1/chat/completions", body), body


def test_a_real_answer_after_the_timeout_is_a_timeout(servers):
    srv = servers["llama3_1"]
    long_chat = {"messages": [{"role": "user", "content": "lorem ipsum dolor sit amet " * 1200}]}
    ((pool, _),) = counts(srv, "llama3_1", "chat", [long_chat], timeout_s=0.001)
    assert pool.outcome == "timeout" and pool.tokens == 0


def test_pool_counts_a_messages_body_as_real_requests_report(servers, dev_bodies):
    """A Messages body goes to the real server's /v1/messages/count_tokens; its count is the
    ``usage.input_tokens`` a real /v1/messages request reports, and the local source's."""
    srv = servers["llama3_1"]
    bodies = [{"max_tokens": 1, "system": "Be brief.",
               "messages": [{"role": "user", "content": b["messages"][-1]["content"]}]}
              for b in dev_bodies[:12] if isinstance(b["messages"][-1].get("content"), str)]
    checked = 0
    for body, (pool, local) in zip(bodies, counts(srv, "llama3_1", "messages", bodies)):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
        try:
            conn.request("POST", "/v1/messages", body=json.dumps({**body, "model": srv.model}).encode(),
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            continue
        checked += 1
        assert (pool.outcome, local.outcome) == ("counted", "counted")
        assert pool.tokens == local.tokens == json.loads(raw)["usage"]["input_tokens"]
    assert checked >= 8
