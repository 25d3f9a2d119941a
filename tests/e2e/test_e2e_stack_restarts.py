"""The stack's restart policy with real child processes but no Envoy (fast): a child that keeps
dying is restarted after a backoff that doubles, at most max_restarts times in the window, then
the supervisor gives up saying why; a child whose restart stays up is reported ready; Envoy
exiting ends the stack at once."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

from extproc.stack import RestartPolicy, Supervisor

POLICY = RestartPolicy(max_restarts=3, window_s=60, first_backoff_s=0.05, max_backoff_s=0.15, poll_s=0.01)


class FakeStack:
    """What the supervisor uses of a Stack; the router and the engine are short Python processes."""

    def __init__(self, workdir, router_lives: bool = False) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.engine_pools = ["short"]
        self.router_lives = router_lives
        self.spawned: list[tuple[str, float]] = []

    def _spawn(self, name: str, code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code])
        self.procs[name] = proc
        self.spawned.append((name, time.monotonic()))
        return proc

    def spawn_router(self) -> subprocess.Popen:
        # dies at once, unless router_lives: then it stays up (until the test ends it)
        return self._spawn("router", "import time; time.sleep(30)" if self.router_lives else "raise SystemExit(3)")

    def router_ready(self) -> bool:  # one that dies at start never answers its health check
        return self.router_lives and self.procs["router"].poll() is None

    def spawn_engine(self, pool: str) -> subprocess.Popen:
        return self._spawn(f"engine-{pool}", "import time; time.sleep(30)")

    def engine_ready(self, pool: str) -> bool:
        return True

    def stop_process(self, name: str, sig=None, timeout: float = 5) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop_process(name)


def _supervised(stack: FakeStack) -> tuple[Supervisor, list[str]]:
    said: list[str] = []
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            said.append(line)
    stack.spawn_engine("short")
    stack._spawn("envoy", "import time; time.sleep(30)")
    supervisor = Supervisor(stack, POLICY, say)
    supervisor.start()
    return supervisor, said


def test_a_child_that_keeps_dying_is_restarted_with_backoff_then_given_up(tmp_path):
    stack = FakeStack(tmp_path)
    stack.spawn_router()
    supervisor, said = _supervised(stack)
    try:
        assert supervisor.failed.wait(10), said
    finally:
        supervisor.stop()
        stack.stop_all()
    deaths = [line for line in said if line.startswith("router")]
    backoffs = [float(m[1]) for line in deaths if (m := re.search(r"restarting in ([\d.]+)s", line))]
    assert backoffs == [0.05, 0.1, 0.15], said  # doubling, capped at max_backoff_s
    starts = [t for name, t in stack.spawned if name == "router"]
    assert len(starts) == 1 + POLICY.max_restarts, said  # the first start and three restarts, no more
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] >= 0.05 and gaps[-1] >= 0.15, gaps  # the backoff doubles up to its cap
    assert "router exited again at start (exit code 3)" in supervisor.reason
    assert "died 4 times in 60s: giving up" in supervisor.reason, supervisor.reason
    assert not [line for line in said if line.startswith("engine-short")]  # the healthy engine was left alone


def test_a_restart_that_stays_up_is_reported_ready(tmp_path):
    stack = FakeStack(tmp_path, router_lives=True)
    stack.spawn_router()
    supervisor, said = _supervised(stack)
    try:
        stack.procs["router"].kill()
        deadline = time.monotonic() + 10
        while not any(line.startswith("router restarted") for line in said) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert supervisor.restarts("router") == 1, said
        assert not supervisor.failed.is_set()
        assert re.search(r"^router \(pid \d+\) exited \(killed by SIGKILL\); restarting in 0\.05s \(restart 1 of "
                         r"at most 3 in 60s", said[0]), said
        assert "Envoy fails open meanwhile" in said[0]
        assert re.search(r"^router restarted \(pid \d+\): ready [\d.]+s after it exited", said[1]), said

        stack.procs["envoy"].kill()  # Envoy gone: the stack ends, saying so
        assert supervisor.failed.wait(5)
        assert supervisor.reason.startswith("Envoy exited (killed by SIGKILL): nothing serves without it")
    finally:
        supervisor.stop()
        stack.stop_all()
