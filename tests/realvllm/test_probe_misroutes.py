"""Against real vLLM 0.32: the router counts every misroute real vLLM shows, of the right kind,
with one "misroute:" log line each, and no others.

Two real vLLM pools (8K and 64K, the Llama-3.1 tokenizer and its dated template) behind real Envoy
and the router. The probes use a router that under-estimates on purpose (a fixed 50 bytes a
token), so that every oversized request really goes to the short pool and vLLM answers what it
answers to a misroute: each kind of 400, and the 0.32 silent clamp. The truth is never taken
from our own code: each prompt's count comes from the real server's ``/tokenize``.
"""

from __future__ import annotations

import http.client
import json
import pathlib
import time
import urllib.request
import uuid

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.stack import Stack

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SHORT, LONG = 8192, 65536
TIER_SPECS = [("llama3_1", SHORT), ("llama3_1", LONG)]  # the servers it uses (conftest starts them together)
DEV_REQUESTS = pathlib.Path(__file__).resolve().parents[2].parent / "shared/data/requests/dev_requests.jsonl"


# -- the stack --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pools(real_vllm):
    return real_vllm.servers([("llama3_1", SHORT), ("llama3_1", LONG)])


def _stack(tmp_path_factory, pools, name: str, router: dict) -> Stack:
    workdir = tmp_path_factory.mktemp(name)
    config = workdir / "input-config.yaml"
    config.write_text(yaml.safe_dump(router))
    short, long = pools
    return Stack(workdir, config_path=str(config), model=MODEL,
                 external_pools={"short": short.port, "long": long.port}).start()


@pytest.fixture(scope="module")
def underestimating(tmp_path_factory, pools):
    s = _stack(tmp_path_factory, pools, "probe-under", {"estimator": {"kind": "fixed-ratio",
                                                                       "settings": {"ratio": 50.0}}})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def default_router(tmp_path_factory, pools):
    s = _stack(tmp_path_factory, pools, "probe-default", {})
    yield s
    s.stop()


# -- helpers ----------------------------------------------------------------------------------------

def _post(port: int, path: str, body: dict, timeout: float = 300.0, rid: str = "") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"content-type": "application/json", "x-request-id": rid or f"probe-{uuid.uuid4().hex}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _tokenize(server, body: dict) -> int:
    """The real server's count of a chat (``messages``) or a prompt: the truth of these tests."""
    status, _, raw = _post(server.port, "/tokenize", {"model": MODEL, **body})
    assert status == 200, raw[:300]
    return json.loads(raw)["count"]


def _words(n: int) -> str:
    return " ".join(["hello"] * n)  # "hello" and " hello" are one token each in the Llama-3 vocabulary


def _chat_of(server, tokens: int) -> list[dict]:
    """Messages whose rendered prompt is exactly ``tokens`` tokens on the real server."""
    base = _tokenize(server, {"messages": [{"role": "user", "content": "hello"}]})
    messages = [{"role": "user", "content": _words(1 + tokens - base)}]
    got = _tokenize(server, {"messages": messages})
    assert got == tokens, (got, tokens)
    return messages


def _metrics(stack: Stack) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sum(snap: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in snap.items() if n == name and want <= ls)


def _misroute_lines(stack: Stack) -> list[str]:
    path = stack.workdir / "router.log"
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            msg = json.loads(line).get("msg", "")
        except ValueError:
            continue
        if msg.startswith("misroute:"):
            out.append(msg)
    return out


def _settled(stack: Stack, name: str, want: float, wait: float = 10.0, **labels) -> float:
    """The usage filter reads after the response: poll until the metric reaches ``want``."""
    deadline = time.monotonic() + wait
    while True:
        got = _sum(_metrics(stack), name, **labels)
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


# -- probes: one of each kind, and near misses that are not misroutes -------------------------------

def _probes(short) -> list[tuple[str, str, dict, str | None]]:
    """(name, path, body, the misroute kind vLLM shows or None)."""
    over = _chat_of(short, 9000)
    clamp = _chat_of(short, 8100)  # + max_tokens 200: vLLM clamps to 92 (kept small: CPU decoding)
    full = _chat_of(short, SHORT)
    fits = _chat_of(short, 8180)
    return [
        ("prompt over the window", "/v1/chat/completions",
         {"model": MODEL, "messages": over, "max_tokens": 64}, "prompt_over_window"),
        ("prompt fits, prompt + max_tokens does not", "/v1/chat/completions",
         {"model": MODEL, "messages": clamp, "max_tokens": 200}, "output_clamped"),
        ("prompt == window", "/v1/chat/completions",
         {"model": MODEL, "messages": full, "max_tokens": 1}, "prompt_fills_window"),
        ("stream without usage, clamped", "/v1/chat/completions",
         {"model": MODEL, "messages": clamp, "max_tokens": 200, "stream": True}, "output_clamped"),
        ("stream with usage, clamped", "/v1/chat/completions",
         {"model": MODEL, "messages": clamp, "max_tokens": 200, "stream": True,
          "stream_options": {"include_usage": True}}, "output_clamped"),
        ("stream over the window", "/v1/chat/completions",
         {"model": MODEL, "messages": over, "max_tokens": 16, "stream": True}, "prompt_over_window"),
        ("/v1/responses over the window", "/v1/responses",
         {"model": MODEL, "input": over[0]["content"], "max_output_tokens": 16}, "prompt_over_window"),
        ("completion text over the window", "/v1/completions",
         {"model": MODEL, "prompt": _words(9000), "max_tokens": 16}, "prompt_over_window"),
        ("fits exactly: prompt + max_tokens == window", "/v1/chat/completions",
         {"model": MODEL, "messages": fits, "max_tokens": SHORT - 8180}, None),
        ("fits with room", "/v1/chat/completions", {"model": MODEL, "messages": fits, "max_tokens": 8}, None),
        ("fits, streamed without usage", "/v1/chat/completions",
         {"model": MODEL, "messages": fits, "max_tokens": 12, "stream": True}, None),
        ("token ids over the window: counted exactly, sent long", "/v1/completions",
         {"model": MODEL, "prompt": [9906] * 9000, "max_tokens": 16}, None),
    ]


def test_every_misroute_real_vllm_shows_is_counted_once_with_its_kind(pools, underestimating):
    short, _ = pools
    probes = _probes(short)
    rows = []
    for name, path, body, kind in probes:
        before = _metrics(underestimating)
        rid = f"probe-{uuid.uuid4().hex}"
        status, _, raw = _post(underestimating.listen_port, path, body, rid=rid)
        expected_total = _sum(before, "extproc_misroutes_total") + (kind is not None)
        got_total = _settled(underestimating, "extproc_misroutes_total", expected_total)
        if kind is None:
            time.sleep(0.3)  # a count that should not come: give it the time one would take
            got_total = _sum(_metrics(underestimating), "extproc_misroutes_total")
        after = _metrics(underestimating)
        counted = {k: _sum(after, "extproc_misroutes_total", kind=k) - _sum(before, "extproc_misroutes_total", kind=k)
                   for k in ("prompt_over_window", "prompt_fills_window", "output_over_window", "output_clamped")}
        outcome = [o for o in ("json", "stream", "stream_missed", "json_missed", "context_error", "other_status")
                   if _sum(after, "extproc_usage_reads_total", outcome=o) > _sum(before, "extproc_usage_reads_total",
                                                                                   outcome=o)]
        rows.append((name, _served_pool(underestimating, rid), status,
                     {k: int(v) for k, v in counted.items() if v}, outcome))
        assert got_total == expected_total, (name, status, raw[:300], counted)
        if kind is not None:
            assert counted[kind] == 1, (name, counted)
    print("\n".join(f"| {n} | {p} | {s} | {c or '-'} | {', '.join(o) or '-'} |" for n, p, s, c, o in rows))
    lines = _misroute_lines(underestimating)
    assert len(lines) == sum(k is not None for *_, k in probes), lines  # one log line per counted misroute
    assert all("pool=short" in line for line in lines)


def test_token_id_prompts_are_routed_on_their_exact_length(pools, default_router):
    status, headers, raw = _post(default_router.listen_port, "/v1/completions",
                                 {"model": MODEL, "prompt": [9906] * 9000, "max_tokens": 4})
    assert status == 200 and "x-token-pool" not in headers  # router headers never reach the client
    assert json.loads(raw)["usage"]["prompt_tokens"] == 9000


def _near_limit_bodies(short, n: int) -> list[tuple[dict, int]]:
    """Real request bodies (Arena-Hard prompts) grown to budgets within a few percent of the short
    pool's window; with each the real prompt count (/tokenize)."""
    if not DEV_REQUESTS.is_file():
        pytest.skip(f"shared data not found at {DEV_REQUESTS}")
    rows = [json.loads(line) for line in DEV_REQUESTS.read_text().splitlines() if line.strip()][:n]
    out = []
    for i, row in enumerate(rows):
        body = dict(row["body"], model=MODEL)
        messages = body["messages"]
        one = _tokenize(short, {"messages": messages})
        target = int(SHORT * (0.985 + 0.01 * (i % 5) / 4))  # prompts of 98.5-99.5% of the window
        text = messages[-1]["content"]
        grown = "\n\n".join([text] * max(1, (target - 64) // max(one, 1)))
        pad = target - _tokenize(short, {"messages": messages[:-1] + [{"role": "user", "content": grown}]})
        body["messages"] = messages[:-1] + [{"role": "user", "content": grown + " hello" * max(0, pad)}]
        prompt = _tokenize(short, {"messages": body["messages"]})
        # some over the window by a few tokens, some just under (outputs stay short: CPU decoding)
        body["max_tokens"] = max(1, SHORT - prompt + (12 if i % 3 == 0 else -12))
        body.pop("stream", None)
        out.append((body, prompt))
    return out


def test_real_bodies_near_the_limit_count_exactly_the_true_misroutes_and_learn(pools, default_router):
    short, _ = pools
    cases = _near_limit_bodies(short, 12)
    before = _metrics(default_router)
    truth, routes = 0, []
    for body, prompt in cases:
        rid = f"near-{uuid.uuid4().hex}"
        status, _, raw = _post(default_router.listen_port, "/v1/chat/completions", body, rid=rid)
        assert status in (200, 400), raw[:300]
        access = _served_pool(default_router, rid)
        routes.append(f"{prompt}+{body['max_tokens']}->{access}")
        if access == "short" and prompt + body["max_tokens"] > SHORT:
            truth += 1
    got = _settled(default_router, "extproc_misroutes_total", _sum(before, "extproc_misroutes_total") + truth)
    time.sleep(0.3)
    got = _sum(_metrics(default_router), "extproc_misroutes_total") - _sum(before, "extproc_misroutes_total")
    print(f"\nnear-limit real bodies: {', '.join(routes)}; misroutes true {truth}, counted {got}")
    assert got == truth
    learned = _sum(_metrics(default_router), "extproc_usage_reads_total", outcome="json") \
        - _sum(before, "extproc_usage_reads_total", outcome="json")
    assert learned >= 1  # the calibrator read the real usage of these requests


def _served_pool(stack: Stack, rid: str) -> str:
    """Which pool served a request (Envoy's access log says; vLLM's answer does not)."""
    path = stack.workdir / "access.log"
    req = urllib.request.Request(f"http://127.0.0.1:{stack.admin_port}/reopen_logs", method="POST")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        urllib.request.urlopen(req, timeout=2).read()
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if f" id={rid} " in line:
                return line.split(" upstream=pool_", 1)[1].split()[0]
        time.sleep(0.1)
    raise AssertionError(f"no access-log line for {rid}")
