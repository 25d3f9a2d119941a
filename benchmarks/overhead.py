"""What the router adds to a request: Envoy + router against Envoy alone, on the same machine and run.

Two Envoys run side by side with the same listener, routes and upstream — one with the router's
filters (header_mutation + ext_proc routing + ext_proc usage in observability mode), one
without — and the same light load (one connection, sequential requests) goes through each in
alternating rounds. The upstream is a minimal asyncio HTTP server (benchmarks/fast_upstream.py)
so that what differs between the two is the router. Reported per body size and mode:

* latency p50/p99 through each Envoy and the difference (what the router adds); for streams,
  time to first byte (TTFB) too;
* CPU µs per request of the router process and of each Envoy, read from /proc/<pid>/task/*/schedstat
  (nanosecond run-time counters) around each round.

    .venv/bin/python benchmarks/overhead.py [--requests N] [--rounds R] [--seconds S]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from extproc.service.envoy_config import EnvoyLayout, render_yaml  # noqa: E402
from extproc.stack import _wait, envoy_binary, envoy_cluster_healthy, free_port  # noqa: E402

TEXTS = ROOT.parent / "shared" / "data" / "texts" / "dev_texts.jsonl"


def cpu_ns(pid: int) -> int:
    total = 0
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def body_of(size: int, text: str, stream: bool, ask_usage: bool = True) -> bytes:
    doc = {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "max_tokens": 64,
           "messages": [{"role": "user", "content": text[:size]}]}
    if stream:
        doc["stream"] = True
        if ask_usage:
            doc["stream_options"] = {"include_usage": True}
    return json.dumps(doc, ensure_ascii=False).encode()


def run_load(port: int, body: bytes, n: int, seconds: float) -> tuple[list[float], list[float]]:
    """Sequential requests on one keep-alive connection: (latencies, times to first byte)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat, ttfb = [], []
    deadline = time.monotonic() + seconds
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        first = resp.read(1)
        t1 = time.perf_counter()
        rest = resp.read()
        t2 = time.perf_counter()
        if resp.status != 200 or not (first + rest):
            raise RuntimeError(f"status {resp.status}")
        ttfb.append(t1 - t0)
        lat.append(t2 - t0)
    conn.close()
    return lat, ttfb


def decisions(metrics_port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
        return sum(float(ln.rpartition(" ")[2]) for ln in resp.read().decode().splitlines()
                   if ln.startswith("extproc_decisions_total{"))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500, help="requests per round at 1 KB (fewer for larger bodies)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20, help="time bound of one round")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000], help="body sizes (bytes)")
    ap.add_argument("--chunk-delay-ms", type=float, default=0.0,
                    help="space the upstream's stream chunks (inter-token latency) so each is its own body chunk")
    ap.add_argument("--inject", action="store_true", help="streams without include_usage, router injecting it "
                    "(service.inject_stream_usage) and stripping the usage event")
    args = ap.parse_args()

    text = "\n".join(json.loads(line)["text"] for line in TEXTS.open()) if TEXTS.exists() else \
        "The quick brown fox jumps over the lazy dog. " * 30000
    while len(text) < 1_100_000:
        text += "\n" + text
    work = pathlib.Path(tempfile.mkdtemp(prefix="extproc-overhead-"))
    procs: list[subprocess.Popen] = []

    def spawn(argv, name):
        p = subprocess.Popen(argv, stdout=open(work / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        return p

    try:
        up_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        spawn([sys.executable, str(ROOT / "benchmarks" / "fast_upstream.py"), str(up_port), str(args.chunk_delay_ms)],
              "upstream")
        cfg = work / "router.yaml"
        cfg.write_text(yaml.safe_dump({"service": {"grpc_address": f"127.0.0.1:{grpc_port}",
                                                   "metrics_address": f"127.0.0.1:{metrics_port}",
                                                   "inject_stream_usage": args.inject}}))
        router = spawn([sys.executable, "-m", "extproc", "serve", "--config", str(cfg), "--log-level", "WARNING"],
                       "router")
        envoys = {}
        for name, with_router in (("envoy+router", True), ("envoy alone", False)):
            port, admin = free_port(), free_port()
            layout = EnvoyLayout(listen_port=port, admin_port=admin, router_address=("127.0.0.1", grpc_port),
                                 pools=(("short", "127.0.0.1", up_port), ("long", "127.0.0.1", up_port)),
                                 access_log_path="/dev/null")
            path = work / f"{name.replace(' ', '_').replace('+', '_')}.yaml"
            path.write_text(render_yaml(layout, with_router=with_router))
            proc = spawn([envoy_binary(), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
                          "-l", "error"], path.stem)
            envoys[name] = (port, admin, proc)
        import urllib.request

        for name, (port, admin, _) in envoys.items():
            _wait(lambda a=admin: urllib.request.urlopen(f"http://127.0.0.1:{a}/ready", timeout=1).status == 200,
                  name, 60)

        _wait(lambda: envoy_cluster_healthy(envoys["envoy+router"][1], "extproc"), "router health in Envoy", 60, router,
              work / "router.log")
        # warm up: connections, and past the per-model calibration phase (every response read until 50)
        run_load(envoys["envoy+router"][0], body_of(1000, text, False), 80, 30)
        run_load(envoys["envoy alone"][0], body_of(1000, text, False), 80, 30)

        print(f"router: grpc.aio ext_proc service, 1 Envoy worker each; {args.rounds} alternating rounds; "
              f"light load (1 connection, sequential)"
              + ("; streams without include_usage, router injecting it" if args.inject else "")
              + (f"; upstream stream chunks {args.chunk_delay_ms:g} ms apart" if args.chunk_delay_ms else "") + "\n")
        head = (f"{'body':>7} {'mode':<7} {'n':>5} | {'alone p50':>9} {'p99':>7} | {'+router p50':>11} {'p99':>7} | "
                f"{'added p50':>9} {'p99':>7} | {'router CPU':>10} {'envoy CPU':>9} {'alone CPU':>9}")
        print(head + "   (latency ms, CPU µs per request)")
        for size in args.sizes:
            for stream in (False, True):
                body = body_of(size, text, stream, ask_usage=not args.inject)
                n = max(30, args.requests * 1000 // size) if size > 1000 else args.requests
                lat = {k: [] for k in envoys}
                ttfb = {k: [] for k in envoys}
                cpu = {"router": 0, "envoy+router": 0, "envoy alone": 0}
                count = {k: 0 for k in envoys}
                decided = {k: 0.0 for k in envoys}
                for _ in range(args.rounds):
                    for name, (port, _, proc) in envoys.items():
                        d0 = decisions(metrics_port)
                        c0 = (cpu_ns(router.pid), cpu_ns(proc.pid))
                        lt, tf = run_load(port, body, n, args.seconds)
                        c1 = (cpu_ns(router.pid), cpu_ns(proc.pid))
                        decided[name] += decisions(metrics_port) - d0
                        lat[name] += lt
                        ttfb[name] += tf
                        count[name] += len(lt)
                        cpu[name] += c1[1] - c0[1]
                        if name == "envoy+router":
                            cpu["router"] += c1[0] - c0[0]
                a, r = "envoy alone", "envoy+router"
                us = {k: v / 1000 / max(1, count[r if k != a else a]) for k, v in cpu.items()}
                p = {k: (pct(v, 0.5) * 1e3, pct(v, 0.99) * 1e3) for k, v in lat.items()}
                label = f"{size // 1000}KB" if size < 1_000_000 else "1MB"
                print(f"{label:>7} {'stream' if stream else 'json':<7} {count[r]:>5} | {p[a][0]:>9.3f} {p[a][1]:>7.3f} | "
                      f"{p[r][0]:>11.3f} {p[r][1]:>7.3f} | {p[r][0] - p[a][0]:>9.3f} {p[r][1] - p[a][1]:>7.3f} | "
                      f"{us['router']:>10.0f} {us[r]:>9.0f} {us[a]:>9.0f}")
                if decided[r] < count[r]:  # fail-open requests cost nothing and would flatter the router
                    print(f"{'':>7} {'':<7} {'':>5}   WARNING: the router decided only {int(decided[r])} of "
                          f"{count[r]} requests (the rest failed open)")
                if stream:
                    ta, tr = pct(ttfb[a], 0.5) * 1e3, pct(ttfb[r], 0.5) * 1e3
                    print(f"{'':>7} {'':<7} {'':>5}   TTFB p50: alone {ta:.3f} ms, +router {tr:.3f} ms")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
            reads = [ln for ln in resp.read().decode().splitlines() if ln.startswith("extproc_usage_reads_total")]
        print("\nrouter usage reads over the run: " + "; ".join(reads))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
