"""A real redis-server (Debian's package) on a free loopback port, for the shared-state tests:
no persistence (``--save ''``, ``--appendonly no``: a restart comes back empty, the hard case),
started and stopped by its own PID."""

from __future__ import annotations

import pathlib
import shutil
import signal
import socket
import subprocess
import time

import pytest

from extproc.stack import free_port


def need_redis() -> str:
    found = shutil.which("redis-server") or (pathlib.Path("/usr/bin/redis-server").is_file() and "/usr/bin/redis-server")
    if not found:
        pytest.skip("no redis-server (apt-get install redis-server): the shared-state tests run a real one")
    return found


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, workdir: pathlib.Path, port: int | None = None) -> None:
        self.binary = need_redis()
        self.workdir = pathlib.Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        return redis_ping(self.port)

    def kill(self) -> None:
        """SIGKILL, as a crashed Redis: its data is gone (no persistence)."""
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None
