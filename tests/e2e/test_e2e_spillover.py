"""Spillover on the pools' own load with several router replicas: real simulated vLLM engines
(the short pool with 2 sequences at once, so that its queue builds), three ``extproc serve``
processes each reading both engines' /metrics, and one real Envoy balancing its checks over the
three. Every response's pool is counted from Envoy's access log; the short pool's queue is
sampled from its own /metrics while the load runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from e2e_helpers import MODEL, AccessLine, access_lines, chat_body, need_envoy, post, real_text, rid

from extproc.service.envoy_config import EnvoyLayout, render
from extproc.stack import _http_ok, _wait, envoy_binary, envoy_cluster_healthy, free_port

REPLICAS = 3
SHORT_SEQS, LONG_SEQS = 2, 8
QUEUE_SHORT, QUEUE_LONG = 2, 4   # waiting per instance above which a pool is under pressure
CLIENTS = 16                     # closed loop: without spillover ~14 would wait on short
TIME_SCALE = {"short": 2.0, "long": 0.5}  # a 16-token answer: ~0.45 s on short; ~10K-token prefill ~1 s on long


@dataclass
class Fleet:
    """Duck-types the parts of ``extproc.stack.Stack`` that e2e_helpers use (listen_port,
    admin_port, workdir)."""
    workdir: Path
    listen_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    pool_ports: dict = field(default_factory=lambda: {"short": free_port(), "long": free_port()})
    replicas: list = field(default_factory=list)   # (grpc_port, http_port, metrics_port)
    procs: dict = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=os.environ.copy(), start_new_session=True)
        self.procs[name] = proc
        return proc

    def wait(self, name: str, check, timeout: float = 60) -> None:
        _wait(check, name, timeout, self.procs[name], self.workdir / f"{name}.log")

    def engine_url(self, pool: str) -> str:
        return f"http://127.0.0.1:{self.pool_ports[pool]}"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped engine cannot act on SIGTERM
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _router_config(fleet: Fleet, i: int) -> Path:
    grpc_port, http_port, metrics_port = fleet.replicas[i]
    ep = lambda pool: [f"127.0.0.1:{fleet.pool_ports[pool]}"]  # noqa: E731
    doc = {"service": {
        "grpc_address": f"127.0.0.1:{grpc_port}", "http_address": f"127.0.0.1:{http_port}",
        "metrics_address": f"127.0.0.1:{metrics_port}", "grace_period_s": 1,
        "spillover": {"period_s": 0.1, "timeout_s": 0.2, "stale_s": 0.5, "pools": {
            "short": {"endpoints": ep("short"), "queue_per_instance": QUEUE_SHORT, "kv_cache": 0.9},
            "long": {"endpoints": ep("long"), "queue_per_instance": QUEUE_LONG, "kv_cache": 0.9}}}}}
    path = fleet.workdir / f"router-{i}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _envoy_config(fleet: Fleet) -> Path:
    """Our bootstrap, with the router clusters' one endpoint replaced by the three replicas."""
    grpc0, http0, _ = fleet.replicas[0]
    boot = render(EnvoyLayout(
        listen_port=fleet.listen_port, admin_port=fleet.admin_port, router_address=("127.0.0.1", grpc0),
        router_http_address=("127.0.0.1", http0),
        pools=tuple((p, "127.0.0.1", port) for p, port in fleet.pool_ports.items()),
        access_log_path=str(fleet.workdir / "access.log")))
    for cluster in boot["static_resources"]["clusters"]:
        column = {"extproc": 0, "extproc_http": 1}.get(cluster["name"])
        if column is not None:
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": r[column]}}}}
                for r in fleet.replicas]
    path = fleet.workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    need_envoy()
    f = Fleet(tmp_path_factory.mktemp("spillover-fleet"))
    try:
        for pool, window, seqs in (("short", 8192, SHORT_SEQS), ("long", 65536, LONG_SEQS)):
            f.spawn(f"engine-{pool}", [
                sys.executable, "-m", "extproc.engine", "--port", str(f.pool_ports[pool]), "--profile", pool,
                "--model", MODEL, "--max-model-len", str(window), "--max-num-seqs", str(seqs),
                "--time-scale", str(TIME_SCALE[pool])])
        f.replicas = [(free_port(), free_port(), free_port()) for _ in range(REPLICAS)]
        for i in range(REPLICAS):
            f.spawn(f"router-{i}", [sys.executable, "-m", "extproc", "serve", "--config", str(_router_config(f, i))])
        for pool in f.pool_ports:
            f.wait(f"engine-{pool}", lambda p=pool: _http_ok(f"{f.engine_url(p)}/health"))
        for i, (_, _, metrics_port) in enumerate(f.replicas):
            f.wait(f"router-{i}", lambda m=metrics_port: _http_ok(f"http://127.0.0.1:{m}/metrics"))
        f.spawn("envoy", [envoy_binary(), "-c", str(_envoy_config(f)), "--concurrency", "1",
                          "--use-dynamic-base-id", "--file-flush-interval-msec", "200", "-l", "warning"])
        f.wait("envoy", lambda: _http_ok(f"http://127.0.0.1:{f.admin_port}/ready"))
        f.wait("envoy", lambda: all(envoy_cluster_healthy(f.admin_port, c) for c in ("extproc", "extproc_http")))
        yield f
    finally:
        f.stop()


def _gauge(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=2) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _router_total(fleet: Fleet, name: str, **labels) -> list[float]:
    """``name`` summed per replica over the samples carrying ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for _, _, metrics_port in fleet.replicas:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            families = text_string_to_metric_families(r.read().decode())
        out.append(sum(s.value for fam in families for s in fam.samples
                       if s.name == name and labels.items() <= s.labels.items()))
    return out


def _load(fleet: Fleet, bodies: list[tuple[str, dict]], clients: int, deadline_s: float) -> dict[str, int]:
    """Send every (kind, body) once from ``clients`` closed-loop threads; the status by request id."""
    todo = list(enumerate(bodies))
    lock = threading.Lock()
    statuses: dict[str, int] = {}
    ids = [rid(f"spill-{kind}") for kind, _ in bodies]
    stop_at = time.monotonic() + deadline_s

    def client() -> None:
        while time.monotonic() < stop_at:
            with lock:
                if not todo:
                    return
                i, (_, body) = todo.pop()
            statuses[ids[i]] = post(fleet, body, ids[i], timeout=deadline_s).status

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline_s + 5)
    return {i: statuses.get(i, 0) for i in ids}


class QueueSampler(threading.Thread):
    """The short pool's own waiting queue, read from its /metrics every 50 ms while the load runs."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(daemon=True)
        self.url = f"{fleet.engine_url('short')}/metrics"
        self.samples: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.05) and len(self.samples) < 2000:
            self.samples.append(_gauge(self.url, "vllm:num_requests_waiting"))


def _served(fleet: Fleet, statuses: dict[str, int]) -> dict[str, AccessLine]:
    lines = access_lines(fleet, list(statuses), wait=15)
    assert len(lines) == len(statuses), f"{len(statuses) - len(lines)} requests missing from the access log"
    return lines


def test_three_replicas_spill_on_the_short_pools_queue_and_keep_it_bounded(fleet):
    short = chat_body("Tell me about lighthouses.", max_tokens=16)
    long_only = chat_body(real_text(10_000), max_tokens=16)  # ~10K tokens: only the long pool holds it
    bodies = [("long", long_only) if i % 24 == 0 else ("short", short) for i in range(96)]
    sampler = QueueSampler(fleet)
    sampler.start()
    try:
        statuses = _load(fleet, bodies, CLIENTS, deadline_s=60)
    finally:
        sampler.halt.set()
        sampler.join(5)
    assert set(statuses.values()) == {200}, statuses
    lines = _served(fleet, statuses)
    kinds = {i: i.split("-")[1] for i in statuses}
    too_small = [i for i, line in lines.items() if kinds[i] == "long" and line.served_by != "long"]
    assert not too_small                                 # none to a pool too small for it
    spilled = [i for i, line in lines.items() if line.decision and line.decision.get("spilled_from") == "short"]
    assert {kinds[i] for i in spilled} == {"short"} and {lines[i].served_by for i in spilled} == {"long"}
    assert len(spilled) >= 10, (len(spilled), "requests spilled")
    on_short = sum(1 for line in lines.values() if line.served_by == "short")
    assert on_short >= 10                                # the short pool stayed in use (~4 req/s)
    # every replica decided and every one of them spilled: each read the pools itself
    spills = _router_total(fleet, "extproc_spillovers_total", from_pool="short", to_pool="long")
    assert all(n > 0 for n in spills), spills
    assert sum(spills) == len(spilled)
    # the short pool's queue stayed near its threshold: closed-loop clients without spillover
    # would keep ~CLIENTS - SHORT_SEQS waiting there
    waits = sorted(sampler.samples)
    assert len(waits) > 20
    print(f"short queue: {len(spilled)} spilled of {len(bodies)}, waiting p50={waits[len(waits) // 2]:.0f} "
          f"max={waits[-1]:.0f} (no spillover: ~{CLIENTS - SHORT_SEQS})")
    assert waits[len(waits) // 2] <= QUEUE_SHORT + 4     # measured 3 (the threshold 2, read every 0.1 s)
    assert waits[-1] < CLIENTS - SHORT_SEQS


def test_stale_metrics_spill_nothing(fleet):
    """The long engine stopped (SIGSTOP): its metrics stop answering, its reading goes stale, and
    no replica spills to it however long the short queue grows. A request that did spill would
    hang until SIGCONT and then show up in the access log as served by long."""
    long_engine = fleet.procs["engine-long"]
    held_before = sum(_router_total(fleet, "extproc_spillover_held_total", why="stale"))
    os.kill(long_engine.pid, signal.SIGSTOP)
    try:
        time.sleep(1.0)  # twice stale_s
        bodies = [("short", chat_body("Tell me about lighthouses.", max_tokens=16))] * 16
        statuses = _load(fleet, bodies, CLIENTS, deadline_s=20)
    finally:
        os.kill(long_engine.pid, signal.SIGCONT)
    assert set(statuses.values()) == {200}, statuses
    served = {i: line.served_by for i, line in _served(fleet, statuses).items()}
    assert set(served.values()) == {"short"}, served
    # the replicas saw the short pool under pressure and held the requests for want of a fresh reading
    assert sum(_router_total(fleet, "extproc_spillover_held_total", why="stale")) > held_before
    stale = _router_total(fleet, "extproc_pool_metrics_reads_total", pool="long", outcome="timeout")
    assert all(n > 0 for n in stale), stale
