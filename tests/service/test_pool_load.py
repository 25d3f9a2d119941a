"""The pools' load from their vLLM metrics pages (service/pool_load.py) and the spill decision on
it (Router.choose, counted by Router.route): the page parser against real and hostile pages, the reader against real HTTP
servers on loopback (slow, huge, endless, lying), and the decision against readings."""

from __future__ import annotations

import asyncio
import pathlib

import pytest
from aiohttp import web

from extproc.budget import BudgetRouter
from extproc.config import ConfigError, parse_config
from extproc.service.metrics import Metrics
from extproc.service.pool_load import (
    MAX_ENGINES,
    BadPage,
    PoolLoadReader,
    PoolReadings,
    Reading,
    parse_page,
)
from extproc.service.router import Router

CAPTURE = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "vllm" / "responses_8k" / "metrics_after.txt"
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def page(waiting=0, running=0, kv=0.0, engines=1, extra: str = "") -> bytes:
    lines = [extra]
    for e in range(engines):
        labels = f'engine="{e}",model_name="m"'
        lines += [f"vllm:num_requests_running{{{labels}}} {running}",
                  f"vllm:num_requests_waiting{{{labels}}} {waiting}",
                  f'vllm:num_requests_waiting_by_reason{{{labels},reason="capacity"}} 999',
                  f"vllm:kv_cache_usage_perc{{{labels}}} {kv}"]
    return ("\n".join(lines) + "\n").encode()


# -- the parser ------------------------------------------------------------------------------------

def test_a_real_vllm_page_reads():
    if not CAPTURE.is_file():
        pytest.skip("no captured vLLM metrics page in ../shared/data")
    p = parse_page(CAPTURE.read_bytes())
    assert (p.engines, p.waiting, p.running, p.kv) == (1, 0.0, 0.0, (0.0,))


def test_the_simulated_engines_page_reads():
    from extproc.engine.metrics import render
    from extproc.engine.scheduler import SequenceScheduler
    from extproc.fleet.instance import profile_named

    p = parse_page(render(SequenceScheduler(profile_named("short"), 0.0), MODEL).encode())
    assert (p.engines, p.waiting, p.kv) == (1, 0.0, (0.0,))


def test_labels_timestamps_and_engines():
    text = (b'# HELP vllm:num_requests_waiting x\n'
            b'vllm:num_requests_waiting{engine="0",model_name="a} 99 \\"q\\""} 3 1700000000000\r\n'
            b'vllm:num_requests_waiting{engine="1"} 5\n'
            b'vllm:num_requests_waiting 2\n'
            b'vllm:num_requests_waiting_by_reason{reason="capacity"} 1000\n'
            b'vllm:gpu_cache_usage_perc{engine="0"} 0.5\n'
            b'vllm:gpu_cache_usage_perc{engine="1"} 0.7')          # older vLLM's name, no final newline
    p = parse_page(text)
    assert (p.engines, p.waiting, p.running, p.kv) == (3, 10.0, 0.0, (0.5, 0.7))


@pytest.mark.parametrize("text", [
    b"", b"\x00\xff" * 1000, b"vllm:num_requests_running 3\n",               # no waiting gauge
    page(waiting="NaN"), page(waiting="+Inf"), page(waiting=-1), page(waiting="1e309"), page(waiting="0x10"),
    page(waiting=2e6), page(kv=1.5), page(kv=-0.1), page(kv="nan"),
    page(engines=MAX_ENGINES + 1),
    b"vllm:num_requests_waiting{" + b"a" * 10_000 + b"} 1\n",              # a line past MAX_LINE
    b'vllm:num_requests_waiting{a="unterminated} 1\n',
    b"vllm:num_requests_waiting{a=\"x\"}1\n",                               # no space before the value
])
def test_hostile_pages_are_bad_pages(text):
    with pytest.raises(BadPage):
        parse_page(text)


def test_a_page_of_many_small_lines_stays_cheap():
    import time

    text = b"x\n" * 500_000 + page(waiting=4)
    t0 = time.perf_counter()
    assert parse_page(text).waiting == 4
    assert time.perf_counter() - t0 < 0.5  # a guard against a per-line Python loop, not a benchmark


# -- the decision ------------------------------------------------------------------------------------

SPILL = {"pools": {"short": {"endpoints": ["127.0.0.1:9"], "queue_per_instance": 4, "kv_cache": 0.9},
                   "long": {"endpoints": ["127.0.0.1:9"], "queue_per_instance": 2, "kv_cache": 0.9}},
         "stale_s": 1.0}


def router(spill=SPILL) -> Router:
    cfg = parse_config({"service": {"spillover": spill}})
    return Router(BudgetRouter(cfg.budget), cfg.service, Metrics())


def read(r: Router, pool: str, waiting: float, kv: float = 0.1, instances: int = 1, age: float = 0.0) -> None:
    import time

    r.readings.readings[pool] = Reading(time.monotonic() - age, r.readings.sent_count[pool], instances, instances,
                                        waiting, 0.0, kv)


def held(r: Router, why: str) -> float:
    return r.metrics.registry.get_sample_value("extproc_spillover_held_total", {"pool": "short", "why": why}) or 0


SHORT = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}' % MODEL.encode()


def short_request(r: Router):
    return r.budget.decide(r.budget.read(SHORT, "/v1/chat/completions"))[0]


def send(r: Router) -> tuple[str, str | None]:
    """Route the short request through the router's door (counted: sends, spills, holds)."""
    routed = r.route(SHORT, "/v1/chat/completions")
    return routed.pool, routed.spilled_from


def long_request(r: Router):
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "%s"}], "max_tokens": 8}'
            % (MODEL, "word " * 20_000)).encode()
    return r.budget.decide(r.budget.read(body, "/v1/chat/completions"))[0]


def test_spills_when_its_pool_is_under_pressure_and_the_larger_one_is_not():
    r = router()
    d = short_request(r)
    assert d.pool == "short" and r.choose(d) == ("short", None)   # nothing read yet: no spill
    read(r, "short", waiting=8, instances=2)                      # 4 per instance: at the threshold, not over
    read(r, "long", waiting=0)
    assert r.choose(d) == ("short", None)
    read(r, "short", waiting=9, instances=2)
    assert r.choose(d) == ("long", "short")
    read(r, "short", waiting=0, kv=0.95)                          # the KV cache alone
    assert r.choose(d) == ("long", "short")


def test_no_spill_on_stale_readings_or_when_the_larger_pool_is_full():
    r = router()
    d = short_request(r)
    read(r, "short", waiting=50)
    read(r, "long", waiting=0, age=1.5)                           # the target's reading is stale
    assert send(r) == ("short", None) and held(r, "stale") == 1
    read(r, "long", waiting=3)                                    # fresh, over its own threshold of 2
    assert send(r) == ("short", None) and held(r, "no_room") == 1
    read(r, "long", waiting=0)
    read(r, "short", waiting=50, age=1.5)                         # the source's reading is stale
    assert send(r) == ("short", None) and held(r, "stale") == 2
    assert r.choose(d) == ("short", None) and held(r, "stale") == 2  # choose alone counts nothing


def test_never_to_a_pool_too_small():
    r = router()
    d = long_request(r)
    assert d.pool == "long" and "short" not in d.fits
    read(r, "long", waiting=100)
    read(r, "short", waiting=0)
    assert r.choose(d) == ("long", None)


def test_requests_sent_since_the_read_count_as_queued():
    r = router()
    d = short_request(r)
    read(r, "short", waiting=3)
    read(r, "long", waiting=0)
    routed = [send(r)[0] for _ in range(5)]
    # short: 3 waiting + 1 sent = 4 (not over its 4); + 2 sent = 5: spill. long: 0, 1, 2 queued
    # per instance (not over its 2) take one each; with 3 queued it is over: the next one stays.
    assert routed == ["short", "short", "long", "long", "long"]
    assert r.choose(d) == ("short", None)
    read(r, "long", waiting=0)                                    # a new read of long: its sends are in it
    assert r.choose(d) == ("long", "short")


def test_explain_shows_the_load_reading():
    from extproc.service.operator import explain_record, explain_response

    r = router()
    read(r, "short", waiting=15, kv=0.25, instances=3)
    read(r, "long", waiting=0, kv=0.5)
    rec = explain_record(explain_response(r.place(r.budget.explain(
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % MODEL.encode(),
        "/v1/chat/completions"))))
    assert (rec["pool"], rec["spilled_from"]) == ("long", "short")
    short, long_ = rec["pools"]
    assert short["load"]["queue_per_instance"] == 5.0 and short["load"]["instances"] == 3
    assert short["load"]["under_pressure"] and short["load"]["fresh"] and short["load"]["kv_cache_usage"] == 0.25
    assert not long_["load"]["under_pressure"] and long_["load"]["queue_threshold"] == 2
    assert 0 <= short["load"]["load_age_s"] < 1
    read(r, "short", waiting=15, age=5)
    placed = r.place(r.budget.explain(b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}'
                                      % MODEL.encode(), "/v1/chat/completions"))
    assert placed.pool == "short" and not placed.loads[0].load.fresh
    assert held(r, "stale") == 0  # a dry run counts nothing
    assert send(r) == ("short", None) and held(r, "stale") == 1


# -- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spill, field", [
    ({"short": 96}, "service.spillover.short"),                        # the retired in-flight form
    ({"pools": {"tiny": {"endpoints": ["a:1"]}, "long": {"endpoints": ["a:1"]}}}, "service.spillover.pools.tiny"),
    ({"pools": {"short": {"endpoints": ["a:1"]}}}, "service.spillover.pools"),
    ({"pools": {"short": {"endpoints": ["a:1"], "dns": "a:1"}, "long": {"dns": "b:1"}}}, "service.spillover.pools.short"),
    ({"pools": {"short": {"endpoints": ["a"]}, "long": {"dns": "b:1"}}}, "service.spillover.pools.short.endpoints[0]"),
    ({"pools": {"short": {"endpoints": []}, "long": {"dns": "b:1"}}}, "service.spillover.pools.short.endpoints"),
    ({"pools": {"short": {"dns": "http://a:1"}, "long": {"dns": "b:1"}}}, "service.spillover.pools.short.dns"),
    ({"pools": {"short": {"dns": "a:1", "kv_cache": 90}, "long": {"dns": "b:1"}}}, "service.spillover.pools.short.kv_cache"),
    ({"pools": {"short": {"dns": "a:1", "queue": 3}, "long": {"dns": "b:1"}}}, "service.spillover.pools.short.queue"),
    ({"period_s": 2, "stale_s": 1}, "service.spillover.stale_s"),
])
def test_bad_spillover_configs_name_the_field(spill, field):
    with pytest.raises(ConfigError) as exc:
        parse_config({"service": {"spillover": spill}})
    assert exc.value.field == field


def test_the_environment_turns_spillover_off_or_points_it_elsewhere():
    from extproc.config import apply_env

    doc = {"service": {"spillover": {"pools": {"short": {"dns": "a:1"}, "long": {"dns": "b:1"}}}}}
    off = parse_config(apply_env(doc, {"EXTPROC_SERVICE__SPILLOVER": "{}"}))
    assert off.service.spillover.pools == ()
    moved = parse_config(apply_env(doc, {"EXTPROC_SERVICE__SPILLOVER__POOLS__SHORT__DNS": "pods.llm.svc:8000"}))
    assert moved.service.spillover.of("short").dns == "pods.llm.svc:8000"


# -- the reader, against real HTTP servers --------------------------------------------------------

async def _serve(handler) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def test_the_reader_reads_good_pages_and_survives_bad_servers():
    outcomes: list[tuple[str, str]] = []

    async def good(request):
        return web.Response(body=page(waiting=6, kv=0.4, engines=2))

    async def huge(request):
        return web.Response(body=b"#" * (2 << 20) + page(waiting=1))

    async def endless(request):  # chunked, no length: the byte bound stops it
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(10_000):
            await resp.write(b"# " + b"x" * 65_000 + b"\n")
        return resp

    async def slow(request):
        await asyncio.sleep(3)
        return web.Response(body=page())

    async def liar(request):
        return web.Response(body=page(waiting="NaN"))

    async def scenario():
        runners, ports = [], {}
        for name, h in (("good", good), ("huge", huge), ("endless", endless), ("slow", slow), ("liar", liar)):
            runner, ports[name] = await _serve(h)
            runners.append(runner)
        ep = lambda *names: [f"127.0.0.1:{ports[n]}" for n in names]  # noqa: E731
        cfg = parse_config({"service": {"spillover": {
            "pools": {"short": {"endpoints": ep("good", "huge", "endless", "slow", "liar")},
                      "long": {"dns": f"localhost:{ports['good']}"}},
            "timeout_s": 0.3, "period_s": 5, "stale_s": 5}}})
        readings = PoolReadings(cfg.service.spillover)
        reader = PoolLoadReader(readings, lambda pool, outcome: outcomes.append((pool, outcome)))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reader.start()  # the first round at once, the next one period_s (5 s) later
        try:
            while (len(outcomes) < 6 or None in readings.readings.values()) and loop.time() - t0 < 3:
                await asyncio.sleep(0.01)
            elapsed = loop.time() - t0
            return readings.view("short"), readings.view("long"), readings, elapsed
        finally:
            await reader.stop()
            for runner in runners:
                await runner.cleanup()

    short, long_, readings, elapsed = asyncio.run(scenario())
    assert elapsed < 2.0  # the slow server (3 s) is cut at the timeout
    assert short.fresh and short.instances == 2 and short.queue_per_instance == 6.0 and short.kv_cache == 0.4
    assert readings.readings["short"].endpoints == 5
    assert sorted(o for p, o in outcomes if p == "short") == ["bad_page", "ok", "timeout", "too_large", "too_large"]
    # localhost resolved (its A record here): one endpoint with two engines
    assert long_.fresh and long_.instances == 2 and ("long", "ok") in outcomes


def test_no_answer_means_no_reading():
    async def scenario():
        cfg = parse_config({"service": {"spillover": {
            "pools": {"short": {"endpoints": ["127.0.0.1:9"]}, "long": {"dns": "no-such-host.invalid:80"}},
            "timeout_s": 0.2}}})
        readings = PoolReadings(cfg.service.spillover)
        outcomes = []
        reader = PoolLoadReader(readings, lambda p, o: outcomes.append((p, o)))
        reader.start()
        try:
            for _ in range(100):
                if len(outcomes) >= 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            await reader.stop()
        return readings, outcomes

    readings, outcomes = asyncio.run(scenario())
    assert readings.readings == {"short": None, "long": None}
    assert not readings.view("short").fresh and readings.view("short").age_s is None
    assert ("short", "error") in outcomes and ("long", "no_endpoints") in outcomes
