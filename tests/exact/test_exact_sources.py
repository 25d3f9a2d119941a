"""The exact sources: local (the router's tokenizer; quicktok between Hugging Face's added tokens)
against the real counter, and pool (POST /tokenize) against a real simulated engine on loopback,
with its timeout, caps and bounded reads against real misbehaving HTTP servers."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time

import orjson
import pytest
from aiohttp import web

from extproc.engine import EngineConfig, OutputPolicy, start_engine
from extproc.engine.versions import VllmVersion
from extproc.exact import ExactCounts, ExactRule, ExactSettings, LocalSettings, PoolSettings
from extproc.exact.local import LocalCounters, counter_key
from extproc.exact.pool import tokenize_body
from extproc.fleet.instance import profile_named
from extproc.tokens import counter_for

TEXTS = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "texts" / "dev_texts.jsonl"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def exact(*rules: ExactRule, local: LocalSettings = LocalSettings(), pool: PoolSettings = PoolSettings()) -> ExactCounts:
    return ExactCounts(ExactSettings(rules=rules, local=local, pool=pool))


def chat(text: str, model: str = LLAMA, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    if not TEXTS.is_file():
        pytest.skip(f"shared texts not found at {TEXTS}")
    rows = [json.loads(line) for line in TEXTS.read_text(encoding="utf-8").splitlines() if line]
    return [r["text"] for r in rows[::8]]  # every category, an eighth of the texts


# -- local ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama3", "llama3_1", "qwen3"])
def test_local_counts_equal_the_real_counter(family, texts):
    ex = exact(ExactRule("*", "local", family=family))
    ex.warm("m")
    hf = counter_for(family)
    # typed special-token strings count as the tokenizer's added tokens do, including the ones
    # quicktok's list names differently (Llama-3.1's <|eom_id|>, its reserved_special_token_248)
    specials = " <|eot_id|> <|eom_id|> <|reserved_special_token_248|> <|im_end|> <think> x"

    async def run() -> list[tuple[int, int]]:
        out = []
        for text in texts:
            body = chat(text + specials, "m", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
            found = await ex.count("m", "chat", orjson.dumps(body))
            assert found.outcome == "counted", found
            out.append((found.tokens, hf.count_request("chat", body, enable_auto_tool_choice=True,
                                                      tool_call_parser="hermes")[0]))
        return out

    pairs = asyncio.run(run())
    assert [a for a, _ in pairs] == [b for _, b in pairs]  # exact: no margin, no second pass


TURKISH = "Yeni teknolojileri öğrenmeyi seviyorum. " * 40


def test_local_counts_the_words_quicktok_alone_gets_wrong_as_hugging_face_does():
    import quicktok

    ex = exact(ExactRule("*", "local", family="llama3"))
    ex.warm("m")
    hf = counter_for("llama3")
    # why precise.py exists: quicktok alone counts this ASCII word short
    assert quicktok.get_encoding("llama3").count(" seviyorum") == 2 < hf.count_text(" seviyorum") == 4
    for text in (TURKISH, "The quick brown fox. " * 500, "Yeni teknolojileri ogrenmeyi seviyorum. " * 40):
        for body in (orjson.dumps(chat(text, "m")), json.dumps(chat(text, "m")).encode()):  # raw, \u escaped
            found = asyncio.run(ex.count("m", "chat", body))
            assert (found.outcome, found.tokens) == ("counted", hf.count_request("chat", orjson.loads(body))[0])


def test_a_request_that_fits_to_the_token_is_decided_on_one_count():
    from extproc.budget import BudgetRouter, Decision

    router = BudgetRouter()
    n = counter_for("llama3").count_chat([{"role": "user", "content": TURKISH}])

    def refined(ex: ExactCounts, output: int):
        body = orjson.dumps(chat(TURKISH, "m", max_tokens=output))
        d = Decision("long", n - 100, n + 150 + output, "fits", "calibrated", output_tokens=output, model="m",
                     api="chat", margin=0.03)
        return asyncio.run(ex.refine(router, d, None, body))

    for ex in (exact(ExactRule("*", "local", family="llama3")),
               # a rule naming a pool: the router counts it all the same, the pool is not asked
               exact(ExactRule("*", "local", family="llama3", pool_url="http://127.0.0.1:9"))):
        ex.warm("m")
        fits = refined(ex, 8192 - n)  # fills the short pool to the token
        assert [t[:2] for t in fits.count.tried] == [("local", "counted")]
        assert (fits.decision.pool, fits.decision.source, fits.decision.budget_tokens) == ("short", "exact", 8192)
        over = refined(ex, 8193 - n)  # one token more
        assert (over.decision.pool, over.decision.budget_tokens) == ("long", 8193)


def test_local_completions_batch_counts_every_prompt():
    ex = exact(ExactRule("*", "local", family="llama3_1"))
    ex.warm("m")
    body = orjson.dumps({"model": "m", "prompt": ["one two three", "a much longer prompt " * 40]})
    found = asyncio.run(ex.count("m", "completions", body))
    hf = counter_for("llama3_1")
    counts = [hf.count_prompt("one two three"), hf.count_prompt("a much longer prompt " * 40)]
    assert (found.tokens, found.total) == (max(counts), sum(counts))


def test_local_caps_and_failures():
    ex = exact(ExactRule("*", "local", family="llama3"), local=LocalSettings(max_bytes=4096, inline_bytes=512))
    ex.warm("m")

    async def run():
        big = await ex.count("m", "chat", orjson.dumps(chat("x " * 3000, "m")))
        threaded = await ex.count("m", "chat", orjson.dumps(chat("word " * 300, "m")))  # > inline_bytes
        refused = await ex.count("m", "chat", orjson.dumps({"model": "m", "messages": "not a list"}))
        garbage = await ex.count("m", "chat", b"{not json")
        return big, threaded, refused, garbage

    big, threaded, refused, garbage = asyncio.run(run())
    assert big.outcome == "too_large"
    assert threaded.outcome == "counted" and threaded.tokens == counter_for("llama3").count_chat(
        [{"role": "user", "content": "word " * 300}])
    assert refused.outcome == "error"   # vLLM would answer 400: the estimate decides
    assert garbage.outcome == "unsupported"


def test_no_rule_no_count_and_off_rules():
    ex = exact(ExactRule("gpt-*", "off"), ExactRule("*llama*", "local", family="llama3"))
    assert asyncio.run(ex.count("gpt-4o", "chat", b"{}")) is None
    assert asyncio.run(ex.count("mistral", "chat", b"{}")) is None
    assert ex.rule_for("Meta-LLAMA-3") is not None  # globs match case-insensitively


def test_a_counter_loads_in_the_background_and_a_bad_one_fails_once(tmp_path):
    counters = LocalCounters()
    rule = ExactRule("*", "local", family="qwen3")
    deadline = time.monotonic() + 30
    got = counters.get(rule, "m")
    while got is None and time.monotonic() < deadline:
        time.sleep(0.05)
        got = counters.get(rule, "m")
    assert got is not None and got.quick
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")
    bad = ExactRule("*", "local", tokenizer=str(broken))
    assert counters.get(bad, "m") is None
    while counter_key(bad, "m") not in counters._failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter_key(bad, "m") in counters._failed
    assert counters.get(bad, "m") is None  # not retried at once


def test_a_tokenizer_directory_is_counted_exactly():
    from extproc.tokens.files import family_dir

    ex = exact(ExactRule("*", "local", tokenizer=str(family_dir("qwen3"))))
    ex.warm("m")
    body = chat("Grüße aus Köln, 東京 and more text. " * 40, "m")
    found = asyncio.run(ex.count("m", "chat", orjson.dumps(body)))
    assert found.outcome == "counted"
    assert found.tokens == counter_for("qwen3").count_request("chat", body)[0]


# -- pool -------------------------------------------------------------------------------------

def engine_config(family: str, served: str) -> EngineConfig:
    return EngineConfig(profile=profile_named("short"), model=None, time_scale=0.0, output_policy=OutputPolicy(16),
                        served_names=(served,), vllm_version=VllmVersion.parse("0.32"), tokenizer=family)


def test_tokenize_body_carries_what_the_template_reads():
    doc = {"model": "m", "messages": [{"role": "assistant", "content": "a", "reasoning_content": "r"}],
           "tools": [{"type": "function", "function": {"name": "f"}}], "reasoning_effort": "none",
           "max_tokens": 5, "stream": True}
    body = tokenize_body("chat", doc)
    assert body["messages"][0] == {"role": "assistant", "content": "a", "reasoning": "r"}
    assert body["tools"] == doc["tools"] and "max_tokens" not in body and "stream" not in body
    assert body["chat_template_kwargs"] == {"reasoning_effort": "none", "enable_thinking": False}
    assert tokenize_body("completions", {"model": "m", "prompt": "hi"}) == {"model": "m", "prompt": "hi"}


def test_pool_counts_equal_the_engines_and_the_counter(texts):
    async def run():
        engine = await start_engine(engine_config("llama3_1", LLAMA))
        ex = exact(ExactRule("*", "pool", pool_url=engine.url), pool=PoolSettings(timeout_s=5.0))
        try:
            out = []
            for text in texts[:40]:
                body = chat(text)
                found = await ex.count(LLAMA, "chat", orjson.dumps(body))
                out.append((found, counter_for("llama3_1").count_request("chat", body)[0]))
            prompt = await ex.count(LLAMA, "completions", orjson.dumps({"model": LLAMA, "prompt": texts[0]}))
            batch = await ex.count(LLAMA, "completions", orjson.dumps({"model": LLAMA, "prompt": ["a", "b"]}))
            unknown = await ex.count(LLAMA, "chat", orjson.dumps(chat("hi", model="no-such-model")))
            return out, prompt, batch, unknown
        finally:
            await ex.close()
            await engine.close()

    out, prompt, batch, unknown = asyncio.run(run())
    for found, truth in out:
        assert (found.source, found.outcome, found.tokens) == ("pool", "counted", truth)
    assert prompt.outcome == "counted" and prompt.tokens == counter_for("llama3_1").count_prompt(texts[0])
    assert batch.outcome == "unsupported"
    assert unknown.outcome == "error"  # the engine's 404


class Misbehaving:
    """A real HTTP server on loopback whose /tokenize is slow, huge, broken or not JSON."""

    def __init__(self, delay: float = 0.0, answer: bytes = b'{"count": 7}', status: int = 200) -> None:
        self.delay, self.answer, self.status, self.calls = delay, answer, status, 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        await request.read()
        await asyncio.sleep(self.delay)
        return web.Response(body=self.answer, status=self.status, content_type="application/json")

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_post("/tokenize", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def pool_count(server: Misbehaving, body: dict, calls: int = 1, **pool) -> list:
    async def run():
        async with server as url:
            ex = exact(ExactRule("*", "pool", pool_url=url), pool=PoolSettings(**pool))
            try:
                return await asyncio.gather(*(ex.count("m", "chat", orjson.dumps(body)) for _ in range(calls)))
            finally:
                await ex.close()
    return asyncio.run(run())


def test_pool_timeout_against_a_slow_server():
    (found,) = pool_count(Misbehaving(delay=1.0), chat("hi", "m"), timeout_s=0.05)
    assert found.outcome == "timeout"
    assert 0.04 <= found.seconds < 0.5  # the request was given up at its timeout, not at the answer


def test_pool_concurrency_cap():
    server = Misbehaving(delay=0.2)
    found = pool_count(server, chat("hi", "m"), calls=3, max_concurrent=1, timeout_s=2.0)
    assert sorted(f.outcome for f in found) == ["capped", "capped", "counted"] and server.calls == 1


def test_pool_rate_cap():
    server = Misbehaving()
    found = pool_count(server, chat("hi", "m"), calls=4, max_per_s=2.0, timeout_s=2.0)
    assert sorted(f.outcome for f in found) == ["capped", "capped", "counted", "counted"] and server.calls == 2


@pytest.mark.parametrize("server,limit", [
    (Misbehaving(answer=b'{"count": 1, "tokens": [' + b"1," * 600_000 + b"1]}"), 1 << 20),  # bounded read
    (Misbehaving(answer=b"<html>oops</html>"), 1 << 20),
    (Misbehaving(answer=b'{"count": "many"}'), 1 << 20),
    (Misbehaving(answer=b'{"count": -3}'), 1 << 20),
    (Misbehaving(answer=b'{"error": {"message": "bad"}}', status=400), 1 << 20),
])
def test_pool_bad_answers_are_errors(server, limit):
    (found,) = pool_count(server, chat("hi", "m"), max_response_bytes=limit, timeout_s=5.0)
    assert found.outcome == "error" and found.tokens == 0


def test_pool_body_cap_and_refused_connection():
    (found,) = pool_count(Misbehaving(), chat("x" * 5000, "m"), max_bytes=1024)
    assert found.outcome == "too_large"
    ex = exact(ExactRule("*", "pool", pool_url="http://127.0.0.1:9"), pool=PoolSettings(timeout_s=1.0))
    assert asyncio.run(ex.count("m", "chat", orjson.dumps(chat("hi", "m")))).outcome in ("error", "timeout")


def test_local_above_its_cap_asks_the_pool():
    async def run():
        engine = await start_engine(engine_config("llama3", "m"))
        ex = exact(ExactRule("*", "local", family="llama3", pool_url=engine.url),
                   local=LocalSettings(max_bytes=1000), pool=PoolSettings(timeout_s=5.0))
        ex.warm("m")
        try:
            return await ex.count("m", "chat", orjson.dumps(chat("lorem ipsum " * 200, "m")))
        finally:
            await ex.close()
            await engine.close()

    found = asyncio.run(run())
    assert (found.source, found.outcome) == ("pool", "counted")
    assert [t[:2] for t in found.tried] == [("local", "too_large"), ("pool", "counted")]
    assert found.tokens == counter_for("llama3").count_chat([{"role": "user", "content": "lorem ipsum " * 200}])


def test_serve_preloads_every_tokenizer_the_rules_name_so_no_request_waits_on_a_load():
    """A load holds the GIL ~0.5 s: mid-traffic it stalled the loop past Envoy's check timeout
    (the request after the first close one failed open). ``extproc serve`` loads them first."""
    from extproc.exact import DEFAULT_RULES, ExactRule
    from extproc.exact.local import LocalCounters

    local = LocalCounters()
    local.preload(DEFAULT_RULES + (ExactRule("gpt-*", "off"),))
    for model in ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B"):
        rule = next(r for r in DEFAULT_RULES if r.matches(model))
        assert local.get(rule, model) is not None, model  # ready: no load started on the request path


def test_a_count_needing_too_many_new_pairs_checked_is_capped(monkeypatch, texts):
    from extproc.exact import precise

    monkeypatch.setattr(precise, "NEW_PAIRS_PER_S", 50)  # the bucket holds one second's worth
    ex = exact(ExactRule("*", "local", family="llama3"))
    ex.warm("m")  # (the warm-up's own pairs are few)
    found = asyncio.run(ex.count("m", "chat", orjson.dumps(chat("\n".join(texts[:20]), "m"))))
    assert found.outcome == "capped"
    small = asyncio.run(ex.count("m", "chat", orjson.dumps(chat("hello there", "m"))))
    assert small.outcome == "counted" and small.tokens == counter_for("llama3").count_chat(
        [{"role": "user", "content": "hello there"}])


def test_pool_counts_a_messages_body_with_count_tokens(texts):
    """An Anthropic Messages body is counted by the pool's /v1/messages/count_tokens, as the
    local source counts it (the engine renders it as vLLM does)."""
    bodies = [{"model": LLAMA, "max_tokens": 64, "system": "Be brief.",
               "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]} for text in texts[:10]]
    bodies.append({"model": LLAMA, "max_tokens": 64, "stream": True, "messages": [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "rain"}]}],
        "tools": [{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]})

    async def run():
        engine = await start_engine(engine_config("llama3_1", LLAMA))
        pool = exact(ExactRule("*", "pool", pool_url=engine.url), pool=PoolSettings(timeout_s=5.0))
        local = exact(ExactRule("*", "local", family="llama3_1"))
        local.warm(LLAMA)
        try:
            return [(await pool.count(LLAMA, "messages", orjson.dumps(b)), await local.count(LLAMA, "messages", orjson.dumps(b)))
                    for b in bodies]
        finally:
            await pool.close()
            await engine.close()

    for p, loc in asyncio.run(run()):
        assert (p.source, p.outcome, loc.outcome) == ("pool", "counted", "counted")
        assert p.tokens == loc.tokens
