"""`extproc serve` as a process and the service's ports across a stop: --log-level in any case (an
unknown one refused with exit 2), and every port bindable again the moment a stop returns — after
scrapes left connections in TIME_WAIT, and after a start that failed on a taken port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from extproc.config import parse_config
from extproc.service.app import Service
from extproc.service.healthcheck import check as grpc_serving
from extproc.stack import free_port


def _serve(tmp_path, *args: str, snapshot: bool = True, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`extproc serve` on free ports (``snapshot=False``: the file names no snapshot_path)."""
    grpc_port = free_port()
    config = tmp_path / "router.yaml"
    service = {"grpc_address": f"127.0.0.1:{grpc_port}", "http_address": f"127.0.0.1:{free_port()}",
               "metrics_address": f"127.0.0.1:{free_port()}"}
    if snapshot:
        service["snapshot_path"] = str(tmp_path / "calibration.json")
    config.write_text(yaml.safe_dump({"service": service}))
    proc = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc, grpc_port


def _wait_serving(proc: subprocess.Popen, grpc_port: int) -> None:
    deadline = time.monotonic() + 30
    while not grpc_serving(f"127.0.0.1:{grpc_port}", 0.5):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "router not serving after 30 s"
        time.sleep(0.05)


@pytest.mark.parametrize("level", ["info", "WARNING", "Debug"])
def test_serve_takes_a_log_level_in_any_case(tmp_path, level):
    proc, grpc_port = _serve(tmp_path, "--log-level", level)
    try:
        _wait_serving(proc, grpc_port)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 2  # idle: no grace period to wait out
        err = proc.stderr.read()
        assert ('"level": "info"' in err) == (level.lower() in ("info", "debug")), err[-1000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_serve_refuses_an_unknown_log_level(tmp_path):
    proc, _ = _serve(tmp_path, "--log-level", "loud")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "unknown level 'loud'" in err and "debug, info, warning, error, critical" in err, err
    assert "Traceback" not in err


def _bindable(port: int) -> bool:
    with socket.socket() as s:  # as a new router would bind it: with SO_REUSEADDR
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_every_port_is_free_the_moment_a_stop_returns(tmp_path):
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    config = parse_config({"service": {"grpc_address": f"127.0.0.1:{ports['grpc']}",
                                       "http_address": f"127.0.0.1:{ports['http']}",
                                       "metrics_address": f"127.0.0.1:{ports['metrics']}",
                                       "snapshot_path": str(tmp_path / "calibration.json")}})

    async def scenario() -> None:
        for _ in range(2):  # a second service on the same ports, right after the first stopped
            service = Service(config)
            await service.start()
            for _ in range(3):  # scrapes: the server closes, so its side waits in TIME_WAIT
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=2) as r:
                    assert r.status == 200
            t0 = time.monotonic()
            await service.stop()
            assert time.monotonic() - t0 < 1
            assert {name: _bindable(port) for name, port in ports.items()} == dict.fromkeys(ports, True)

        # a start that fails on a taken port leaves none of the others bound
        for taken, error in (("http", "HTTP check address"), ("grpc", "gRPC address")):
            with socket.socket() as squatter:
                squatter.bind(("127.0.0.1", ports[taken]))
                squatter.listen()
                with pytest.raises(OSError, match=error):
                    await Service(config).start()
            assert {name: _bindable(port) for name, port in ports.items()} == dict.fromkeys(ports, True), taken

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_bare_serve_keeps_its_calibration_in_the_state_directory(tmp_path):
    """No snapshot_path in the file: `extproc serve` saves under $XDG_STATE_HOME/extproc/ at stop
    and restores from there at the next start (the directory made on the way)."""
    state = tmp_path / "state"
    snapshot = state / "extproc" / "calibration.json"
    for run in range(2):
        proc, grpc_port = _serve(tmp_path, snapshot=False, env={**os.environ, "XDG_STATE_HOME": str(state)})
        try:
            _wait_serving(proc, grpc_port)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        err = proc.stderr.read()
        assert f"calibration saved to {snapshot}" in err, err[-2000:]
        assert (f"calibration restored from {snapshot}" in err) == (run == 1), err[-2000:]
        assert isinstance(json.loads(snapshot.read_text()), dict)
