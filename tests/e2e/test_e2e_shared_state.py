"""Several ``extproc serve`` replicas (real processes) sharing one calibration through a real
redis-server, the simulated vLLM pools, and a real Envoy whose router clusters hold every replica:

* after 500 sampled requests spread across three replicas, their estimates on a probe set agree
  (within 1%; by design exactly), and a replica started afterwards agrees before it serves;
* Redis killed mid-load (its data lost) and brought back: no request lost, and the replicas
  agree again afterwards;
* one replica killed mid-load behind Envoy: no request lost;
* a read response teaches the replica that decided it, whichever replica Envoy sent its usage
  stream to.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import random
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import grpc
import orjson
import pytest
import yaml
from e2e_helpers import need_envoy, real_text

from extproc.operator.v1 import operator_pb2 as opb
from extproc.operator.v1 import operator_pb2_grpc as opb_grpc
from extproc.service.envoy_config import EnvoyLayout, render
from extproc.stack import DEFAULT_MODEL, Stack, _http_ok, _wait, envoy_binary, envoy_cluster_healthy, free_port

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "service"))
from redis_server import RedisServer  # noqa: E402
from service_harness import request_headers, response_body, response_headers  # noqa: E402

DEV_REQUESTS = pathlib.Path(__file__).resolve().parents[2].parent / "shared/data/requests/dev_requests.jsonl"
ROUTE = "/v1/chat/completions"


class Replica:
    """One ``extproc serve`` process with its own ports, following the shared calibration."""

    def __init__(self, workdir: pathlib.Path, name: str, redis_url: str) -> None:
        self.workdir, self.name = workdir, name
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.config = workdir / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump({"service": {
            "grpc_address": f"127.0.0.1:{self.grpc_port}", "http_address": f"127.0.0.1:{self.http_port}",
            "metrics_address": f"127.0.0.1:{self.metrics_port}", "shared_state": redis_url,
            "client_hash_key": "fleet-wide-client-hash-key", "usage_sample_rate": 1.0,
            "usage_samples_per_s": 1e6, "grace_period_s": 1.0,
            "snapshot_path": str(workdir / f"{name}-calibration.json")}}))
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Replica":
        with open(self.workdir / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        if wait:
            _wait(self.serving, f"replica {self.name}", 30, self.proc, self.workdir / f"{self.name}.log")
        return self

    def serving(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def snapshot(self) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as ch:
            return opb_grpc.OperatorStub(ch).GetCalibration(opb.GetCalibrationRequest(), timeout=5).snapshot_json

    def explain(self, bodies: list[bytes]) -> list[opb.ExplainResponse]:
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as ch:
            stub = opb_grpc.OperatorStub(ch)
            return [stub.Explain(opb.ExplainRequest(body=b, path=ROUTE), timeout=5) for b in bodies]

    def metric(self, name: str, **labels) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        want = set(labels.items())
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and want <= set(s.labels.items()))


class Fleet:
    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir).start()
        self.engines = Stack(workdir / "engines", time_scale=0.0)  # (only its engines are started)
        self.engines.start_engines()
        self.replicas = [Replica(workdir, f"replica{i}", self.redis.url).start() for i in range(3)]
        self.listen_port, self.admin_port = free_port(), free_port()
        self.envoy: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start_envoy(self) -> None:
        """Our Envoy bootstrap with every replica in both router clusters (round robin, health
        checked; a dead one is skipped, and while the check has not seen it die, its requests
        fail open to the largest pool)."""
        first = self.replicas[0]
        lay = EnvoyLayout(listen_port=self.listen_port, admin_port=self.admin_port,
                          router_address=("127.0.0.1", first.grpc_port),
                          router_http_address=("127.0.0.1", first.http_port),
                          pools=tuple((p, "127.0.0.1", port) for p, port in self.engines.pool_ports.items()),
                          access_log_path=str(self.workdir / "access.log"))
        doc = render(lay)
        for cluster in doc["static_resources"]["clusters"]:
            port_of = {"extproc": "grpc_port", "extproc_http": "http_port"}.get(cluster["name"])
            if port_of:
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                 "port_value": getattr(r, port_of)}}}}
                    for r in self.replicas]
        path = self.workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        with open(self.workdir / "envoy.log", "ab") as log:
            self.envoy = subprocess.Popen([envoy_binary(), "-c", str(path), "--concurrency", "1",
                                           "--use-dynamic-base-id", "-l", "warning"], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        _wait(lambda: _http_ok(f"http://127.0.0.1:{self.admin_port}/ready"), "envoy", 60, self.envoy)
        _wait(lambda: all(envoy_cluster_healthy(self.admin_port, c) for c in ("extproc", "extproc_http")),
              "router clusters healthy in Envoy", 30)

    def stop(self) -> None:
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
            self.envoy.wait(15)
        for r in self.replicas:
            r.stop()
        self.engines.stop()
        self.redis.stop()

    def agreed(self, replicas: list[Replica] | None = None) -> bool:
        states = {r.snapshot() for r in (replicas or self.live())}
        return len(states) == 1

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.proc is not None and r.proc.poll() is None]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    need_envoy()
    f = Fleet(tmp_path_factory.mktemp("shared-state"))
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def dev_requests() -> list[dict]:
    if not DEV_REQUESTS.is_file():
        pytest.skip(f"shared data not found at {DEV_REQUESTS}")
    return [json.loads(line) for line in DEV_REQUESTS.read_text().splitlines() if line.strip()]


def _probes(dev_requests) -> list[bytes]:
    bodies = [r["body"] for r in dev_requests[:12]]
    bodies += [{"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": real_text(n)}], "max_tokens": 64}
               for n in (500, 3000, 7000)]
    return [orjson.dumps(b) for b in bodies]


async def _sampled_request(session: aiohttp.ClientSession, replica: Replica, engines: Stack, body: bytes,
                           client: str) -> bool:
    """What Envoy does for one request whose response is read, against one replica: the check,
    the pool's answer, then the usage stream (observability mode) with that answer."""
    async with session.post(f"http://127.0.0.1:{replica.http_port}/route{ROUTE}", data=body,
                            headers={"x-forwarded-for": client, "content-type": "application/json"}) as resp:
        assert resp.status == 200
        pool, decision, read = (resp.headers.get(f"x-token-{h}") for h in ("pool", "decision", "read"))
    async with session.post(f"{engines.pool_url(pool)}{ROUTE}", data=body,
                            headers={"content-type": "application/json"}) as resp:
        answer = await resp.read()
        status = resp.status
    if read != "1":
        return False
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.grpc_port}") as ch:
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

        call = pb_grpc.ExternalProcessorStub(ch).Process(timeout=10)
        for msg in (request_headers(extra={"x-token-decision": decision}, observability=True),
                    response_headers(status, "application/json"), response_body(answer, eos=True)):
            await call.write(msg)
        await call.done_writing()
        async for _ in call:
            pass
    return True


async def _spread(fleet: Fleet, rows: list[dict], concurrency: int = 8) -> int:
    queue = list(enumerate(rows))
    read = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def worker() -> None:
            nonlocal read
            while queue:
                i, row = queue.pop()
                replica = fleet.replicas[i % len(fleet.replicas)]
                got = await _sampled_request(session, replica, fleet.engines, orjson.dumps(row["body"]),
                                             f"10.0.0.{i % 16}")
                read += got  # (after the await: ``read += await …`` would read ``read`` before it)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return read


def _until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.1)


def _within(a: list[opb.ExplainResponse], b: list[opb.ExplainResponse], rel: float) -> list[str]:
    bad = []
    for x, y in zip(a, b):
        for field in ("prompt_tokens", "conservative_prompt_tokens", "budget_tokens"):
            u, v = getattr(x, field), getattr(y, field)
            if abs(u - v) > rel * max(u, v, 1):
                bad.append(f"{field}: {u} vs {v}")
    return bad


def test_replicas_agree_after_500_sampled_requests_and_a_new_one_before_its_first(fleet, dev_requests):
    rows = random.Random(13).choices(dev_requests, k=500)
    rows += [{"body": {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": real_text(n)}],
                       "max_tokens": 32}} for n in random.Random(14).choices(range(200, 6000), k=40)]
    before = sum(r.metric("extproc_shared_state_samples_total", outcome="published") for r in fleet.replicas)
    read = asyncio.run(asyncio.wait_for(_spread(fleet, rows), 240))
    assert read >= 500
    _until(lambda: sum(r.metric("extproc_shared_state_samples_total", outcome="published")
                       for r in fleet.replicas) - before >= read, "every read sample published")
    _until(fleet.agreed, "the three replicas hold one calibration")
    probes = _probes(dev_requests)
    answers = [r.explain(probes) for r in fleet.replicas]
    assert answers[0][0].calibration_samples >= 500
    for other in answers[1:]:
        assert not _within(answers[0], other, 0.01)
    late = Replica(fleet.workdir, "late", fleet.redis.url).start()  # serving only once it follows the fleet
    try:
        assert late.snapshot() == fleet.replicas[0].snapshot()  # before its first request
        assert not _within(answers[0], late.explain(probes), 0.01)
    finally:
        late.stop()


async def _load(fleet: Fleet, total: int, events: dict[int, callable], concurrency: int = 16,
                budget_s: float = 240) -> dict[int, int | str]:
    """``total`` requests through Envoy; ``events[n]`` runs (in a thread) once n have finished."""
    results: dict[int, int | str] = {}
    todo = list(range(total))
    fired: set[int] = set()
    texts = [real_text(n) for n in (30, 60, 120, 250)] * 5 + [real_text(9000)]  # the last for the long pool
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            while todo:
                i = todo.pop()
                body = {"model": DEFAULT_MODEL, "max_tokens": 8,
                        "messages": [{"role": "user", "content": f"{i}: {texts[i % len(texts)]}"}]}
                try:
                    async with session.post(f"{fleet.url}{ROUTE}", json=body,
                                            headers={"x-forwarded-for": f"10.1.0.{i % 20}"}) as resp:
                        await resp.read()
                        results[i] = resp.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    results[i] = f"{type(exc).__name__}: {exc}"
                for at, event in events.items():
                    if len(results) >= at and at not in fired:
                        fired.add(at)
                        await asyncio.to_thread(event)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), budget_s)
    return results


def test_every_read_response_teaches_whichever_replica_envoy_sent_its_usage_stream_to(fleet):
    """Envoy balances the usage streams over the replicas apart from the checks: a read reaches
    the replica that decided it about one time in three. The others relay what it told."""
    if fleet.envoy is None:
        fleet.start_envoy()

    def reads() -> float:
        return sum(r.metric("extproc_usage_reads_total") for r in fleet.live())
    before = reads()
    results = asyncio.run(_load(fleet, 300, {}))
    assert all(s == 200 for s in results.values())
    _until(lambda: reads() - before >= 300, "every response learned by the replica that decided it", 15)
    assert sum(r.metric("extproc_shared_state_relayed_reads_total", outcome="received") for r in fleet.live()) > 100


def test_redis_killed_mid_load_loses_no_request_and_the_replicas_agree_again(fleet):
    if fleet.envoy is None:
        fleet.start_envoy()
    total = 3000
    results = asyncio.run(_load(fleet, total, {1000: fleet.redis.kill, 2000: fleet.redis.start}))
    bad = {i: s for i, s in results.items() if s != 200}
    assert len(results) == total and not bad, f"{len(bad)} of {total} lost: {list(bad.items())[:5]}"
    _until(lambda: all(r.metric("extproc_shared_state_up") == 1 for r in fleet.live()), "every replica back")
    _until(fleet.agreed, "the replicas hold one calibration again")
    learned = json.loads(fleet.replicas[0].snapshot())["keys"][DEFAULT_MODEL]["n"]
    assert learned > 0
    assert all(r.metric("extproc_shared_state_samples_total", outcome="local") > 0 for r in fleet.live())


def test_a_replica_killed_mid_load_behind_envoy_loses_no_request(fleet):
    if fleet.envoy is None:
        fleet.start_envoy()
    total = 3000
    victim = fleet.replicas[2]
    results = asyncio.run(_load(fleet, total, {1000: lambda: victim.stop(signal.SIGKILL)}))
    bad = {i: s for i, s in results.items() if s != 200}
    assert len(results) == total and not bad, f"{len(bad)} of {total} lost: {list(bad.items())[:5]}"
    assert victim.proc.poll() is not None
    _until(lambda: fleet.agreed(fleet.live()), "the two left hold one calibration")
