"""The calibration shared through a real redis-server (service/shared_state.py), with router
services in this process: replicas hold the very same state, a new one starts from the fleet's,
hostile stream entries are skipped, and Redis down, slow or restarted empty costs nothing on the
request path and is caught up afterwards. (tests/e2e/test_e2e_shared_state.py runs real
``extproc serve`` processes behind a real Envoy.)"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import random
import signal
import time

import orjson
import pytest
import redis.asyncio as aioredis
from redis_server import RedisServer

from extproc.budget.response import ResponseFacts
from extproc.budget.wire import sample_to_doc
from extproc.config import parse_config
from extproc.service import shared_state
from extproc.service.app import Service

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
DEV_REQUESTS = pathlib.Path(__file__).resolve().parents[2].parent / "shared/data/requests/dev_requests.jsonl"


@pytest.fixture(scope="module")
def dev_requests() -> list[dict]:
    """Real chat bodies with the prompt counts vLLM reports for them."""
    if not DEV_REQUESTS.is_file():
        pytest.skip(f"shared data not found at {DEV_REQUESTS}")
    return [json.loads(line) for line in DEV_REQUESTS.read_text().splitlines() if line.strip()]


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fast(monkeypatch):
    """Snapshots and epoch checks every half second instead of ten (the tests wait for them)."""
    monkeypatch.setattr(shared_state, "SNAPSHOT_EVERY_S", 0.5)
    monkeypatch.setattr(shared_state, "BACKOFF_S", (0.05, 0.3))


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def replica(url: str, **service) -> Service:
    cfg = parse_config({"service": {"shared_state": url, "client_hash_key": "k" * 16, **service}})
    s = Service(cfg)
    await s.start(grpc_address="127.0.0.1:0", metrics_address=None, http_address="127.0.0.1:0")
    return s


def teach(svc: Service, rows: list[dict], clients: int = 9, seed: int = 0) -> None:
    """Learn each request's true count through the service's response path (as a read usage)."""
    r = svc.router
    for i, row in enumerate(rows):
        d, obs = svc.budget.route_learnable(orjson.dumps(row["body"]))
        r.learn_from(d, obs, d.pool, ResponseFacts(200, prompt_tokens=row["prompt_tokens"]["llama3"]),
                     client=f"client{(i + seed) % clients}")


def state(svc: Service) -> str:
    return json.dumps(svc.budget.snapshot(), sort_keys=True)


def value(svc: Service, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(s.value for m in svc.metrics.registry.collect() for s in m.samples
               if s.name == name and want <= set(s.labels.items()))


async def until(check, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.02)


def samples(svc: Service) -> int:
    return svc.budget.estimator.samples(MODEL)


def _rows(dev_requests, n: int, seed: int) -> list[dict]:
    return random.Random(seed).choices(dev_requests, k=n)


def test_replicas_hold_the_same_state_and_a_new_one_starts_from_the_fleets(redis_server, dev_requests):
    async def body():
        a, b = await replica(redis_server.url), await replica(redis_server.url)
        try:
            teach(a, _rows(dev_requests, 150, 1))
            teach(b, _rows(dev_requests, 150, 2), seed=4)
            assert samples(a) < 150  # its own samples are applied when the stream brings them back
            await until(lambda: samples(a) == samples(b) == 300, "both replicas applied all 300")
            assert state(a) == state(b)
            assert value(a, "extproc_shared_state_samples_total", outcome="published") == 150
            assert value(a, "extproc_shared_state_samples_total", outcome="applied") == 300
            assert value(a, "extproc_shared_state_up") == 1
            c = await replica(redis_server.url)  # started afterwards: the fleet's state before it serves
            try:
                assert state(c) == state(a)
                probe = orjson.dumps(dev_requests[0]["body"])
                assert c.budget.explain(probe).decision == a.budget.explain(probe).decision
            finally:
                await c.stop(grace=0)
        finally:
            await a.stop(grace=0)
            await b.stop(grace=0)
    run(body())


def test_hostile_entries_are_skipped_counted_and_still_meet_the_client_guard(redis_server, dev_requests):
    async def body():
        a = await replica(redis_server.url)
        r = aioredis.from_url(redis_server.url)
        try:
            d, obs = a.budget.route_learnable(orjson.dumps(dev_requests[3]["body"]))
            good = sample_to_doc(obs, 40, "mallory", False)
            bad = [b"not json", b"[1,2]", b'{"w": 1}', orjson.dumps({**good, "t": -5}),
                   orjson.dumps({**good, "f": "nope"}), orjson.dumps({**good, "p": [{"x": [[3, 1], [1.0, 1.0]]}]}),
                   b"{" * 100_000, b"x" * (shared_state.MAX_ENTRY_BYTES + 1)]
            for data in bad:
                await r.xadd(shared_state.STREAM, {"s": data})
            await r.xadd(shared_state.STREAM, {"other": b"field"})
            # one client's flood, past its share of the model's recent learning: the guard refuses it
            for _ in range(200):
                await r.xadd(shared_state.STREAM, {"s": orjson.dumps(good)})
            await until(lambda: value(a, "extproc_shared_state_samples_total", outcome="applied") == 200,
                        "the valid entries applied")
            assert value(a, "extproc_shared_state_samples_total", outcome="rejected") == len(bad) + 1
            learning = a.budget.learning(MODEL)
            assert learning["refused"] > 100, learning  # the same guard admission as a local sample
            assert samples(a) < 100
            assert a.shared.up and a.shared.in_sync
        finally:
            await r.aclose()
            await a.stop(grace=0)
    run(body())


def test_redis_down_at_start_serves_from_local_state_then_catches_up(tmp_path, dev_requests, fast, caplog):
    server = RedisServer(tmp_path)  # its port, nothing listening yet
    caplog.set_level(logging.INFO, "extproc.service")

    async def body():
        t0 = time.monotonic()
        a = await replica(server.url)
        try:
            assert time.monotonic() - t0 < shared_state.START_WAIT_S  # did not wait the full bound
            assert "unreachable at start" in caplog.text
            assert a.check.port and not a.shared.up
            teach(a, _rows(dev_requests, 40, 5))
            assert samples(a) == 40  # learned locally at once while Redis is away
            assert value(a, "extproc_shared_state_samples_total", outcome="local") == 40
            server.start()
            await until(lambda: a.shared.up and a.shared.in_sync, "caught up after Redis came")
            b = await replica(server.url)
            try:
                assert samples(b) == 40 and state(b) == state(a)  # the outage's samples reached the fleet
                teach(b, _rows(dev_requests, 20, 6))
                await until(lambda: samples(a) == samples(b) == 60, "both applied the next samples")
                assert state(a) == state(b)
            finally:
                await b.stop(grace=0)
        finally:
            await a.stop(grace=0)
            server.stop()
    run(body())


def test_redis_restarted_empty_mid_run_every_replica_agrees_again(redis_server, dev_requests, fast):
    async def body():
        a, b = await replica(redis_server.url), await replica(redis_server.url)
        try:
            teach(a, _rows(dev_requests, 60, 7))
            await until(lambda: samples(a) == samples(b) == 60, "both applied the first samples")
            redis_server.kill()  # its data is gone
            await until(lambda: not a.shared.up and not b.shared.up, "both saw Redis go")
            t0 = time.perf_counter()
            teach(a, _rows(dev_requests, 30, 8))
            teach(b, _rows(dev_requests, 30, 9), seed=3)
            assert time.perf_counter() - t0 < 1.0  # nothing waited for Redis
            assert samples(a) == samples(b) == 90  # each learned its own locally: they differ now
            assert state(a) != state(b)
            redis_server.start()
            await until(lambda: a.shared.in_sync and b.shared.in_sync and state(a) == state(b),
                        "both resynced to one state")
            assert samples(a) == 120  # the first 60, and both outages' 30: each counted once
        finally:
            await a.stop(grace=0)
            await b.stop(grace=0)
    run(body())


def test_a_stalled_redis_costs_the_request_path_nothing(redis_server, dev_requests, fast):
    async def body():
        a = await replica(redis_server.url)
        try:
            redis_server.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
            try:
                rows = _rows(dev_requests, 50, 10)
                t0 = time.perf_counter()
                for row in rows:
                    routed = a.router.route(orjson.dumps(row["body"]), "/v1/chat/completions")
                    assert routed.pool == "short"
                teach(a, rows)
                assert time.perf_counter() - t0 < 1.0
                await until(lambda: not a.shared.up, "the stall seen as Redis away", timeout=10)
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            await until(lambda: a.shared.up and a.shared.in_sync and samples(a) == 50, "caught up after the stall")
        finally:
            await a.stop(grace=0)
    run(body())


def test_a_replaced_calibration_becomes_the_fleets(redis_server, dev_requests, fast):
    async def body():
        a, b = await replica(redis_server.url), await replica(redis_server.url)
        try:
            teach(a, _rows(dev_requests, 60, 11))
            await until(lambda: samples(a) == samples(b) == 60, "both applied")
            assert b.budget.reset(MODEL)  # what the operator API's ResetCalibration does, then:
            b.shared.replaced()
            await until(lambda: samples(a) == 0 and a.shared.in_sync, "the reset reached the other replica")
            assert state(a) == state(b)
        finally:
            await a.stop(grace=0)
            await b.stop(grace=0)
    run(body())


@pytest.mark.parametrize("url", ["http://h:6379/0", "redis://:6379/0", "redis://h:99999/0", "redis://h:6379/x",
                                 "redis://h:6379/0?x=1", 5, ["redis://h"]])
def test_an_invalid_shared_state_url_fails_at_start_naming_the_field(url):
    from extproc.config import ConfigError

    with pytest.raises(ConfigError, match="service.shared_state"):
        parse_config({"service": {"shared_state": url}})


def test_the_url_in_logs_and_config_errors_carries_no_password():
    from extproc.config import ConfigError

    assert "secret" not in shared_state.redacted("rediss://user:secret@cache.internal:6380/2")
    with pytest.raises(ConfigError) as err:
        parse_config({"service": {"shared_state": "redis://user:secret@h:6379/0?db=1"}})
    assert "secret" not in str(err.value)


def test_the_outbox_is_bounded_while_redis_is_away(tmp_path, dev_requests, monkeypatch):
    monkeypatch.setattr(shared_state, "OUTBOX", 10)
    server = RedisServer(tmp_path)  # nothing listening

    async def body():
        a = await replica(server.url)
        try:
            teach(a, _rows(dev_requests, 25, 12))
            assert samples(a) == 25  # every one learned here
            assert len(a.shared.outbox) == 10
            assert value(a, "extproc_shared_state_samples_total", outcome="dropped") == 15
            assert value(a, "extproc_shared_state_outbox") == 10
        finally:
            await a.stop(grace=0)
    run(body())


def test_a_corrupt_shared_snapshot_is_replaced_by_a_replicas_state(redis_server, dev_requests, fast, caplog):
    caplog.set_level(logging.INFO, "extproc.service")

    async def body():
        r = aioredis.from_url(redis_server.url)
        await r.hset(shared_state.SNAPSHOT, mapping={"id": "0-0", "epoch": "e", "doc": b'{"version": 99}'})
        a = await replica(redis_server.url)
        try:
            assert "shared snapshot unusable" in caplog.text and a.shared.in_sync
            assert (await r.hget(shared_state.SNAPSHOT, "epoch")).decode() == a.shared.epoch != "e"
            teach(a, _rows(dev_requests, 20, 13))
            await until(lambda: samples(a) == 20, "learning through the stream")
            b = await replica(redis_server.url)  # the replaced snapshot is a valid one
            try:
                assert state(b) == state(a)
            finally:
                await b.stop(grace=0)
        finally:
            await r.aclose()
            await a.stop(grace=0)
    run(body())


def test_a_reload_cannot_switch_the_shared_state():
    from extproc.service.reload import restart_reason

    assert "shared calibration" in restart_reason("service.shared_state")


def test_a_stream_cut_past_the_snapshot_is_said_and_the_rest_applied(redis_server, dev_requests, caplog):
    caplog.set_level(logging.INFO, "extproc.service")

    async def body():
        r = aioredis.from_url(redis_server.url)
        probe = await replica(redis_server.url)  # only to build sample documents
        docs = []
        for row in _rows(dev_requests, 30, 14):
            _, obs = probe.budget.route_learnable(orjson.dumps(row["body"]))
            docs.append(orjson.dumps(sample_to_doc(obs, row["prompt_tokens"]["llama3"], "c", False)))
        await probe.stop(grace=0)
        await r.flushall()
        for data in docs:  # a stream whose first 20 entries were trimmed, and a snapshot of none of them
            await r.xadd(shared_state.STREAM, {"s": data}, maxlen=10, approximate=False)
        a = await replica(redis_server.url)
        try:
            assert "may have been cut past the snapshot" in caplog.text
            assert value(a, "extproc_shared_state_samples_total", outcome="applied") == 10
        finally:
            await r.aclose()
            await a.stop(grace=0)
    run(body())


def test_a_response_read_by_another_replica_teaches_the_one_that_decided(redis_server, dev_requests):
    async def body():
        a, b = await replica(redis_server.url), await replica(redis_server.url)
        r = aioredis.from_url(redis_server.url)
        try:
            rows = _rows(dev_requests, 20, 15)
            for row in rows:  # decided (and marked for reading) by a; its usage stream reached b
                routed = a.router.route(orjson.dumps(row["body"]), "/v1/chat/completions", ended_by_log=True)
                assert routed.read
                assert b.router.awaits(routed.decision_id)  # b reads it, for a
                b.router.response_read(routed.decision_id, ResponseFacts(200, prompt_tokens=row["prompt_tokens"]["llama3"],
                                                                         prompt_exact=True))
            await until(lambda: samples(a) == samples(b) == 20, "a learned what b read, and b from a's stream")
            assert value(a, "extproc_usage_reads_total") == 20 and value(b, "extproc_usage_reads_total") == 0
            # what is not a relayed read of a's own decisions is refused, and counted
            key = shared_state.RELAY + a.shared.prefix
            for data in (b"junk", orjson.dumps({"d": "ffffffff-1", "st": 200}), orjson.dumps({"d": f"{a.shared.prefix}-1"})):
                await r.xadd(key, {"f": data})
            await until(lambda: value(a, "extproc_shared_state_relayed_reads_total", outcome="rejected") == 3,
                        "hostile relayed reads refused")
            assert not b.router.awaits("not-an-id") and not b.router.awaits(f"{b.shared.prefix}-99")
        finally:
            await r.aclose()
            await a.stop(grace=0)
            await b.stop(grace=0)
    run(body())
