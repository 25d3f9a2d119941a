"""`extproc up` survives a child's death: SIGKILL the router mid-load and no request is lost (Envoy
fails open to the largest pool while the stack restarts it, then routing resumes); an engine killed
is restarted and serves again; Envoy killed ends the stack, saying so. Also: every address is
printed, and a port given on the command line that is taken is moved, with a note.

One `extproc up` process for the module; the tests run in file order (the last one kills Envoy).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import aiohttp
import pytest
from e2e_helpers import MODEL, access_line, access_lines, chat_body, need_envoy, post, rid

from extproc.service.healthcheck import check as grpc_serving
from extproc.stack import envoy_counter, router_clusters, router_healthy_since

LOAD_REQUESTS = 3000      # at least this many, every one answered by a pool
LOAD_CONCURRENCY = 16
KILL_AFTER = 1000         # the router is SIGKILLed once this many have finished
AFTER_RESTART = 500       # and goes on for this many once Envoy's health checks see the new router,
SETTLE_S = 3.0            # from this long after that (Envoy may still fail open for a health-check
                          # round or two: seen once with every request of the first second failing open)
MAX_REQUESTS = 20_000
LOAD_BUDGET_S = 150.0


class UpProcess:
    """`extproc up` as a subprocess, its stdout collected line by line from a thread."""

    def __init__(self, argv: list[str], workdir) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<eof>")
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float, start: int = 0) -> tuple[re.Match, int]:
        """The first line from index ``start`` matching ``pattern``, and the index after it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    i += 1
                    if m:
                        return m, i
                if self.lines and self.lines[-1] == "<eof>":
                    raise AssertionError(f"extproc up ended without a line matching {pattern!r}:\n{self.text_unlocked()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} after {timeout:.0f}s:\n{self.text_unlocked()}")
                self._cond.wait(left)

    def text_unlocked(self) -> str:
        return "\n".join(self.lines)

    def pids(self) -> set[int]:
        """Every child pid the run has printed (first starts and restarts)."""
        return {int(p) for p in re.findall(r"pid (\d+)", self.text)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.pids():  # whatever a failed run left behind, by the pids it printed
            if self._ours(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def _ours(self, pid: int) -> bool:
        """Whether ``pid`` is still one of this run's children (not a reused pid): Envoy and the
        router name files in the workdir, an engine is extproc.engine on a printed pool port."""
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            return False
        if any(str(self.workdir) in arg for arg in cmdline):
            return True
        ports = set(re.findall(r"^pool \w+\s+http://127\.0\.0\.1:(\d+)", self.text, re.M))
        return "extproc.engine" in cmdline and any(
            a == "--port" and b in ports for a, b in zip(cmdline, cmdline[1:]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    need_envoy()
    workdir = tmp_path_factory.mktemp("up-supervised")
    taken = socket.socket()  # a port in use, given on the command line: the run must move it
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    run = UpProcess([sys.executable, "-m", "extproc", "up", "--time-scale", "0", "--workdir", str(workdir),
                     "--port", str(taken_port), "--admin-port", "0", "--grpc-port", "0", "--http-port", "0",
                     "--metrics-port", "0"], workdir)
    try:
        run.wait_line(r"^running; ", 120)
        text = run.text
        run.taken_port = taken_port
        run.listen_port = int(re.search(r"send OpenAI requests to\s+http://127\.0\.0\.1:(\d+)/", text)[1])
        run.admin_port = int(re.search(r"Envoy admin\s+http://127\.0\.0\.1:(\d+)/", text)[1])
        m = re.search(r"router gRPC\s+127\.0\.0\.1:(\d+) .*pid (\d+)\)", text)
        run.grpc_port, run.router_pid = int(m[1]), int(m[2])
        run.engine_pid = {p: int(pid) for p, pid in re.findall(r"pool (\w+)\s+http://\S+\s+\(.*pid (\d+)\)", text)}
        run.envoy_pid = int(re.search(r"Envoy admin .*\(pid (\d+);", text)[1])
        # what e2e_helpers' access-log readers need of a stack
        run.stack = SimpleNamespace(workdir=workdir, admin_port=run.admin_port, listen_port=run.listen_port)
        yield run
    finally:
        taken.close()
        run.stop()


def test_every_address_printed_and_a_taken_port_moved(up):
    text = up.text
    assert f"port {up.taken_port} (Envoy listener) is in use: using {up.listen_port} instead" in text, text
    for label in ("send OpenAI requests to", "Envoy admin", "router gRPC", "router checks", "router metrics",
                  "pool short", "pool long"):
        assert re.search(rf"^{label}\s+\S*127\.0\.0\.1:\d+", text, re.M), (label, text)
    assert grpc_serving(f"127.0.0.1:{up.grpc_port}")  # the printed gRPC port is the router's
    r = rid("addr")
    assert post(up.stack, chat_body("hi", max_tokens=4), r).status == 200
    assert access_line(up.stack, r).served_by == "short"


async def _load(url: str, kill, routing_again) -> tuple[list[tuple[str, float, object]], int, float]:
    """Short chats at LOAD_CONCURRENCY: ``kill()`` once KILL_AFTER have finished, then on until
    ``routing_again()`` (polled in a thread) has said yes and AFTER_RESTART more have finished;
    LOAD_REQUESTS at least, at most MAX_REQUESTS, within LOAD_BUDGET_S. Returns (request id, start
    time, status or error) per request, how many had finished at the kill, and when
    ``routing_again`` first said yes."""
    results: list[tuple[str, float, object]] = []
    killed_at: list[int] = []
    back: list[tuple[int, float]] = []  # (requests finished, time) when routing came back
    issued = 0

    def more() -> bool:
        if issued >= MAX_REQUESTS:
            return False
        if len(results) < LOAD_REQUESTS or not back:
            return True
        return len(results) < back[0][0] + AFTER_RESTART or time.monotonic() < back[0][1] + SETTLE_S + 1.0

    async def watch() -> None:
        while more():
            if killed_at and not back and await asyncio.to_thread(routing_again):
                back.append((len(results), time.monotonic()))
            await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=LOAD_CONCURRENCY)) as session:
        async def worker() -> None:
            nonlocal issued
            while more():
                i = issued
                issued += 1
                r = rid(f"load{i}")
                t = time.monotonic()
                try:
                    async with session.post(f"{url}/v1/chat/completions", headers={"x-request-id": r},
                                            json=chat_body(f"Question {i}: name a colour.", max_tokens=8)) as resp:
                        doc = await resp.json(content_type=None) if resp.status == 200 else await resp.text()
                        # answered by a pool: a simulated vLLM completion, not an Envoy error page
                        ok = resp.status == 200 and isinstance(doc, dict) and doc.get("model") == MODEL \
                            and doc.get("choices")
                        outcome = 200 if ok else f"{resp.status}: {str(doc)[:200]}"
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                results.append((r, t, outcome))
                if len(results) == KILL_AFTER:
                    kill()
                    killed_at.append(len(results))

        await asyncio.wait_for(asyncio.gather(watch(), *(worker() for _ in range(LOAD_CONCURRENCY))),
                               LOAD_BUDGET_S)
    return results, (killed_at or [0])[0], (back[0][1] if back else 0.0)


def test_router_sigkill_mid_load_loses_no_request_and_routing_resumes(up):
    mark = len(up.lines)
    restart = re.compile(r"^router restarted \(pid (\d+)\): ready ([\d.]+)s after it exited")
    successes: dict[str, int] = {}

    def routing_again() -> bool:
        """The restart is reported and Envoy's health checks have seen the new router since."""
        if not successes:
            if not any(restart.search(line) for line in up.lines[mark:]):
                return False
            successes.update({c: envoy_counter(up.admin_port, f"cluster.{c}.health_check.success")
                              for c in router_clusters("ext_authz")})
        return router_healthy_since(up.admin_port, successes)

    t0 = time.monotonic()
    results, killed_at, t_back = asyncio.run(_load(f"http://127.0.0.1:{up.listen_port}",
                                                   lambda: os.kill(up.router_pid, signal.SIGKILL), routing_again))
    elapsed = time.monotonic() - t0
    assert killed_at == KILL_AFTER, killed_at
    assert len(results) >= LOAD_REQUESTS and t_back, (len(results), t_back)
    bad = {r: s for r, _, s in results if s != 200}
    assert not bad, f"{len(bad)} of {len(results)} lost after the router was killed at #{killed_at}: " \
                    f"{dict(list(bad.items())[:5])}"
    m, _ = up.wait_line(restart.pattern, 1, mark)
    new_pid, ready_s = int(m[1]), float(m[2])
    assert new_pid != up.router_pid and _alive(new_pid)

    lines = access_lines(up.stack, [r for r, _, _ in results], wait=15)
    assert len(lines) == len(results)
    by_time = sorted((t, lines[r].served_by) for r, t, _ in results)
    before = [pool for t, pool in by_time[:KILL_AFTER - LOAD_CONCURRENCY]]
    after = [pool for t, pool in by_time if t > t_back + SETTLE_S]
    failed_open = sum(1 for _, pool in by_time if pool == "long")
    print(f"\n{len(results)} requests in {elapsed:.1f}s, router SIGKILLed after #{killed_at}: {len(bad)} lost, "
          f"{failed_open} failed open to the long pool; restarted, ready {ready_s:.1f}s after the kill; "
          f"of the {len(after)} requests sent {SETTLE_S:.0f} s after Envoy saw it healthy {after.count('short')} routed to short")
    assert set(before) == {"short"}, set(before)
    assert failed_open > 0  # really killed mid-load: some requests found no router and went long
    assert len(after) >= LOAD_CONCURRENCY and after.count("short") == len(after), after
    up.router_pid = new_pid


def test_engine_killed_is_restarted_and_serves_again(up):
    mark = len(up.lines)
    old = up.engine_pid["short"]
    os.kill(old, signal.SIGKILL)
    m, _ = up.wait_line(r"^engine-short restarted \(pid (\d+)\): ready ([\d.]+)s after it exited", 60, mark)
    new_pid = int(m[1])
    assert new_pid != old and _alive(new_pid)
    print(f"\nengine-short SIGKILLed: restarted and ready in {float(m[2]):.1f}s")
    ids = [rid(f"engine-back{i}") for i in range(20)]
    for r in ids:
        reply = post(up.stack, chat_body("hi", max_tokens=4), r)
        assert reply.status == 200, reply.body[:300]
    lines = access_lines(up.stack, ids)
    assert {line.served_by for line in lines.values()} == {"short"}, [line.raw for line in lines.values()]
    up.engine_pid["short"] = new_pid


def test_envoy_killed_ends_the_stack_saying_so(up):
    children = up.pids()
    os.kill(up.envoy_pid, signal.SIGKILL)
    up.wait_line(r"^stopped: Envoy exited \(killed by SIGKILL\)", 30)
    assert up.proc.wait(60) == 1
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)], up.text  # everything it started is gone
