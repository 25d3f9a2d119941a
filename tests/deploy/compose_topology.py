"""docker-compose.yml read as Compose reads it, and its CPU profile run without Docker.

There is no Docker engine here, so the compose services of a profile are started as local
processes, with what Compose would give them: the command and environment from the compose file
(``${VAR}`` from ``.env``), the image's ``ENV`` from the Dockerfile, the mounted files themselves.
What differs is only the network: every compose host name is 127.0.0.1 and every container port a
free local port; the Envoy config mounted into the Envoy container is that same file with its
addresses mapped so.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "service"))
from redis_server import need_redis, redis_ping  # noqa: E402

from extproc.service.healthcheck import check as router_serving
from extproc.stack import _http_ok, _wait, envoy_binary, envoy_cluster_healthy, free_port

REPO = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_FILE = REPO / ".env"
DOCKERFILE = REPO / "Dockerfile"
# Services of the compose file whose image has no local stand-in: the test reads their config
# files (prometheus.yml, Grafana provisioning) instead of running them.
NOT_RUN_LOCALLY = {"prometheus", "grafana"}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def dotenv(path: pathlib.Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines of a Compose ``.env`` file (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def interpolate(value, env: dict[str, str], missing: set[str] | None = None):
    """Compose's variable substitution over a loaded document: ``${VAR}``, ``${VAR:-default}``,
    ``$VAR``, ``$$``. Names with neither a value nor a default are added to ``missing``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, missing) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(3)
        if env.get(name):
            return env[name]
        if m.group(2) is not None:
            return m.group(2)
        if missing is not None and name not in env:
            missing.add(name)
        return env.get(name, "")
    return _VAR.sub(one, value)


def compose_doc(missing: set[str] | None = None) -> dict:
    """docker-compose.yml with ``.env`` substituted (YAML merge keys resolved by the loader)."""
    # Only .env (not this shell's variables, which Compose would also read): the tests check the
    # file as shipped.
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), dotenv(), missing)


def services(doc: dict, profile: str | None) -> dict[str, dict]:
    """The services ``docker compose --profile <profile> up`` starts."""
    return {name: svc for name, svc in doc["services"].items()
            if not svc.get("profiles") or (profile is not None and profile in svc["profiles"])}


def host_names(name: str, svc: dict) -> list[str]:
    """Names a service answers to on the compose network: its own and its aliases."""
    nets = svc.get("networks") or {}
    aliases = [a for net in (nets.values() if isinstance(nets, dict) else []) for a in (net or {}).get("aliases", [])]
    return [name, *aliases]


def dockerfile_env(path: pathlib.Path = DOCKERFILE) -> dict[str, str]:
    """``ENV`` of the image (``KEY=VALUE`` forms, continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def mounts(svc: dict, project: pathlib.Path, volumes_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Container path -> host path of a service's volumes (named volumes: a directory of ours)."""
    out = {}
    for spec in svc.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = (project / source).resolve()
        else:
            out[target] = volumes_dir / source
            out[target].mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Topology:
    """One profile's services as local processes. ``local(host, port)`` is where a compose
    address is reachable here."""

    workdir: pathlib.Path
    profile: str = "sim"
    doc: dict = field(default_factory=compose_doc)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    argv: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.services = services(self.doc, self.profile)
        self.run = {n: s for n, s in self.services.items() if n not in NOT_RUN_LOCALLY}
        self.names = {h: n for n, s in self.services.items() for h in host_names(n, s)}

    # -- the network ------------------------------------------------------------------------------
    def local(self, host: str, port: int) -> int:
        service = self.names.get(host, host)
        if (service, port) not in self.ports:
            self.ports[(service, port)] = free_port()
        return self.ports[(service, port)]

    def _address(self, service: str, value: str) -> str:
        """``host:port`` on the compose network -> 127.0.0.1 and the local port."""
        scheme, sep, rest = value.partition("://")
        if sep and scheme in ("redis", "rediss"):  # service.shared_state
            hostport, slash, db = rest.partition("/")
            return f"{scheme}://{self._address(service, hostport)}{slash}{db}"
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            return value
        if host in ("0.0.0.0", "127.0.0.1", "localhost"):
            return f"127.0.0.1:{self.local(service, int(port))}"
        if host in self.names:
            return f"127.0.0.1:{self.local(host, int(port))}"
        return value

    def _envoy_config(self, source: pathlib.Path) -> pathlib.Path:
        """The mounted Envoy config with its compose addresses mapped (nothing else changes)."""
        doc = yaml.safe_load(source.read_text())
        envoy = self._service_of(source)

        def walk(node):
            if isinstance(node, dict):
                sa = node.get("socket_address")
                if isinstance(sa, dict):
                    host, port = self._address(envoy, f"{sa['address']}:{sa['port_value']}").split(":")
                    sa["address"], sa["port_value"] = host, int(port)
                uri = node.get("uri")
                if isinstance(uri, str) and uri.startswith("http://"):
                    node["uri"] = "http://" + self._address(envoy, uri[len("http://"):])
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
        walk(doc)
        out = self.workdir / f"mapped-{source.name}"
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        return out

    def _service_of(self, path: pathlib.Path) -> str:
        for name, svc in self.run.items():
            if path in mounts(svc, REPO, self.workdir / "volumes").values():
                return name
        raise KeyError(path)

    # -- processes --------------------------------------------------------------------------------
    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        """The service's command and environment as run here."""
        svc = self.run[name]
        paths = mounts(svc, REPO, self.workdir / "volumes")
        env = dict(dockerfile_env()) if "build" in svc else {}
        env.update({k: str(v) for k, v in (svc.get("environment") or {}).items()})
        argv = list(svc["command"])

        def host_path(value: str) -> str:
            for target, source in sorted(paths.items(), key=lambda kv: -len(kv[0])):
                if value == target or value.startswith(target.rstrip("/") + "/"):
                    mapped = pathlib.Path(str(source) + value[len(target):])
                    if mapped.suffix in (".yaml", ".yml") and argv[0] == "envoy":
                        return str(self._envoy_config(mapped))
                    return str(mapped)
            return value

        out = []
        for i, arg in enumerate(argv):
            prev = argv[i - 1] if i else ""
            if prev == "--host":
                arg = "127.0.0.1"
            elif prev == "--port":
                arg = str(self.local(name, int(arg)))
            out.append(host_path(arg))
        env = {k: host_path(self._address(name, v)) for k, v in env.items()}
        if out[0] == "extproc":
            out = [sys.executable, "-m", "extproc", *out[1:]]
        elif out[0] == "envoy":
            # several Envoys may share this machine (other tests): a base id of its own
            out = [envoy_binary(), *out[1:], "--use-dynamic-base-id", "--concurrency", "1"]
        elif out[0] == "redis-server":
            out = [need_redis(), *out[1:], "--bind", "127.0.0.1"]
        else:
            raise ValueError(f"service {name}: no local stand-in for {out[0]!r}")
        return out, env

    def start(self) -> "Topology":
        try:
            order = sorted(self.run, key=lambda n: len(self.run[n].get("depends_on") or {}))
            for name in order:
                argv, env = self.command(name)
                self.argv[name] = argv
                log = open(self.workdir / f"{name}.log", "ab")
                self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                    env={**os.environ, **env}, cwd=self.workdir, start_new_session=True)
                self._wait_ready(name)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, name: str) -> None:
        proc, log = self.procs[name], self.workdir / f"{name}.log"
        argv = self.argv[name]
        if "serve-engine" in argv:
            port = int(argv[argv.index("--port") + 1])
            _wait(lambda: _http_ok(f"http://127.0.0.1:{port}/health"), name, 60, proc, log)
        elif "redis-server" in argv[0]:
            port = int(argv[argv.index("--port") + 1])
            _wait(lambda: redis_ping(port), name, 30, proc, log)
        elif "serve" in argv:
            _wait(lambda: router_serving(f"127.0.0.1:{self.local(name, 50051)}", 1.0), name, 60, proc, log)
        else:
            admin = self.local(name, 9901)
            _wait(lambda: _http_ok(f"http://127.0.0.1:{admin}/ready"), name, 60, proc, log)
            _wait(lambda: all(envoy_cluster_healthy(admin, c) for c in ("extproc", "extproc_http")),
                  "the router healthy in Envoy", 30, proc, log)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def scrape(self, host: str, port: int, path: str = "/metrics") -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.local(host, port)}{path}", timeout=5) as r:
            return r.read().decode()

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")
