"""Smoke tests of the real-vLLM fixture: the servers are the vLLM 0.32 the captured data came from,
serve every name asked for with the window asked for, and a second session reuses the model."""

from __future__ import annotations

import http.client
import json
import pathlib
import subprocess
import sys
import time

import pytest
from vllm_server import VLLMServer, VLLMStartError, start_all

HERE = pathlib.Path(__file__).resolve().parent
CAPTURED = HERE.parents[2] / "shared" / "data" / "vllm"
TIER_SPECS = [("llama3_1", 8192), ("llama3_1", 65536)]  # the servers it uses (conftest starts them together)


@pytest.fixture(scope="module")
def llama31(real_vllm) -> dict[int, VLLMServer]:
    """The short and long Llama-3.1 servers, started together (the routing tests use the same two)."""
    short, long = real_vllm.servers([("llama3_1", 8192), ("llama3_1", 65536)])
    return {8192: short, 65536: long}


def request(srv: VLLMServer, method: str, path: str, body: dict | None = None,
            timeout: float = 120) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_health(llama31):
    for srv in llama31.values():
        status, body = request(srv, "GET", "/health")
        assert status == 200, body


@pytest.mark.parametrize("window", [8192, 65536])
def test_models_lists_every_served_name_with_its_window(llama31, window):
    srv = llama31[window]
    status, body = request(srv, "GET", "/v1/models")
    assert status == 200, body
    data = json.loads(body)["data"]
    assert [m["id"] for m in data] == ["meta-llama/Llama-3.1-8B-Instruct", "llama-3.1"]
    assert {m["max_model_len"] for m in data} == {window}
    assert {m["root"] for m in data} == {str(srv.model_dir)}


def test_version_is_the_captured_one(llama31):
    status, body = request(llama31[8192], "GET", "/version")
    assert status == 200
    captured = (CAPTURED / "responses_8k" / "version.txt").read_bytes().split(b"\r\n\r\n", 1)[1]
    assert json.loads(body) == {"version": "0.32.0"} == json.loads(captured)


def test_tokenize_a_chat_counts_with_the_dated_llama31_template(llama31):
    srv = llama31[8192]
    status, body = request(srv, "POST", "/tokenize", {
        "model": srv.model, "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 8192
    assert reply["tokens"][0] == 128000  # <|begin_of_text|>
    # the Llama-3.1 template always renders the dated system block (+25 tokens): far over a bare "Hi"
    assert reply["count"] > 30, reply
    # the second served name is the same model
    status, alias = request(srv, "POST", "/tokenize", {
        "model": "llama-3.1", "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and json.loads(alias)["tokens"] == reply["tokens"]


def test_over_the_window_chat_is_the_captured_400(llama31):
    srv = llama31[8192]
    t0 = time.monotonic()
    status, body = request(srv, "POST", "/v1/chat/completions", {
        "model": srv.model, "max_tokens": 64,
        "messages": [{"role": "user", "content": " hello" * 9000}]})
    captured = (CAPTURED / "errors_8k" / "chat_prompt9000_max64.body").read_bytes()
    meta = json.loads((CAPTURED / "errors_8k" / "chat_prompt9000_max64.meta.json").read_text())
    assert status == meta["status"] == 400
    assert json.loads(body) == json.loads(captured), body
    assert time.monotonic() - t0 < 30


def test_a_second_session_reuses_the_cached_model(llama31):
    """A new process (as a new pytest session would) finds the model directory already built."""
    srv = llama31[8192]
    before = srv.model_dir.stat().st_mtime_ns
    code = ("import sys, time, tiny_model; t = time.monotonic(); "
            "d = tiny_model.ensure_model('llama3_1', sys.argv[1], log=lambda m: print('BUILT', m)); "
            "print(d); print(f'{time.monotonic() - t:.3f}')")
    done = subprocess.run([sys.executable, "-c", code, str(srv.python)], cwd=HERE, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout.split()
    assert "BUILT" not in done.stdout
    assert pathlib.Path(out[0]) == srv.model_dir
    assert float(out[1]) < 5.0
    assert srv.model_dir.stat().st_mtime_ns == before
    assert list(srv.model_dir.parent.glob(f".{srv.model_dir.name}.tmp-*")) == []


def test_a_server_that_dies_fails_fast_with_its_log(tmp_path):
    """The launcher's failure path, without paying a vLLM start: an interpreter without vLLM dies
    at once, and the error carries the log's tail, not a wait for the health timeout."""
    srv = VLLMServer(pathlib.Path(sys.executable), tmp_path, "llama3_1", 8192, ("x",), tmp_path / "dead.log")
    t0 = time.monotonic()
    try:
        with pytest.raises(VLLMStartError) as err:
            start_all([srv], timeout=120)
    finally:
        srv.stop()
    assert time.monotonic() - t0 < 30
    assert "exited with 1" in str(err.value) and str(srv.log_path) in str(err.value)
    assert "No module named 'vllm'" in str(err.value)  # the log's tail says why
    assert not srv.alive()
