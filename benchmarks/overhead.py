"""What the router adds to a request: Envoy + router against Envoy alone, on the same machine and run.

Envoys run side by side with the same listener, routes and upstream — one per routing filter
(``ext_authz``: an HTTP check with the body; ``ext_proc``: a gRPC stream per request; each with
the early header mutation and the usage filter in observability mode), all talking to one
router, and one without the router — and the same light load (one connection, sequential
requests) goes through each in alternating rounds. The upstream is a minimal asyncio HTTP server (benchmarks/fast_upstream.py)
so that what differs between the two is the router. Reported per body size and mode:

* latency p50/p99 through each Envoy and the difference (what the router adds); for streams,
  time to first byte (TTFB) too;
* CPU µs per request of the router process and of each Envoy, read from /proc/<pid>/task/*/schedstat
  (nanosecond run-time counters) around each round.

    .venv/bin/python benchmarks/overhead.py [--requests N] [--rounds R] [--seconds S] [--filters ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import pathlib
import signal
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


def sample_text(min_chars: int) -> str:
    """The shared dev texts joined (a stand-in sentence where they are absent), at least this long."""
    text = "\n".join(json.loads(line)["text"] for line in TEXTS.open()) if TEXTS.exists() else \
        "The quick brown fox jumps over the lazy dog. " * 30000
    while len(text) < min_chars:
        text += "\n" + text
    return text


class Processes:
    """The child processes of one run, each logged to a file in ``work``; ``stop`` ends them all by
    their own PIDs (SIGCONT first: a run may have stopped one on purpose)."""

    def __init__(self, work: pathlib.Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=open(self.work / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGCONT)
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


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
    ap.add_argument("--filters", nargs="+", default=["ext_authz", "ext_proc"], choices=["ext_authz", "ext_proc"],
                    help="routing filters to measure")
    args = ap.parse_args()
    if args.inject:
        args.filters = ["ext_proc"]  # injection needs the routing stream

    text = sample_text(1_100_000)
    work = pathlib.Path(tempfile.mkdtemp(prefix="extproc-overhead-"))
    children = Processes(work)
    spawn = children.spawn

    try:
        up_port, grpc_port, http_port, metrics_port = free_port(), free_port(), free_port(), free_port()
        spawn([sys.executable, str(ROOT / "benchmarks" / "fast_upstream.py"), str(up_port), str(args.chunk_delay_ms)],
              "upstream")
        cfg = work / "router.yaml"
        service = {"grpc_address": f"127.0.0.1:{grpc_port}", "http_address": f"127.0.0.1:{http_port}",
                   "metrics_address": f"127.0.0.1:{metrics_port}"}
        if "ext_authz" not in args.filters:  # (the router's gRPC side serves ext_proc routing streams either way)
            service.update(routing_filter="ext_proc", inject_stream_usage=args.inject)
        cfg.write_text(yaml.safe_dump({"service": service}))
        router = spawn([sys.executable, "-m", "extproc", "serve", "--config", str(cfg), "--log-level", "WARNING"],
                       "router")
        envoys = {}
        for name in [*args.filters, "envoy alone"]:
            port, admin = free_port(), free_port()
            layout = EnvoyLayout(listen_port=port, admin_port=admin, router_address=("127.0.0.1", grpc_port),
                                 router_http_address=("127.0.0.1", http_port),
                                 routing_filter=name if name in args.filters else "ext_authz",
                                 pools=(("short", "127.0.0.1", up_port), ("long", "127.0.0.1", up_port)),
                                 access_log_path="/dev/null")
            path = work / f"{name.replace(' ', '_')}.yaml"
            path.write_text(render_yaml(layout, with_router=name in args.filters))
            proc = spawn([envoy_binary(), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
                          "-l", "error"], path.stem)
            envoys[name] = (port, admin, proc)
        import urllib.request

        for name, (port, admin, _) in envoys.items():
            _wait(lambda a=admin: urllib.request.urlopen(f"http://127.0.0.1:{a}/ready", timeout=1).status == 200,
                  name, 60)

        for name in args.filters:
            cluster = "extproc_http" if name == "ext_authz" else "extproc"
            _wait(lambda n=name, c=cluster: envoy_cluster_healthy(envoys[n][1], c), f"router health in Envoy ({name})",
                  60, router, work / "router.log")
        # warm up: connections, and past the per-model calibration phase (every response read until 50)
        for name in envoys:
            run_load(envoys[name][0], body_of(1000, text, False), 80, 30)

        print(f"router: one `extproc serve`; 1 Envoy worker each; {args.rounds} alternating rounds; "
              f"light load (1 connection, sequential)"
              + ("; streams without include_usage, router injecting it" if args.inject else "")
              + (f"; upstream stream chunks {args.chunk_delay_ms:g} ms apart" if args.chunk_delay_ms else "") + "\n")
        head = (f"{'body':>7} {'mode':<7} {'filter':<9} {'n':>5} | {'alone p50':>9} {'p99':>7} | {'+router p50':>11} "
                f"{'p99':>7} | {'added p50':>9} {'p99':>7} | {'router CPU':>10} {'envoy CPU':>9} {'alone CPU':>9}")
        print(head + "   (latency ms, CPU µs per request)")
        a = "envoy alone"
        for size in args.sizes:
            for stream in (False, True):
                body = body_of(size, text, stream, ask_usage=not args.inject)
                n = max(30, args.requests * 1000 // size) if size > 1000 else args.requests
                lat = {k: [] for k in envoys}
                ttfb = {k: [] for k in envoys}
                cpu = {k: 0 for k in envoys}
                router_cpu = {k: 0 for k in envoys}
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
                        router_cpu[name] += c1[0] - c0[0]
                label = f"{size // 1000}KB" if size < 1_000_000 else "1MB"
                pa = (pct(lat[a], 0.5) * 1e3, pct(lat[a], 0.99) * 1e3)
                for r in args.filters:
                    us = {k: v[r] / 1000 / max(1, count[r]) for k, v in (("router", router_cpu), ("envoy", cpu))}
                    alone_us = cpu[a] / 1000 / max(1, count[a])
                    pr = (pct(lat[r], 0.5) * 1e3, pct(lat[r], 0.99) * 1e3)
                    print(f"{label:>7} {'stream' if stream else 'json':<7} {r:<9} {count[r]:>5} | {pa[0]:>9.3f} "
                          f"{pa[1]:>7.3f} | {pr[0]:>11.3f} {pr[1]:>7.3f} | {pr[0] - pa[0]:>9.3f} {pr[1] - pa[1]:>7.3f} | "
                          f"{us['router']:>10.0f} {us['envoy']:>9.0f} {alone_us:>9.0f}")
                    if decided[r] < count[r]:  # fail-open requests cost nothing and would flatter the router
                        print(f"{'':>7} {'':<7} {'':<9} {'':>5}   WARNING: the router decided only {int(decided[r])} of "
                              f"{count[r]} requests (the rest failed open)")
                    if stream:
                        ta, tr = pct(ttfb[a], 0.5) * 1e3, pct(ttfb[r], 0.5) * 1e3
                        print(f"{'':>7} {'':<7} {'':<9} {'':>5}   TTFB p50: alone {ta:.3f} ms, +router {tr:.3f} ms")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
            reads = [ln for ln in resp.read().decode().splitlines() if ln.startswith("extproc_usage_reads_total")]
        print("\nrouter usage reads over the run: " + "; ".join(reads))
    finally:
        children.stop()


if __name__ == "__main__":
    main()
