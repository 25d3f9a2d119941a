"""The request path with the calibration shared through Redis, against the same without, in one run.

Two ``extproc serve`` routers, identical but for ``service.shared_state`` (a real redis-server on
loopback), each behind its own Envoy (ext_authz routing filter and the usage filter, as shipped),
in front of one minimal upstream (benchmarks/fast_upstream.py) whose answers carry usage. Every
response is read and learned (``usage_sample_rate: 1``, no per-second cap), so every request of
the shared router publishes a sample to the stream and applies it back from it: the worst case.
The same light load (one connection to each, one request at a time) goes through both,
interleaved request by request, so that whatever else loads the machine falls on both alike; with
``--stall``, shorter rounds go through both while Redis is stopped (SIGSTOP: it accepts nothing
and answers nothing). ``--aa``: both routers without shared state, the pair's own noise.

Reported: latency p50/p99 per router and the shared one's added share (target: within 5%), router
CPU µs per request, and what the shared router published and applied.

    .venv/bin/python benchmarks/shared_state.py [--requests N] [--rounds R] [--sizes B ...] [--stall]
"""

from __future__ import annotations

import argparse
import http.client
import pathlib
import shutil
import signal
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import yaml  # noqa: E402
from overhead import Processes, body_of, cpu_ns, pct, run_load, sample_text  # noqa: E402  (run_load: the warm-up)

from extproc.service.envoy_config import EnvoyLayout, render_yaml  # noqa: E402
from extproc.stack import _wait, envoy_binary, envoy_cluster_healthy, free_port  # noqa: E402


def metric(port: int, name: str, **labels) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(ln.rpartition(" ")[2]) for ln in text.splitlines()
               if ln.startswith(name) and ln[len(name):len(name) + 1] in " {" and all(w in ln for w in want))


def run_interleaved(ports: dict[str, int], body: bytes, n: int, seconds: float) -> dict[str, list[float]]:
    """``n`` requests through each port, one at a time in turn (one keep-alive connection each):
    whatever else loads the machine meanwhile falls on every kind alike."""
    conns = {k: http.client.HTTPConnection("127.0.0.1", p, timeout=30) for k, p in ports.items()}
    lat: dict[str, list[float]] = {k: [] for k in ports}
    deadline = time.monotonic() + seconds
    order = list(conns.items())
    for i in range(n):
        if time.monotonic() > deadline:
            break
        for kind, conn in (order if i % 2 else order[::-1]):  # (who goes first alternates too)
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            lat[kind].append(time.perf_counter() - t0)
            if resp.status != 200 or not data:
                raise RuntimeError(f"{kind}: status {resp.status}")
    for conn in conns.values():
        conn.close()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=20, help="time bound of one round")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 20_000], help="body sizes (bytes)")
    ap.add_argument("--stall", action="store_true", help="also rounds through the shared router with Redis stopped")
    ap.add_argument("--aa", action="store_true", help="control: both routers without shared state (the pair's noise)")
    args = ap.parse_args()
    redis_server = shutil.which("redis-server")
    if not redis_server:
        sys.exit("no redis-server (apt-get install redis-server)")
    text = sample_text(max(args.sizes) + 1)
    work = pathlib.Path(tempfile.mkdtemp(prefix="extproc-shared-state-"))
    children = Processes(work)
    spawn = children.spawn

    try:
        up_port, redis_port = free_port(), free_port()
        spawn([sys.executable, str(ROOT / "benchmarks" / "fast_upstream.py"), str(up_port), "0"], "upstream")
        redis = spawn([redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no"], "redis")
        routers, envoys = {}, {}
        for name in ("off", "on"):
            grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
            service = {"grpc_address": f"127.0.0.1:{grpc_port}", "http_address": f"127.0.0.1:{http_port}",
                       "metrics_address": f"127.0.0.1:{metrics_port}", "usage_sample_rate": 1.0,
                       "usage_samples_per_s": 1e6, "client_hash_key": "benchmark-client-hash-key"}
            if name == "on" and not args.aa:
                service["shared_state"] = f"redis://127.0.0.1:{redis_port}/0"
            cfg = work / f"router-{name}.yaml"
            cfg.write_text(yaml.safe_dump({"service": service}))
            proc = spawn([sys.executable, "-m", "extproc", "serve", "--config", str(cfg), "--log-level", "WARNING"],
                         f"router-{name}")
            routers[name] = (proc, metrics_port)
            port, admin = free_port(), free_port()
            layout = EnvoyLayout(listen_port=port, admin_port=admin, router_address=("127.0.0.1", grpc_port),
                                 router_http_address=("127.0.0.1", http_port), routing_filter="ext_authz",
                                 pools=(("short", "127.0.0.1", up_port), ("long", "127.0.0.1", up_port)),
                                 access_log_path="/dev/null")
            path = work / f"envoy-{name}.yaml"
            path.write_text(render_yaml(layout))
            envoys[name] = (port, spawn([envoy_binary(), "-c", str(path), "--concurrency", "1",
                                         "--use-dynamic-base-id", "-l", "error"], f"envoy-{name}"))
            _wait(lambda a=admin: urllib.request.urlopen(f"http://127.0.0.1:{a}/ready", timeout=1).status == 200,
                  f"envoy {name}", 60)
            _wait(lambda a=admin: envoy_cluster_healthy(a, "extproc_http") and envoy_cluster_healthy(a, "extproc"),
                  f"router {name} healthy in Envoy", 60, proc, work / f"router-{name}.log")
        for name in envoys:  # warm up: connections, the calibration phase, the stream
            run_load(envoys[name][0], body_of(1000, text, False), 100, 30)
        kinds = ["off", "on"] + (["off (beside the stall)", "on, Redis stalled"] if args.stall else [])
        print(f"two `extproc serve` routers (ext_authz), each behind its own Envoy (1 worker); {args.rounds} "
              "rounds, requests interleaved between them; every response read and learned"
              + (" [control: neither shares state]" if args.aa else "") + "\n")
        print(f"{'body':>6} {'shared state':<22} {'n':>5} | {'p50 ms':>7} {'p99 ms':>7} | {'added p50':>9} "
              f"{'p99':>7} | {'router CPU µs':>13}")
        for size in args.sizes:
            body = body_of(size, text, False)
            lat = {k: [] for k in kinds}
            cpu = {k: 0 for k in ("off", "on")}
            ports = {"off": envoys["off"][0], "on": envoys["on"][0]}
            for _ in range(args.rounds):
                c0 = {k: cpu_ns(routers[k][0].pid) for k in cpu}
                got = run_interleaved(ports, body, args.requests, args.seconds)
                for k in cpu:
                    cpu[k] += cpu_ns(routers[k][0].pid) - c0[k]
                    lat[k] += got[k]
                if args.stall:  # the shared router with Redis stopped, beside the one without
                    redis.send_signal(signal.SIGSTOP)
                    try:
                        got = run_interleaved(ports, body, args.requests // 4, args.seconds)
                    finally:
                        redis.send_signal(signal.SIGCONT)
                    lat["on, Redis stalled"] += got["on"]
                    lat["off (beside the stall)"] += got["off"]
            for kind in kinds:
                base_kind = "off (beside the stall)" if kind == "on, Redis stalled" else "off"
                base = (pct(lat[base_kind], 0.5), pct(lat[base_kind], 0.99))
                p50, p99 = pct(lat[kind], 0.5), pct(lat[kind], 0.99)
                added = "" if kind.startswith("off") else \
                    f"{100 * (p50 / base[0] - 1):>+8.1f}% {100 * (p99 / base[1] - 1):>+6.1f}%"
                us = f"{cpu[kind] / 1000 / max(1, len(lat[kind])):>13.0f}" if kind in cpu else ""
                print(f"{size // 1000:>4}KB {kind:<22} {len(lat[kind]):>5} | {p50 * 1e3:>7.3f} {p99 * 1e3:>7.3f} | "
                      f"{added:>17} | {us:>13}")
        on_metrics = routers["on"][1]
        counts = {o: int(metric(on_metrics, "extproc_shared_state_samples_total", outcome=o))
                  for o in ("published", "applied", "local", "dropped", "rejected")}
        print("\nshared router's samples: " + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f"; up now: {int(metric(on_metrics, 'extproc_shared_state_up'))}")
    finally:
        children.stop()


if __name__ == "__main__":
    main()
