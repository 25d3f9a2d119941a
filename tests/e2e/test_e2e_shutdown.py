"""Graceful stop: SIGTERM the router mid-stream; the stream completes intact for the client, the
router exits 0 within its grace period and leaves a calibration snapshot."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import pytest
from e2e_helpers import MODEL, access_line, chat_body, rid

GRACE_S = 15.0
OUTPUT_TOKENS = 100


@pytest.fixture(scope="module")
def slow(make_stack):
    # ~20 ms per token unscaled: at 0.5 the stream below lasts about a second
    return make_stack("sigterm", {"service": {"grace_period_s": GRACE_S, "snapshot_interval_s": 3600}},
                      time_scale=0.5)


def _parse_sse(raw: bytes) -> list:
    events = []
    assert raw.endswith(b"\n\n"), raw[-200:]
    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block[:200]
        payload = block[6:]
        events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def test_sigterm_mid_stream_drains_and_saves(slow):
    stack = slow
    snapshot = stack.workdir / "calibration.json"
    assert not snapshot.exists()
    r = rid("sigterm")
    first_bytes = threading.Event()
    got: dict = {}

    def stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=60)
        try:
            body = chat_body("Tell me a story about a patient lighthouse keeper.", max_tokens=OUTPUT_TOKENS,
                             stream=True, stream_options={"include_usage": True})
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"content-type": "application/json", "x-request-id": r})
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

    assert got["status"] == 200
    events = _parse_sse(got["body"])
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == OUTPUT_TOKENS
    usage = [c["usage"] for c in chunks if not c["choices"] and c.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == OUTPUT_TOKENS
    assert access_line(stack, r).served_by == "short"

    assert snapshot.exists(), "no calibration snapshot after SIGTERM"
    doc = json.loads(snapshot.read_text())
    assert doc["keys"][MODEL]["n"] >= 1  # the stream's own usage was learned before the save
