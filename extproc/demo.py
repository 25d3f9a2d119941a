"""``extproc up``: the local stack, a short demo through it, then serve until Ctrl-C.

While it runs, a router or engine that dies is restarted (``Stack.supervise``: bounded restarts
with backoff; Envoy fails open meanwhile); Envoy dying, or a child that keeps dying, ends the
stack and says why. Every address is printed, with a note for each port that was taken and moved.

The demo replays real request bodies (../shared/data/requests when present, else the bundled
sample) plus long conversations stacked from them, some streamed, through Envoy; then prints
requests per pool, misroutes, and how calibration moved, read from the router's own metrics.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import random
import signal
import tempfile
import time
import urllib.request

from .samples import long_requests, request_rows
from .service.check import CHECK_PREFIX
from .stack import Stack, choose_ports

# What `extproc up` binds unless told otherwise: the ports the README and envoy/envoy.yaml use.
DEFAULT_PORTS = {"listen": 10000, "admin": 9901, "grpc": 50051, "http": 50052, "metrics": 9464}
PORT_NAMES = {"listen": "Envoy listener", "admin": "Envoy admin", "grpc": "router gRPC",
              "http": "router checks", "metrics": "router metrics"}


def scrape(url: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (our own metrics only)."""
    with urllib.request.urlopen(url, timeout=2) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("extproc_") and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def _sum(metrics: dict[str, float], prefix: str, **labels: str) -> float:
    total = 0.0
    for key, value in metrics.items():
        if key.startswith(prefix + "{") or key == prefix:
            if all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += value
    return total


async def replay(stack: Stack, rows: list[dict], concurrency: int = 8, timeout_s: float = 120) -> dict:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    rng = random.Random(1)

    async def one(session: aiohttp.ClientSession, row: dict) -> None:
        body = dict(row["body"])
        body["model"] = stack.model  # the simulated engines serve one model name
        path = row.get("path") or ("/v1/completions" if "prompt" in body else "/v1/chat/completions")
        if "messages" in body and rng.random() < 0.4:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        async with sem:
            t0 = time.perf_counter()
            try:
                async with session.post(stack.url + path, json=body) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                statuses[0] = statuses.get(0, 0) + 1
            latencies.append(time.perf_counter() - t0)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.wait_for(asyncio.gather(*(one(session, r) for r in rows)), timeout_s)
    latencies.sort()
    return {"statuses": statuses, "p50_s": latencies[len(latencies) // 2] if latencies else 0.0}


def run_demo(stack: Stack, rows: list[dict]) -> None:
    before = scrape(stack.metrics_url)
    t0 = time.time()
    result = asyncio.run(replay(stack, rows))
    time.sleep(0.5)  # the usage filter reports asynchronously
    after = scrape(stack.metrics_url)
    pools = [p.name for p in stack.config.budget.pools]
    print(f"\ndemo: {len(rows)} requests in {time.time() - t0:.1f}s, HTTP statuses "
          f"{dict(sorted(result['statuses'].items()))}, p50 latency {1000 * result['p50_s']:.0f} ms")
    for pool in pools:
        n = _sum(after, "extproc_decisions_total", pool=pool) - _sum(before, "extproc_decisions_total", pool=pool)
        print(f"  routed to {pool:<6} {int(n):>4}")
    for reason in ("fits", "too_large", "unreadable"):
        n = _sum(after, "extproc_decisions_total", reason=reason) - _sum(before, "extproc_decisions_total", reason=reason)
        if n:
            print(f"  reason {reason:<10} {int(n):>4}")
    mis = _sum(after, "extproc_misroutes_total") - _sum(before, "extproc_misroutes_total")
    spill = _sum(after, "extproc_spillovers_total") - _sum(before, "extproc_spillovers_total")
    reads = {o: int(_sum(after, "extproc_usage_reads_total", outcome=o) - _sum(before, "extproc_usage_reads_total", outcome=o))
             for o in ("json", "stream", "stream_missed", "context_error")}
    print(f"  misroutes (a pool too small for its request: vLLM refused or clamped it): {int(mis)}; spillovers: {int(spill)}")
    print(f"  usage read from responses: {reads}")
    model = stack.model
    n0 = _sum(before, "extproc_calibration_samples", model=model)
    n1 = _sum(after, "extproc_calibration_samples", model=model)
    print(f"  calibration of {model}: samples {int(n0)} -> {int(n1)}")
    print("    learned group scales (prior = 1.0; turns = template tokens per message): " + ", ".join(
        f"{g} {_sum(after, 'extproc_calibration_scale', model=model, group=g):.3f}"
        for g in ("latin", "digits", "space", "punct", "turns")))
    print("    routing margin by kind (the prior's until requests of >= 2048 tokens are seen): " + ", ".join(
        f"{k} {100 * _sum(after, 'extproc_calibration_margin_ratio', model=model, kind=k):.1f}%"
        for k in ("prose", "code", "cjk")))


def print_addresses(stack: Stack) -> None:
    """Every address the stack listens on, with the process behind it."""
    wd = stack.workdir
    pid = {name: proc.pid for name, proc in stack.procs.items()}
    print(f"send OpenAI requests to  {stack.url}/v1/chat/completions  (model {stack.model})")
    print(f"Envoy admin              http://127.0.0.1:{stack.admin_port}/  (pid {pid.get('envoy')}; "
          f"access log {wd / 'access.log'})")
    print(f"router gRPC              127.0.0.1:{stack.grpc_port}  (ext_proc, Envoy's access-log stream, "
          f"grpc.health.v1, operator API; pid {pid.get('router')})")
    if stack.config.service.routing_filter == "ext_authz":
        print(f"router checks            http://127.0.0.1:{stack.http_port}{CHECK_PREFIX}  (Envoy's ext_authz; "
              f"GET /healthz)")
    print(f"router metrics           {stack.metrics_url}")
    for pool in stack.config.budget.pools:
        print(f"pool {pool.name:<6}              {stack.pool_url(pool.name)}  (simulated vLLM, {pool.max_context} "
              f"tokens, /metrics; pid {pid.get(f'engine-{pool.name}')})")


def up(config_path: str | None, demo: bool, exit_after: bool, time_scale: float, workdir: str | None,
       ports: dict[str, int | None] | None = None) -> int:
    """``ports``: {listen, admin, grpc, http, metrics} -> port to use (None: DEFAULT_PORTS; 0: any
    free port); a port that is taken is replaced by a free one, and the run says so."""
    wd = pathlib.Path(workdir or tempfile.mkdtemp(prefix="extproc-up-"))
    wanted = {PORT_NAMES[k]: (DEFAULT_PORTS[k] if (ports or {}).get(k) is None else ports[k]) for k in DEFAULT_PORTS}
    chosen, moved = choose_ports(wanted)
    by_key = {k: chosen[PORT_NAMES[k]] for k in DEFAULT_PORTS}
    stack = Stack(wd, config_path=config_path, time_scale=time_scale, listen_port=by_key["listen"],
                  admin_port=by_key["admin"], grpc_port=by_key["grpc"], http_port=by_key["http"],
                  metrics_port=by_key["metrics"], quiet=True)
    for line in moved:
        print(line, flush=True)
    print(f"starting Envoy, router and {len(stack.pool_ports)} simulated pools (logs in {wd}) ...", flush=True)

    def handler(*_):
        raise KeyboardInterrupt  # out of a start or demo in progress; `finally` stops the children
    signal.signal(signal.SIGTERM, handler)
    try:
        stack.start()
        print_addresses(stack)
        supervisor = stack.supervise()
        if demo:
            rows, label = request_rows([])
            rows = rows[:80] + long_requests(rows, count=6)
            print(f"\nreplaying {len(rows)} requests from {label} plus long conversations ...", flush=True)
            run_demo(stack, rows)
        if exit_after:
            return 0
        print("\nrunning; a router or engine that dies is restarted; Ctrl-C stops everything", flush=True)
        while not supervisor.failed.wait(0.2):
            pass
        print(f"stopped: {supervisor.reason}", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping ...", flush=True)
        stack.stop()
