"""Graceful stop: SIGTERM the router mid-stream (with either routing filter); the stream completes
intact for the client, the router waits for it, exits 0 within its grace period and leaves a
calibration snapshot. An idle router, with Envoy's access-log stream and idle usage streams
connected, exits at once; a stream longer than the grace period holds the stop no longer than
that; a router started right after binds all its ports."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.request

import pytest
from e2e_helpers import MODEL, access_line, chat_body, ensure_router, post, rid, start_router

GRACE_S = 15.0
OUTPUT_TOKENS = 100
IDLE_EXIT_S = 1.0  # an idle router's SIGTERM to exit (measured ~0.12 s; it was the full 30 s grace)


@pytest.fixture(scope="module", params=["ext_authz", "ext_proc"])
def slow(make_stack, request):
    # ~20 ms per token unscaled: at 0.5 the stream below lasts about a second
    return make_stack(f"sigterm-{request.param}", {"service": {
        "grace_period_s": GRACE_S, "snapshot_interval_s": 3600, "routing_filter": request.param}}, time_scale=0.5)


def _parse_sse(raw: bytes) -> list:
    events = []
    assert raw.endswith(b"\n\n"), raw[-200:]
    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block[:200]
        payload = block[6:]
        events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def _stream_in_thread(stack, request_id: str, output_tokens: int) -> tuple[threading.Thread, threading.Event, dict]:
    """A streamed chat through Envoy in a thread: (thread, set at the first bytes, what it got)."""
    first_bytes = threading.Event()
    got: dict = {}

    def stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=60)
        try:
            body = chat_body("Tell me a story about a patient lighthouse keeper.", max_tokens=output_tokens,
                             stream=True, stream_options={"include_usage": True})
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"content-type": "application/json", "x-request-id": request_id})
            resp = conn.getresponse()
            got["status"] = resp.status
            parts = []
            for _ in range(100_000):
                chunk = resp.read1(65536)
                if not chunk:
                    break
                parts.append(chunk)
                first_bytes.set()
            got["body"] = b"".join(parts)
            got["t_end"] = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            got["error"] = repr(exc)
        finally:
            first_bytes.set()
            conn.close()

    t = threading.Thread(target=stream)
    t.start()
    return t, first_bytes, got


def _assert_stream_intact(got: dict, output_tokens: int) -> None:
    assert "error" not in got, got.get("error")
    assert got["status"] == 200
    events = _parse_sse(got["body"])
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == output_tokens
    usage = [c["usage"] for c in chunks if not c["choices"] and c.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == output_tokens


def test_sigterm_mid_stream_drains_and_saves(slow):
    stack = slow
    ensure_router(stack)
    snapshot = stack.workdir / "calibration.json"
    snapshot.unlink(missing_ok=True)
    r = rid("sigterm")
    t, first_bytes, got = _stream_in_thread(stack, r, OUTPUT_TOKENS)
    assert first_bytes.wait(30)
    router = stack.procs["router"]
    t_term = time.monotonic()
    router.send_signal(signal.SIGTERM)
    t.join(60)
    assert not t.is_alive()
    assert "error" not in got, got.get("error")
    assert got["t_end"] - t_term > 0.2  # the stream really was in flight when the signal came

    rc = router.wait(GRACE_S + 10)
    t_exit = time.monotonic()
    assert rc == 0, (stack.workdir / "router.log").read_text()[-2000:]
    assert t_exit - t_term <= GRACE_S + 5
    assert t_exit > got["t_end"] - 0.2, (t_exit - t_term, got["t_end"] - t_term)  # it waited for the stream

    _assert_stream_intact(got, OUTPUT_TOKENS)
    assert access_line(stack, r).served_by == "short"

    assert snapshot.exists(), "no calibration snapshot after SIGTERM"
    doc = json.loads(snapshot.read_text())
    assert doc["keys"][MODEL]["n"] >= 1  # the stream's own usage was learned before the save


def _envoy_stat(stack, name: str) -> int:
    url = f"http://127.0.0.1:{stack.admin_port}/stats?filter=^{name.replace('.', '[.]')}$"
    with urllib.request.urlopen(url, timeout=2) as r:
        text = r.read().decode().strip()
    return int(text.rpartition(":")[2]) if text else 0


def test_idle_router_exits_at_once_and_a_restart_binds_every_port(slow):
    stack = slow
    ensure_router(stack)
    for i in range(3):  # usage streams (read while calibrating) and, with ext_authz, the access-log stream
        assert post(stack, chat_body("hi", max_tokens=4), rid(f"idle{i}")).status == 200
    deadline = time.monotonic() + 5
    ends_logged = stack.config.service.routing_filter == "ext_authz"
    while time.monotonic() < deadline:  # the streams are up, idle, in Envoy's own counts
        streaming = _envoy_stat(stack, "cluster.extproc.upstream_rq_active") >= 1
        logged = not ends_logged or _envoy_stat(stack, "access_logs.grpc_access_log.grpc_entries_flushed") >= 1
        if streaming and logged:
            break
        time.sleep(0.05)
    assert streaming and logged
    router = stack.procs["router"]
    t_term = time.monotonic()
    router.send_signal(signal.SIGTERM)
    rc = router.wait(GRACE_S + 10)
    exit_s = time.monotonic() - t_term
    assert rc == 0, (stack.workdir / "router.log").read_text()[-2000:]
    print(f"\nidle router ({stack.config.service.routing_filter}, grace {GRACE_S:.0f}s): exited {exit_s:.3f}s "
          f"after SIGTERM")
    assert exit_s < IDLE_EXIT_S, exit_s

    t0 = time.monotonic()
    start_router(stack)  # at once: fails with the router's log if a port is still taken
    ready_s = time.monotonic() - t0
    with urllib.request.urlopen(stack.metrics_url, timeout=2) as r:
        assert r.status == 200
    stack.wait_router_healthy_in_envoy()  # the check endpoint and the gRPC port, as Envoy sees them
    print(f"restarted right after: ready in {ready_s:.2f}s")


@pytest.fixture(scope="module")
def short_grace(make_stack):
    return make_stack("sigterm-grace", {"service": {"grace_period_s": 1.0, "snapshot_interval_s": 3600}},
                      time_scale=0.5)


def test_a_stream_longer_than_the_grace_period_holds_the_stop_only_that_long(short_grace):
    stack = short_grace
    tokens = 200  # ~2 s at time scale 0.5
    t, first_bytes, got = _stream_in_thread(stack, rid("long-stream"), tokens)
    assert first_bytes.wait(30)
    router = stack.procs["router"]
    t_term = time.monotonic()
    router.send_signal(signal.SIGTERM)
    rc = router.wait(15)
    exit_s = time.monotonic() - t_term
    t.join(60)
    assert rc == 0
    print(f"\nstream longer than the 1 s grace: router exited {exit_s:.2f}s after SIGTERM, "
          f"the stream ended {got['t_end'] - t_term:.2f}s after it")
    assert 1.0 <= exit_s < 2.5, exit_s  # the grace period, then out
    assert got["t_end"] - t_term > exit_s  # the stream outlived the router ...
    _assert_stream_intact(got, tokens)     # ... and reached the client whole (the usage read is observability)
