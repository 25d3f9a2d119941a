"""Config reload in a real ``extproc serve`` process: SIGHUP and a change of the file apply pools,
spillover and header names to the next request (seen through the check endpoint's answer); an
invalid file and a restart-only change are refused with the field and the reason, and the running
config stays; every outcome is counted on /metrics."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from extproc.service.healthcheck import check as grpc_serving
from extproc.stack import DEFAULT_MODEL, free_port

# ~3,000 tokens of English: the short pool holds it at 8,192, not at 2,048
BODY = json.dumps({"model": DEFAULT_MODEL, "max_tokens": 16, "messages": [
    {"role": "user", "content": "the merchants wrote about river trade and prices " * 300}]}).encode()


class Served:
    def __init__(self, tmp_path, config_reload_s: float) -> None:
        self.path = tmp_path / "router.yaml"
        self.log = tmp_path / "router.log"
        self.grpc, self.http, self.metrics = free_port(), free_port(), free_port()
        self.doc = {"service": {"grpc_address": f"127.0.0.1:{self.grpc}", "http_address": f"127.0.0.1:{self.http}",
                                "metrics_address": f"127.0.0.1:{self.metrics}", "snapshot_path": "none",
                                "config_reload_s": config_reload_s}}
        self.write()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--config", str(self.path)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not grpc_serving(f"127.0.0.1:{self.grpc}", 0.5):
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "router not serving after 30 s"
            time.sleep(0.05)

    def write(self, **changes) -> None:
        for key, value in changes.items():
            section, _, name = key.partition("__")
            if name:
                self.doc.setdefault(section, {})[name] = value
            else:
                self.doc[section] = value
        self.path.write_text(yaml.safe_dump(self.doc))

    def check(self, body: bytes = BODY) -> dict[str, str]:
        """The check endpoint's answer headers for one request (what Envoy would copy upstream)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http, timeout=5)
        try:
            conn.request("POST", "/route/v1/chat/completions", body=body, headers={"content-type": "application/json"})
            reply = conn.getresponse()
            reply.read()
            assert reply.status == 200
            return {k.lower(): v for k, v in reply.getheaders()}
        finally:
            conn.close()

    def reloads(self, outcome: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f'extproc_config_reloads_total{{outcome="{outcome}"}}'):
                    return float(line.rpartition(" ")[2])
        return 0.0

    def wait_reloads(self, outcome: str, count: float, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.reloads(outcome) < count:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"no {outcome} reload {count:g} after {timeout:.0f}s:\n" + \
                self.log.read_text()[-2000:]
            time.sleep(0.05)

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def serve(tmp_path):
    """``serve(config_reload_s)``: a started router process, stopped at the end."""
    started = []

    def start(config_reload_s: float = 0.0) -> Served:  # 0: SIGHUP only, so a SIGHUP test sees its own reload
        started.append(Served(tmp_path, config_reload_s))
        return started[-1]
    try:
        yield start
    finally:
        for s in started:
            s.stop()


class MetricsPage:
    """A real HTTP server on loopback serving a vLLM /metrics page with ``waiting`` queued requests."""

    def __init__(self, waiting: int) -> None:
        body = (f'vllm:num_requests_waiting{{engine="0"}} {waiting}\n'
                f'vllm:num_requests_running{{engine="0"}} 1\nvllm:kv_cache_usage_perc{{engine="0"}} 0.1\n').encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pages():
    busy, idle = MetricsPage(waiting=50), MetricsPage(waiting=0)
    try:
        yield busy, idle
    finally:
        busy.close()
        idle.close()


def test_sighup_applies_pools_and_spillover_to_the_next_request(serve, pages):
    served = serve()
    assert served.check()["x-token-pool"] == "short"
    served.write(pools=[{"name": "small", "max_context": 2048}, {"name": "big", "max_context": 65536}])
    served.hup()
    served.wait_reloads("applied", 1)
    assert served.check()["x-token-pool"] == "big"
    tiny = json.dumps({"model": DEFAULT_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert served.check(tiny)["x-token-pool"] == "small"

    busy, idle = pages  # spillover turned on: the small pool's page shows a long queue
    served.write(service__spillover={"pools": {"small": {"endpoints": [busy.address], "queue_per_instance": 4},
                                               "big": {"endpoints": [idle.address]}}})
    served.hup()
    served.wait_reloads("applied", 2)
    deadline = time.monotonic() + 10
    while (answer := served.check(tiny))["x-token-pool"] != "big":  # once the new reader has read the pages
        assert time.monotonic() < deadline, f"no spill 10 s after the reload: {answer}"
        time.sleep(0.1)
    assert answer["x-token-spilled"] == "small"
    log = served.log.read_text()
    assert "config reloaded (SIGHUP)" in log and "service.spillover" in log

    served.write(service__spillover={})  # and off again
    served.hup()
    served.wait_reloads("applied", 3)
    assert served.check(tiny)["x-token-pool"] == "small"


def test_a_changed_file_is_picked_up_without_a_signal(serve):
    served = serve(config_reload_s=0.2)
    served.write(service__pool_header="x-llm-pool")
    served.wait_reloads("applied", 1)
    answer = served.check()
    assert answer["x-llm-pool"] == "short" and "x-token-pool" not in answer


def test_an_invalid_file_and_a_restart_only_change_are_refused_and_the_config_stays(serve):
    served = serve()
    served.write(pools=[{"name": "short", "max_context": 0}, {"name": "long", "max_context": 65536}])
    served.hup()
    served.wait_reloads("invalid", 1)
    log = served.log.read_text()
    assert "refused, the running config stays: invalid pools[0].max_context: must be between 1" in log, log[-2000:]
    assert served.check()["x-token-pool"] == "short"

    served.write(pools=[{"name": "short", "max_context": 2048}, {"name": "long", "max_context": 65536}],
                 service__grpc_address=f"127.0.0.1:{free_port()}", estimator={"kind": "paper-ema"})
    served.hup()
    served.wait_reloads("restart_required", 1)
    log = served.log.read_text()
    assert "service.grpc_address needs a restart (the gRPC server is bound to it)" in log, log[-2000:]
    assert "budget.estimator needs a restart" in log
    assert served.check()["x-token-pool"] == "short"  # the pools' change was refused with the rest
    assert grpc_serving(f"127.0.0.1:{served.grpc}", 2.0)
    assert served.reloads("applied") == 0
