"""The ext_authz HTTP check endpoint (service/check.py), spoken to over a real loopback socket the
way Envoy's ext_authz HTTP client does: one POST per request to /route<original path> with the
buffered body, kept-alive connections, GET /healthz from the health checker."""

from __future__ import annotations

import asyncio

import pytest
from service_harness import MODEL, chat, long_text, run, running

from extproc.service import check


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {check.CHECK_PREFIX}{path} HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


async def _connect(h):
    return await asyncio.open_connection("127.0.0.1", h.service.check.port)


async def _ask(h, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own."""
    reader, writer = await _connect(h)
    writer.write(request)
    try:
        return await _read_response(reader)
    finally:
        writer.close()


def test_short_and_long_requests_get_their_pool_and_provenance_on_one_kept_alive_connection():
    async def scenario():
        async with running() as h:
            reader, writer = await _connect(h)
            writer.write(_post("/v1/chat/completions", chat("What is the capital of France?", max_tokens=32)))
            status, hdrs, body = await _read_response(reader)
            assert status == 200 and body == b""
            assert hdrs["x-token-pool"] == "short" and hdrs["x-token-reason"] == "fits"
            assert int(hdrs["x-token-budget"]) >= 32 and int(hdrs["x-token-estimate"]) > 0
            assert hdrs["x-token-source"] == "prior"
            assert hdrs["x-token-read"] == "1" and hdrs["x-token-decision"]  # uncalibrated: read every response
            assert "connection" not in hdrs  # kept alive
            writer.write(_post("/v1/chat/completions", chat(long_text(12_000))))
            status, hdrs, _ = await _read_response(reader)
            assert status == 200 and hdrs["x-token-pool"] == "long"
            assert h.value("extproc_decisions_total", pool="short", reason="fits", source="prior") == 1
            assert h.value("extproc_decisions_total", pool="long", reason="fits", source="prior") == 1
            # in flight until Envoy's access-log stream says the request ended
            assert h.value("extproc_inflight_requests", pool="short") == 1
            writer.close()
    run(scenario())


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b"[1, 2]", b'{"messages": 5}', b"null"])
def test_unreadable_bodies_are_answered_200_for_the_largest_pool(body):
    async def scenario():
        async with running() as h:
            status, hdrs, _ = await _ask(h, _post("/v1/chat/completions", body))
            assert status == 200 and hdrs["x-token-pool"] == "long"
    run(scenario())


def test_garbage_that_is_not_http_closes_that_connection_only():
    async def scenario():
        async with running() as h:
            reader, writer = await _connect(h)
            writer.write(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, no answer
            status, hdrs, _ = await _ask(h, _post("/v1/completions", b'{"model": "m", "prompt": "hi", "max_tokens": 4}'))
            assert status == 200 and hdrs["x-token-pool"] == "short"
    run(scenario())


def test_pipelined_checks_are_answered_in_order_even_when_the_first_is_offloaded():
    async def scenario():
        async with running({"service": {"offload_bytes": 4096}}) as h:
            reader, writer = await _connect(h)
            big = chat(long_text(12_000))
            assert len(big) > 4096
            writer.write(_post("/v1/chat/completions", big) + _post("/v1/chat/completions", chat("hi", max_tokens=4)))
            first = await _read_response(reader)
            second = await _read_response(reader)
            assert first[1]["x-token-pool"] == "long" and second[1]["x-token-pool"] == "short"
            writer.close()
    run(scenario())


def test_connection_close_is_honoured():
    async def scenario():
        async with running() as h:
            reader, writer = await _connect(h)
            writer.write(_post("/v1/chat/completions", chat("hi"), extra="connection: close\r\n"))
            status, hdrs, _ = await _read_response(reader)
            assert status == 200 and hdrs["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 10) == b""
    run(scenario())


def test_a_failure_inside_the_router_still_answers_200_with_no_pool(monkeypatch):
    async def scenario():
        async with running() as h:
            def broken(*args, **kwargs):
                raise RuntimeError("injected fault")
            monkeypatch.setattr(h.service.router, "_record", broken)
            status, hdrs, _ = await _ask(h, _post("/v1/chat/completions", chat("hi")))
            assert status == 200 and "x-token-pool" not in hdrs  # Envoy's default route: the largest pool
            assert h.value("extproc_stream_errors_total") == 1
    run(scenario())


def test_a_body_over_the_limit_goes_to_the_largest_pool(monkeypatch):
    monkeypatch.setattr(check, "MAX_BODY", 1000)

    async def scenario():
        async with running() as h:
            status, hdrs, _ = await _ask(h, _post("/v1/chat/completions", chat("x " * 2000, max_tokens=4)))
            assert status == 200 and hdrs["x-token-pool"] == "long" and hdrs["x-token-reason"] == "unreadable"
    run(scenario())


def test_health_is_served_and_turns_503_while_draining():
    async def scenario():
        async with running() as h:
            reader, writer = await _connect(h)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: router\r\n\r\n")
            status, _, body = await _read_response(reader)
            assert status == 200 and body == b"ok"
            h.service.check.draining = True
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: router\r\n\r\n")
            status, hdrs, _ = await _read_response(reader)
            assert status == 503 and hdrs["connection"] == "close"
            h.service.check.draining = False
    run(scenario())


def test_pipelined_checks_after_a_closing_answer_are_neither_answered_nor_counted():
    async def scenario():
        async with running() as h:
            reader, writer = await _connect(h)
            h.service.check.draining = True  # every answer now closes its connection
            writer.write(b"".join(_post("/v1/chat/completions", chat("hi", max_tokens=4)) for _ in range(3)))
            status, hdrs, _ = await _read_response(reader)
            assert status == 200 and hdrs["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert h.value("extproc_inflight_requests", pool="short") == 1  # only the answered one
            assert len(h.service.router.open) == 1
            h.service.check.draining = False
    run(scenario())


def test_an_upgrade_request_closes_the_connection_cleanly():
    async def scenario():
        async with running() as h:
            reader, writer = await _connect(h)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: r\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
            await asyncio.wait_for(reader.read(), 10)  # answered or not, the connection ends
            reader, writer = await _connect(h)  # and the server still serves
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: router\r\n\r\n")
            status, _, _ = await _read_response(reader)
            assert status == 200
            writer.close()
    run(scenario())


def test_the_ext_proc_filter_config_serves_no_check_endpoint():
    async def scenario():
        async with running({"service": {"routing_filter": "ext_proc"}}) as h:
            assert h.service.check is None
    run(scenario())


def test_model_calibration_is_shared_with_the_usage_stream():
    """A check marks the request for reading; the usage filter's stream (gRPC) then learns from it."""
    from service_harness import request_headers, response_body, response_headers

    async def scenario():
        async with running() as h:
            reader, writer = await _connect(h)
            writer.write(_post("/v1/chat/completions", chat("What is the capital of France?")))
            _, hdrs, _ = await _read_response(reader)
            sample = hdrs["x-token-decision"]
            await h.send_all([
                request_headers(extra={"x-token-decision": sample}, observability=True),
                response_headers(200, "application/json"),
                response_body(b'{"usage": {"prompt_tokens": 17, "completion_tokens": 3}}', eos=True)])
            for _ in range(100):
                if h.samples(MODEL) == 1:
                    break
                await asyncio.sleep(0.01)
            assert h.samples(MODEL) == 1
            writer.close()
    run(scenario())


def _ends(*decision_ids: str):
    from envoy.data.accesslog.v3 import accesslog_pb2
    from envoy.service.accesslog.v3 import als_pb2

    entries = [accesslog_pb2.HTTPAccessLogEntry(request=accesslog_pb2.HTTPRequestProperties(
        request_headers={"x-token-decision": i} if i else {})) for i in decision_ids]
    return als_pb2.StreamAccessLogsMessage(http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
        log_entry=entries))


def test_access_log_stream_ends_requests_in_the_in_flight_counts():
    from envoy.service.accesslog.v3 import als_pb2_grpc

    async def scenario():
        async with running() as h:
            reader, writer = await _connect(h)
            ids, pools = [], []
            for _ in range(3):
                writer.write(_post("/v1/chat/completions", chat("hi", max_tokens=4)))
                _, hdrs, _ = await _read_response(reader)
                ids.append(hdrs["x-token-decision"])
                pools.append(hdrs["x-token-pool"])
            assert pools == ["short"] * 3 and h.value("extproc_inflight_requests", pool="short") == 3
            stub = als_pb2_grpc.AccessLogServiceStub(h.channel)
            call = stub.StreamAccessLogs()
            await call.write(_ends(ids[0], "unknown-id", ""))  # unknown and absent ids are ignored
            for _ in range(200):
                if h.value("extproc_inflight_requests", pool="short") == 2:
                    break
                await asyncio.sleep(0.01)
            assert h.value("extproc_inflight_requests", pool="short") == 2
            writer.write(_post("/v1/chat/completions", chat("hi", max_tokens=4)))
            _, hdrs, _ = await _read_response(reader)
            assert hdrs["x-token-pool"] == "short"
            await call.write(_ends(*ids[1:], hdrs["x-token-decision"]))
            await call.done_writing()
            await asyncio.wait_for(call, 10)
            assert h.value("extproc_inflight_requests", pool="short") == 0
            assert h.value("extproc_inflight_requests", pool="long") == 0
            writer.close()
    run(scenario())


def test_requests_whose_end_never_comes_are_counted_out_after_max_request_s():
    async def scenario():
        async with running({"service": {"max_request_s": 5}}) as h:
            reader, writer = await _connect(h)
            writer.write(_post("/v1/chat/completions", chat("hi", max_tokens=4)))
            _, first, _ = await _read_response(reader)
            assert h.value("extproc_inflight_requests", pool="short") == 1
            table = h.service.router.open
            pool, t = table[first["x-token-decision"]]
            table[first["x-token-decision"]] = (pool, t - 6)  # decided 6 s ago, longer than any request runs
            writer.write(_post("/v1/chat/completions", chat("hi", max_tokens=4)))
            await _read_response(reader)
            assert h.value("extproc_inflight_requests", pool="short") == 1  # the first counted out, the second in
            assert h.value("extproc_request_ends_missed_total") == 1
            writer.close()
    run(scenario())


def test_an_idle_router_counts_out_lost_ends_too():
    async def scenario():
        async with running({"service": {"max_request_s": 1}}) as h:
            _, first, _ = await _ask(h, _post("/v1/chat/completions", chat("hi", max_tokens=4)))
            assert h.value("extproc_inflight_requests", pool="short") == 1
            for _ in range(100):  # no further check arrives: the sweep alone counts it out
                if h.value("extproc_inflight_requests", pool="short") == 0:
                    break
                await asyncio.sleep(0.05)
            assert h.value("extproc_inflight_requests", pool="short") == 0
            assert h.value("extproc_request_ends_missed_total") == 1
    run(scenario())


def test_an_offloaded_body_is_routed_as_any_other_size_bound_first():
    """One door (Router.route): a body read in a worker thread gets the same decision as on the
    loop, the size bound included (it used to skip it and go straight to the estimate)."""
    body = chat("word " * 1200, max_tokens=16)  # 6 KB: the size bound proves it fits 8K

    async def answer(config):
        async with running(config) as h:
            _, hdrs, _ = await _ask(h, _post("/v1/chat/completions", body))
            return hdrs

    on_loop = run(answer({"service": {"calibration_samples": 0, "usage_sample_rate": 0.0}}))
    offloaded = run(answer({"service": {"calibration_samples": 0, "usage_sample_rate": 0.0, "offload_bytes": 4096}}))
    assert on_loop["x-token-source"] == offloaded["x-token-source"] == "bound"
    assert on_loop["x-token-pool"] == offloaded["x-token-pool"] == "short"
