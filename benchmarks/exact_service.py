"""Exact counts through the real service: router CPU per request and latency, exact off against on.

benchmarks/exact_counts.py replays the budget core alone; this runs what a deployment runs. Three
``extproc serve`` routers (exact counts off, on — the built-in local source — and off again, the
A/A control that shows the noise), each behind its own real Envoy (ext_authz check, the usage
filter reading the responses the router asks for), one fast upstream for all
(benchmarks/fast_upstream.py) that answers each request with its true prompt count as
``usage.prompt_tokens`` (sent as a header: the benchmark counted every body with the model's real
tokenizer and template), so the routers learn what vLLM would teach them. The same workload goes
through each Envoy in alternating rounds, one connection, requests one after another.

Reported per workload and mode: router CPU µs per request (from /proc/<pid>/task/*/schedstat, the
least over the rounds: the machine's other work only ever adds), its ratio to exact off, and the
median over the rounds of each round's ratio to the off round just before it (paired: a slow
stretch of the machine weighs on both); the
share of requests counted (the upstream echoes the router's ``x-token-exact``); latency p50/p99 of
all requests and of the counted ones (their added time is the difference to the same requests
with exact off); responses read per 1,000 requests (overflow and waste: exact_counts.py).

    .venv/bin/python benchmarks/exact_service.py [--requests N] [--rounds R] [--workloads azure-conv near]
"""

from __future__ import annotations

import argparse
import http.client
import pathlib
import statistics
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import yaml  # noqa: E402

import exact_counts as ec  # noqa: E402
from overhead import Processes, cpu_ns, pct  # noqa: E402

from extproc.service.envoy_config import EnvoyLayout, render_yaml  # noqa: E402
from extproc.stack import _wait, envoy_binary, envoy_cluster_healthy, free_port  # noqa: E402

MODES = {"off": {"enabled": False}, "local": {}, "off again": {"enabled": False}}


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        return sum(float(ln.rpartition(" ")[2]) for ln in resp.read().decode().splitlines()
                   if ln.startswith(name + "{") or ln.startswith(name + " "))


def send_all(port: int, reqs: list[dict], seconds: float) -> list[tuple[float, bool]]:
    """Each request once, in order: (latency s, counted exactly)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    deadline = time.monotonic() + seconds
    try:
        for r in reqs:
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", r["body"],
                         {"content-type": "application/json", "x-bench-prompt-tokens": str(r["prompt"])})
            resp = conn.getresponse()
            resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")
            out.append((dt, resp.getheader("x-bench-exact", "").startswith("local counted")))
    finally:
        conn.close()
    return out


def start(work: pathlib.Path, children: Processes, up_port: int) -> dict[str, dict]:
    stacks = {}
    for mode, exact in MODES.items():
        grpc, http_port, metrics = free_port(), free_port(), free_port()
        name = mode.replace(" ", "_")
        cfg = work / f"router_{name}.yaml"
        cfg.write_text(yaml.safe_dump({"service": {"grpc_address": f"127.0.0.1:{grpc}",
                                                   "http_address": f"127.0.0.1:{http_port}",
                                                   "metrics_address": f"127.0.0.1:{metrics}",
                                                   "snapshot_path": "none"}, "exact": exact}))
        router = children.spawn([sys.executable, "-m", "extproc", "serve", "--config", str(cfg), "--log-level",
                                 "WARNING"], f"router_{name}")
        port, admin = free_port(), free_port()
        layout = EnvoyLayout(listen_port=port, admin_port=admin, router_address=("127.0.0.1", grpc),
                             router_http_address=("127.0.0.1", http_port),
                             pools=(("short", "127.0.0.1", up_port), ("long", "127.0.0.1", up_port)),
                             access_log_path="/dev/null")
        path = work / f"envoy_{name}.yaml"
        path.write_text(render_yaml(layout, with_router=True))
        envoy = children.spawn([envoy_binary(), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
                                "-l", "error"], f"envoy_{name}")
        stacks[mode] = {"port": port, "admin": admin, "metrics": metrics, "router": router, "envoy": envoy,
                        "log": work / f"router_{name}.log"}
    for mode, s in stacks.items():
        _wait(lambda a=s["admin"]: urllib.request.urlopen(f"http://127.0.0.1:{a}/ready", timeout=1).status == 200,
              f"envoy ({mode})", 60)
        _wait(lambda a=s["admin"]: envoy_cluster_healthy(a, "extproc_http"), f"router health in Envoy ({mode})", 60,
              s["router"], s["log"])
    return stacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=120, help="time bound of one mode's round")
    ap.add_argument("--workloads", nargs="+", default=["azure-conv", "near"], choices=ec.WORKLOADS)
    args = ap.parse_args()
    for need in (ec.rq.DEFAULT_TEXTS, ec.TRACES / "azure_llm_2023_conv.csv", ec.TRACES / "mooncake_conversation.jsonl"):
        if not need.exists():
            sys.exit(f"SKIP: {need} not found (the shared data set is needed)")
    t0 = time.time()
    loads = ec.workloads(args.requests, args.seed, names=tuple(args.workloads))
    print(f"{args.requests} requests per workload, built and counted in {time.time() - t0:.1f}s; seed {args.seed}; "
          f"{args.rounds} alternating rounds; 1 connection per Envoy, sequential", flush=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="extproc-exact-service-"))
    children = Processes(work)
    try:
        up_port = free_port()
        children.spawn([sys.executable, str(ROOT / "benchmarks" / "fast_upstream.py"), str(up_port)], "upstream")
        stacks = start(work, children, up_port)
        print(f"\n{'workload':<11} {'exact':<10} {'n':>5} {'counted%':>8} {'CPU µs/r':>9} {'ratio':>6} {'paired':>6} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'counted p50':>11} {'p99':>6} {'+p50':>6} {'+p99':>6} {'reads':>6}",
              flush=True)
        for name, reqs in loads.items():
            for s in stacks.values():  # the calibration phase (every response read) and warm paths
                send_all(s["port"], reqs[:ec.CALIBRATION_SAMPLES * 2], args.seconds)
            cpu = {m: [] for m in stacks}
            lat: dict[str, list[list[float]]] = {m: [] for m in stacks}
            counted: dict[str, list[bool]] = {m: [] for m in stacks}
            reads = {m: 0.0 for m in stacks}
            for _ in range(args.rounds):
                for mode, s in stacks.items():
                    r0, c0 = metric(s["metrics"], "extproc_usage_reads_total"), cpu_ns(s["router"].pid)
                    got = send_all(s["port"], reqs, args.seconds)
                    cpu[mode].append((cpu_ns(s["router"].pid) - c0) / max(1, len(got)))
                    reads[mode] += metric(s["metrics"], "extproc_usage_reads_total") - r0
                    lat[mode].append([g[0] for g in got])
                    counted[mode] = [g[1] for g in got] if not counted[mode] else \
                        [a or b for a, b in zip(counted[mode], (g[1] for g in got))]
            base = min(cpu["off"])
            which = counted["local"]  # the requests the exact router counted (in any round)
            for mode in stacks:
                all_ms = [x * 1e3 for run in lat[mode] for x in run]
                mine = [x * 1e3 for run in lat[mode] for x, c in zip(run, which) if c]
                off = [x * 1e3 for run in lat["off"] for x, c in zip(run, which) if c]
                n = len(lat[mode][0])
                share = 100 * sum(which[:n]) / max(1, n) if mode == "local" else 0.0
                added = (pct(mine, 0.5) - pct(off, 0.5), pct(mine, 0.99) - pct(off, 0.99))
                paired = statistics.median(c / o for c, o in zip(cpu[mode], cpu["off"]))
                print(f"{name:<11} {mode:<10} {n:>5} {share:>8.2f} {min(cpu[mode]) / 1000:>9.0f} "
                      f"{min(cpu[mode]) / base:>6.3f} {paired:>6.3f} {pct(all_ms, 0.5):>7.2f} {pct(all_ms, 0.99):>7.2f} "
                      f"{pct(mine, 0.5):>11.2f} {pct(mine, 0.99):>6.2f} {added[0]:>6.2f} {added[1]:>6.2f} "
                      f"{1000 * reads[mode] / (args.rounds * max(1, n)):>6.0f}", flush=True)
        print("\ncounted p50/p99: latency of the requests the exact router counted, through each Envoy; "
              "+p50/+p99: that less the same requests' with exact off")
    finally:
        children.stop()


if __name__ == "__main__":
    main()
