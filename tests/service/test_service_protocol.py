"""The ext_proc servicer over real gRPC (grpc.aio server on 127.0.0.1): the routing stream, the
usage (observability-mode) stream, and malformed message sequences."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format
from service_harness import (MODEL, chat, header_map, request_body, request_headers, response_body,
                             response_headers, run, set_headers, long_text)
from service_harness import running as _running

NONE = processing_mode_pb2.ProcessingMode.NONE
VLLM_DATA = Path(__file__).resolve().parents[2].parent / "shared/data/vllm"
ROUTER_HEADERS = {"x-token-pool", "x-token-budget", "x-token-estimate", "x-token-source", "x-token-reason",
                  "x-token-read", "x-token-decision", "x-token-shadow"}


def running(doc: dict | None = None):
    """These tests speak the ext_proc routing stream: run the config that uses it."""
    doc = dict(doc or {})
    doc["service"] = {"routing_filter": "ext_proc", **(doc.get("service") or {})}
    return _running(doc)


# -- routing stream ---------------------------------------------------------------------------------------

def test_headers_then_buffered_body():
    async def scenario():
        async with running() as h:
            call = h.open()
            await call.write(request_headers(extra={"x-token-pool": "long"}))
            head = await call.read()
            assert head.WhichOneof("response") == "request_headers"
            removed = set(head.request_headers.response.header_mutation.remove_headers)
            assert {"x-token-pool", "x-token-budget", "x-token-decision"} <= removed
            assert not head.HasField("mode_override")  # an LLM POST: the body is wanted

            await call.write(request_body(chat("What is the capital of France?", max_tokens=32)))
            resp = await call.read()
            assert resp.WhichOneof("response") == "request_body"
            common = resp.request_body.response
            assert common.clear_route_cache is True
            hdrs = set_headers(resp)
            assert hdrs["x-token-pool"] == "short"
            assert int(hdrs["x-token-budget"]) >= 32
            assert int(hdrs["x-token-estimate"]) > 0
            assert hdrs["x-token-source"] == "prior"
            assert hdrs["x-token-reason"] == "fits"
            assert hdrs["x-token-read"] == "1" and hdrs["x-token-decision"]  # uncalibrated: every response read
            assert "x-token-shadow" not in hdrs
            meta = json_format.MessageToDict(resp.dynamic_metadata)["extproc.route"]
            assert meta["pool"] == "short" and meta["decided_pool"] == "short"
            assert meta["output_reserve"] == 32 and meta["api"] == "chat" and meta["reason"] == "fits"
            assert meta["budget"] == int(hdrs["x-token-budget"])
            assert "spilled_from" not in meta
            assert h.value("extproc_inflight_requests", pool="short") == 1  # until the request ends

            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            for _ in range(100):
                if h.value("extproc_inflight_requests", pool="short") == 0:
                    break
                await asyncio.sleep(0.01)
            assert h.value("extproc_inflight_requests", pool="short") == 0
            assert h.value("extproc_decisions_total", pool="short", reason="fits", source="prior") == 1
    run(scenario())


def test_long_body_routes_long_and_shadow_header_in_shadow_mode():
    async def scenario():
        async with running({"service": {"shadow": True}}) as h:
            resp = await h.route(chat(long_text(20_000)))
            hdrs = set_headers(resp)
            assert hdrs["x-token-pool"] == "long" and hdrs["x-token-shadow"] == "long"
            resp = await h.route(chat("hi"))
            hdrs = set_headers(resp)
            assert hdrs["x-token-pool"] == "long" and hdrs["x-token-shadow"] == "short"
            meta = json_format.MessageToDict(resp.dynamic_metadata)["extproc.route"]
            assert meta["decided_pool"] == "short" and meta["pool"] == "long"
    run(scenario())


@pytest.mark.parametrize("method,path,eos", [
    ("GET", "/v1/chat/completions", True),
    ("GET", "/v1/models", True),
    ("POST", "/v1/embeddings", False),
    ("POST", "/tokenize", False),
    ("POST", "/v1/chat/completions", True),   # a POST without a body
])
def test_non_llm_requests_skip_the_body(method, path, eos):
    async def scenario():
        async with running() as h:
            (resp,) = await h.exchange([request_headers(path, method=method, eos=eos)])
            assert resp.WhichOneof("response") == "request_headers"
            assert resp.HasField("mode_override")
            assert resp.mode_override.request_body_mode == NONE
            assert h.value("extproc_decisions_total", pool="short", reason="fits", source="prior") == 0
    run(scenario())


def test_body_in_several_chunks_is_answered_per_chunk_and_routed_on_the_whole():
    async def scenario():
        async with running() as h:
            body = chat(long_text(20_000), max_tokens=64)
            cuts = [0, 7, len(body) // 2, len(body) - 3, len(body)]
            msgs = [request_headers()] + [request_body(body[a:b], eos=(b == len(body)))
                                          for a, b in zip(cuts, cuts[1:])]
            resps = await h.exchange(msgs)
            assert len(resps) == len(msgs)
            for r in resps[1:-1]:  # intermediate chunks: an empty body response, nothing decided
                assert r.WhichOneof("response") == "request_body"
                assert not r.request_body.response.header_mutation.set_headers
                assert not r.request_body.response.clear_route_cache
            last = set_headers(resps[-1])
            assert last["x-token-pool"] == "long"
            assert last["x-token-reason"] == "fits"  # the whole JSON was read, not a fragment
            assert int(last["x-token-estimate"]) > 15_000
            assert resps[-1].request_body.response.clear_route_cache
            assert h.value("extproc_decisions_total", pool="long", reason="fits", source="prior") == 1
    run(scenario())


def test_large_body_is_routed_off_the_event_loop_and_others_are_served_meanwhile():
    """Bodies above offload_bytes (256 KiB) are decided in a worker thread."""
    async def scenario():
        async with running() as h:
            big = chat(long_text(400_000), max_tokens=16)  # ~3 MiB of text: no pool holds it
            assert len(big) > 1 << 20
            results = await asyncio.gather(h.route(big), *(h.route(chat(f"small {i}")) for i in range(5)))
            big_hdrs = set_headers(results[0])
            assert big_hdrs["x-token-pool"] == "long" and big_hdrs["x-token-reason"] == "too_large"
            assert all(set_headers(r)["x-token-pool"] == "short" for r in results[1:])
            await _still_healthy(h)
    run(scenario())


# -- usage stream (observability mode) --------------------------------------------------------------------

def _sse_with_split_usage(prompt_tokens: int) -> list[bytes]:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    events = [
        b"data: " + json.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": "Hi"}}]}).encode() + b"\n\n",
        b"data: " + json.dumps({**chunk, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                                  "completion_tokens": 1,
                                                                  "total_tokens": prompt_tokens + 1}}).encode()
        + b"\n\n",
        b"data: [DONE]\n\n",
    ]
    raw = b"".join(events)
    cut = raw.index(b'"prompt_tokens"') + 6
    return [raw[:20], raw[20:cut], raw[cut:cut + 4], raw[cut + 4:]]


async def _read_decision(h, body: bytes) -> tuple[str, dict]:
    hdrs = set_headers(await h.route(body))
    assert hdrs.get("x-token-read") == "1", hdrs
    return hdrs["x-token-decision"], hdrs


def test_observability_stream_feeds_split_sse_usage_into_calibration():
    async def scenario():
        async with running() as h:
            body = chat("Please describe the water cycle for a school report, in three short paragraphs.")
            sample_id, hdrs = await _read_decision(h, body)
            estimate = int(hdrs["x-token-estimate"])
            parts = _sse_with_split_usage(estimate + 3)
            msgs = [request_headers(extra={"x-token-decision": sample_id}, observability=True),
                    response_headers(200, "text/event-stream")]
            msgs += [response_body(p, eos=(i == len(parts) - 1)) for i, p in enumerate(parts)]
            replies = await h.send_all(msgs)
            assert replies == []  # observability mode: Envoy reads no replies, none are sent
            assert h.value("extproc_usage_reads_total", outcome="stream") == 1
            assert h.value("extproc_usage_reads_total", outcome="stream_missed") == 0
            assert h.samples() == 1
            assert h.value("extproc_calibration_samples", model=MODEL) == 1
            assert h.value("extproc_estimate_error_ratio_count", family="llama3") == 1

            # the same decision id again learns nothing (each sample is read once)
            await h.send_all(msgs)
            assert h.samples() == 1
    run(scenario())


def test_observability_stream_json_body_and_eos_on_headers():
    async def scenario():
        async with running() as h:
            sample_id, hdrs = await _read_decision(h, chat("Name three rivers in Europe and one fact about each."))
            doc = json.dumps({"id": "x", "object": "chat.completion", "model": MODEL, "choices": [],
                              "usage": {"prompt_tokens": int(hdrs["x-token-estimate"]) + 2,
                                        "completion_tokens": 5, "total_tokens": 9}}).encode()
            await h.send_all([request_headers(extra={"x-token-decision": sample_id}, observability=True),
                              response_headers(200, "application/json"),
                              response_body(doc[:10]), response_body(doc[10:], eos=True)])
            assert h.value("extproc_usage_reads_total", outcome="json") == 1
            assert h.samples() == 1

            # a response without a body (headers end the stream) is counted, not learned
            sample_id, _ = await _read_decision(h, chat("Another question about rivers."))
            await h.send_all([request_headers(extra={"x-token-decision": sample_id}, observability=True),
                              response_headers(200, "application/json", eos=True)])
            assert h.value("extproc_usage_reads_total", outcome="json_missed") == 1
            assert h.samples() == 1
    run(scenario())


def _context_error(prompt: int, output: int, limit: int = 8192, at_least: bool = False, old: bool = False) -> bytes:
    if old:
        msg = (f"This model's maximum context length is {limit} tokens. However, you requested {prompt + output} "
               f"tokens ({prompt} in the messages, {output} in the completion). Please reduce the length of the "
               f"messages or completion.")
    else:
        al = "at least " if at_least else ""
        msg = (f"This model's maximum context length is {limit} tokens. However, you requested {output} output "
               f"tokens and your prompt contains {al}{prompt} input tokens, for a total of {al}{prompt + output} "
               f"tokens. Please reduce the length of the input prompt or the number of requested output tokens.")
    return json.dumps({"object": "error", "message": msg, "type": "BadRequestError", "param": None,
                       "code": 400}).encode()


@pytest.mark.parametrize("variant", ["current", "old"])
def test_context_length_400_counts_a_misroute_and_learns_the_exact_count(variant):
    async def scenario():
        async with running() as h:
            sample_id, hdrs = await _read_decision(h, chat(long_text(4_000), max_tokens=16))
            assert hdrs["x-token-pool"] == "short"
            estimate = int(hdrs["x-token-estimate"])
            true_count = int(estimate * 1.1)  # plausible, and within what a first sample may teach
            err = _context_error(true_count, 16, old=(variant == "old"))
            await h.send_all([request_headers(extra={"x-token-decision": sample_id}, observability=True),
                              response_headers(400, "application/json"),
                              response_body(err[:50]), response_body(err[50:], eos=True)])
            kind = "prompt_over_window" if true_count >= 8192 else "output_over_window"
            assert h.value("extproc_misroutes_total", pool="short", kind=kind) == 1
            assert h.value("extproc_misroutes_total") == 1
            assert h.value("extproc_usage_reads_total", outcome="context_error") == 1
            assert h.samples() == 1  # the exact count was learned
            # and it moved the estimate towards the truth for the same body
            hdrs2 = set_headers(await h.route(chat(long_text(4_000), max_tokens=16)))
            assert int(hdrs2["x-token-estimate"]) > estimate
    run(scenario())


@pytest.mark.parametrize("ratio, learned", [(1.3, 1), (0.7, 0)])
def test_context_length_400_with_a_lower_bound_is_a_misroute_learned_only_above_the_estimate(ratio, learned):
    """"At least N" proves the truth is N or more: above the estimate it is learned (it can only
    move the estimate towards the truth), below it teaches nothing."""
    async def scenario():
        async with running() as h:
            sample_id, hdrs = await _read_decision(h, chat(long_text(4_000), max_tokens=16))
            err = _context_error(int(int(hdrs["x-token-estimate"]) * ratio), 16, at_least=True)
            await h.send_all([request_headers(extra={"x-token-decision": sample_id}, observability=True),
                              response_headers(400, "application/json"), response_body(err, eos=True)])
            assert h.value("extproc_misroutes_total", pool="short") == 1
            assert h.samples() == learned
    run(scenario())


def _vllm_body(folder: str, case: str) -> tuple[int, str, bytes]:
    base = VLLM_DATA / folder
    if not base.is_dir():
        pytest.skip(f"real vLLM answers not found at {base}")
    meta = json.loads((base / f"{case}.meta.json").read_text())
    return meta["status"], meta["headers"]["content-type"], (base / f"{case}.body").read_bytes()


@pytest.mark.parametrize("case, kind", [("chat_prompt9000_max64", "prompt_over_window"),
                                        ("chat_prompt8192_max1", "prompt_fills_window"),
                                        ("chat_prompt8000_max500", "output_clamped"),
                                        ("chat_prompt8182_max1", None)])
def test_real_vllm_answers_count_each_misroute_once_with_its_kind(case, kind):
    """Real 0.32 bytes through the usage stream: a 400 of each kind, the silent clamp (a 200),
    and a near-limit 200 that fit. The log line appears exactly when the metric counts."""
    async def scenario():
        async with running() as h:
            max_tokens = int(case.rsplit("max", 1)[1])
            sample_id, _ = await _read_decision(h, chat("What is the capital of France?", max_tokens=max_tokens))
            status, ctype, body = _vllm_body("errors_8k", case)
            with _captured_log() as records:
                await h.send_all([request_headers(extra={"x-token-decision": sample_id}, observability=True),
                                  response_headers(status, ctype)]
                                 + [response_body(body[i:i + 4096], eos=i + 4096 >= len(body))
                                    for i in range(0, len(body), 4096)])
            assert h.value("extproc_misroutes_total") == (0 if kind is None else 1)
            if kind is not None:
                assert h.value("extproc_misroutes_total", pool="short", kind=kind) == 1
            lines = [r.getMessage() for r in records if r.getMessage().startswith("misroute:")]
            assert len(lines) == (0 if kind is None else 1), lines
            assert all(f"kind={kind}" in line for line in lines)
    run(scenario())


@contextlib.contextmanager
def _captured_log():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("extproc.service")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_other_400_is_not_a_misroute():
    async def scenario():
        async with running() as h:
            sample_id, _ = await _read_decision(h, chat("hi"))
            err = json.dumps({"object": "error", "message": "Invalid JSON in request body", "code": 400}).encode()
            await h.send_all([request_headers(extra={"x-token-decision": sample_id}, observability=True),
                              response_headers(400, "application/json"), response_body(err, eos=True)])
            assert h.value("extproc_misroutes_total", pool="short") == 0
            assert h.value("extproc_usage_reads_total", outcome="other_status") == 1
            assert h.samples() == 0
    run(scenario())


# -- malformed sequences ------------------------------------------------------------------------------------

async def _still_healthy(h) -> None:
    assert await h.serving()
    hdrs = set_headers(await h.route(chat("still there?")))
    assert hdrs["x-token-pool"] == "short"
    for _ in range(100):
        if all(h.value("extproc_inflight_requests", pool=p) == 0 for p in ("short", "long")):
            break
        await asyncio.sleep(0.01)
    assert h.value("extproc_inflight_requests", pool="short") == 0
    assert h.value("extproc_inflight_requests", pool="long") == 0


def test_empty_stream():
    async def scenario():
        async with running() as h:
            assert await h.send_all([]) == []
            await _still_healthy(h)
    run(scenario())


def test_body_before_headers():
    async def scenario():
        async with running() as h:
            (resp,) = await h.exchange([request_body(chat("hi"))])
            assert resp.WhichOneof("response") == "request_body"
            await _still_healthy(h)
    run(scenario())


def test_response_messages_on_the_routing_stream():
    async def scenario():
        async with running() as h:
            resps = await h.exchange([
                request_headers(), request_body(chat("hi")),
                pb_trailers(),
                response_headers(200, "application/json", observability=False),
                response_body(b'{"usage": {"prompt_tokens": 5}}', eos=True, observability=False),
                pb_response_trailers(),
            ])
            assert [r.WhichOneof("response") for r in resps] == [
                "request_headers", "request_body", "request_trailers", "response_headers", "response_body",
                "response_trailers"]
            for r in resps[3:5]:  # answered without mutations
                common = getattr(r, r.WhichOneof("response")).response
                assert not common.header_mutation.set_headers and not common.clear_route_cache
            await _still_healthy(h)
    run(scenario())


def test_response_only_streams_and_garbage_on_the_usage_side():
    async def scenario():
        async with running() as h:
            # a response without its request side, in both modes
            await h.send_all([response_headers(200, "text/event-stream"), response_body(b"data: {", eos=True)])
            (resp,) = await h.exchange([response_headers(200, "application/json", observability=False)])
            assert resp.WhichOneof("response") == "response_headers"
            # an unknown decision id, a body before the headers, a non-numeric status, invalid SSE/JSON
            await h.send_all([request_headers(extra={"x-token-decision": "nope"}, observability=True),
                              response_body(b"\xff\xfe garbage", eos=False),
                              response_headers(200, "text/event-stream"),
                              response_body(b"data: {not json\n\ndata: {\"usage\": 7}\n\n", eos=True)])
            sample_id, _ = await _read_decision(h, chat("a sampled one"))
            await h.send_all([request_headers(extra={"x-token-decision": sample_id}, observability=True),
                              pb.ProcessingRequest(response_headers=pb.HttpHeaders(
                                  headers=header_map({":status": "abc"})), observability_mode=True),
                              response_body(b"\x00" * 1000, eos=True)])
            assert h.value("extproc_usage_reads_total", outcome="other_status") == 1
            # a read stream that ends before the response (client gone): learned as missed, not crashed
            sample_id, _ = await _read_decision(h, chat("a sampled one that ends early"))
            await h.send_all([request_headers(extra={"x-token-decision": sample_id}, observability=True),
                              response_headers(200, "text/event-stream"), response_body(b"data: {\"choi")])
            assert h.value("extproc_usage_reads_total", outcome="stream_missed") == 1
            assert h.value("extproc_stream_errors_total") == 0
            assert h.samples() == 0
            await _still_healthy(h)
    run(scenario())


def test_two_final_bodies_on_one_stream_do_not_leak_in_flight_counts():
    """Envoy sends one final body per request; a stream that carries two must not leave a pool's
    in-flight count raised for ever."""
    async def scenario():
        async with running() as h:
            resps = await h.exchange([request_headers(), request_body(chat("hi")), request_body(chat("hi again"))])
            assert set_headers(resps[1])["x-token-pool"] == "short"
            await _still_healthy(h)
            assert h.service.router.inflight == {"short": 0, "long": 0}
    run(scenario())


def test_garbage_bodies_route_to_the_largest_pool():
    async def scenario():
        async with running() as h:
            for body in (b"", b"{", b"\xff\xfe\x00", b"[]", b"null", b'{"messages": 5}', b"{}" * 100_000,
                         json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}).encode()):
                hdrs = set_headers(await h.route(body))
                assert hdrs["x-token-pool"] in ("short", "long")
                if body in (b"", b"{", b"\xff\xfe\x00", b"[]", b"null"):
                    assert hdrs["x-token-pool"] == "long" and hdrs["x-token-reason"] == "unreadable"
            assert h.value("extproc_stream_errors_total") == 0
            await _still_healthy(h)
    run(scenario())


def test_client_cancel_mid_stream_releases_the_in_flight_count():
    async def scenario():
        async with running() as h:
            call = h.open()
            await call.write(request_headers())
            await call.read()
            await call.write(request_body(chat("hi")))
            await call.read()
            assert h.value("extproc_inflight_requests", pool="short") == 1
            call.cancel()  # Envoy resets the stream when the client goes away
            await _still_healthy(h)
    run(scenario())


def pb_trailers():
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())


def pb_response_trailers():
    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
