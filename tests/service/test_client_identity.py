"""Who sent a request, end to end inside the service: the identity header (``service.client_header``)
or the address Envoy appended to x-forwarded-for reaches the core as a keyed hash, through the
ext_authz check endpoint and through the ext_proc stream; each client's share of a model's
learning is bounded; the operator API shows learning per client hash (never the identity) and
resets one model's calibration."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from service_harness import (MODEL, chat, long_text, request_body, request_headers, response_body, response_headers,
                             run, running, set_headers)

from extproc.operator.v1 import operator_pb2 as pb
from extproc.operator.v1 import operator_pb2_grpc as pb_grpc
from extproc.service import check

CHAT = "/v1/chat/completions"
IDENTITY = {"service": {"client_header": "x-user-id", "client_hash_key": "a-test-key-of-16+chars",
                        "operator_api": "read_write"},
            "learning": {"client_share": 0.25, "client_window": 16}}
TIMEOUT = 10.0


def _usage(prompt_tokens: int) -> bytes:
    return json.dumps({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1}}).encode()


async def _learn_via_check(h, headers: str, prompt_tokens: int = 40) -> str:
    """One check (ext_authz) with these extra header lines, then its usage through the usage filter."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.service.check.port)
    body = chat("What is the capital of France? Tell me in a sentence.")
    writer.write((f"POST {check.CHECK_PREFIX}{CHAT} HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(body)}\r\n{headers}\r\n").encode() + body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    writer.close()
    decision = next(line.split(":", 1)[1].strip() for line in head.decode().split("\r\n")
                    if line.lower().startswith("x-token-decision:"))
    await h.send_all([request_headers(extra={"x-token-decision": decision}, observability=True),
                      response_headers(200, "application/json"), response_body(_usage(prompt_tokens), eos=True)])
    return decision


async def _learn_via_stream(h, extra: dict, prompt_tokens: int = 40) -> None:
    _, routed = await h.exchange([request_headers(CHAT, extra=extra), request_body(chat("Name three rivers."))])
    decision = set_headers(routed)["x-token-decision"]
    await h.send_all([request_headers(extra={"x-token-decision": decision}, observability=True),
                      response_headers(200, "application/json"), response_body(_usage(prompt_tokens), eos=True)])


async def _settle(h, samples: int) -> None:
    for _ in range(200):
        learning = h.service.budget.learning(MODEL)
        if learning and learning["recent"] + learning["refused"] >= samples:
            return
        await asyncio.sleep(0.01)


def test_the_check_endpoint_names_the_sender_by_a_keyed_hash_of_its_identity_header():
    async def scenario():
        async with running(IDENTITY) as h:
            await _learn_via_check(h, "x-user-id: alice@example.com\r\n")
            await _learn_via_check(h, "X-User-Id: bob@example.com\r\nx-forwarded-for: 10.1.2.3\r\n")
            await _settle(h, 2)
            r = h.service.router
            learning = h.service.budget.learning(MODEL)
            hashes = {c["client"] for c in learning["clients"]}
            assert hashes == {r.client_hash("id:alice@example.com"), r.client_hash("id:bob@example.com")}
            doc = json.dumps(h.service.budget.snapshot())
            assert "alice" not in doc and "bob" not in doc and "10.1.2.3" not in doc
    run(scenario())


def test_without_the_header_the_address_envoy_appended_names_the_sender():
    async def scenario():
        async with running(IDENTITY) as h:
            # a client may put anything in x-forwarded-for; Envoy appends the address it saw last
            await _learn_via_check(h, "x-forwarded-for: 6.6.6.6, 192.0.2.7\r\n")
            await _learn_via_stream(h, {"x-forwarded-for": "203.0.113.9"})
            await _settle(h, 2)
            r = h.service.router
            hashes = {c["client"] for c in h.service.budget.learning(MODEL)["clients"]}
            assert hashes == {r.client_hash("addr:192.0.2.7"), r.client_hash("addr:203.0.113.9")}
    run(scenario())


def test_with_trusted_proxies_in_front_the_address_before_theirs_names_the_sender():
    async def scenario():
        doc = {**IDENTITY, "service": {**IDENTITY["service"], "client_trusted_hops": 1}}
        async with running(doc) as h:
            await _learn_via_check(h, "x-forwarded-for: 6.6.6.6, 198.51.100.4, 10.0.0.2\r\n")  # client, LB added
            await _learn_via_check(h, "x-forwarded-for: 10.0.0.2\r\n")  # nothing before the proxy: unknown
            await _settle(h, 2)
            learning = h.service.budget.learning(MODEL)
            assert [c["client"] for c in learning["clients"]] == [h.service.router.client_hash("addr:198.51.100.4")]
            assert learning["unidentified"] == 1
    run(scenario())


def test_a_sender_named_by_nothing_is_learned_but_not_bounded():
    async def scenario():
        async with running(IDENTITY) as h:
            for _ in range(6):
                await _learn_via_check(h, "")
            await _settle(h, 6)
            learning = h.service.budget.learning(MODEL)
            assert learning["unidentified"] == 6 and learning["refused"] == 0 and learning["clients"] == []
    run(scenario())


def test_one_client_cannot_make_up_more_than_its_share_of_a_models_learning():
    async def scenario():
        async with running(IDENTITY) as h:  # window 16, share 0.25: four samples per client
            for _ in range(10):
                await _learn_via_stream(h, {"x-user-id": "mallory"})
            for i in range(3):
                await _learn_via_stream(h, {"x-user-id": f"user-{i}"})
            await _settle(h, 13)
            learning = h.service.budget.learning(MODEL)
            mallory = h.service.router.client_hash("id:mallory")
            row = next(c for c in learning["clients"] if c["client"] == mallory)
            assert (row["recent"], row["refused"]) == (4, 6)
            assert learning["recent"] == 7 and learning["refused"] == 6
            assert h.samples() == 7
    run(scenario())


def test_the_operator_api_shows_learning_per_client_hash_and_resets_one_model():
    async def scenario():
        async with running(IDENTITY) as h:
            for i in range(3):
                await _learn_via_stream(h, {"x-user-id": f"user-{i}"})
            await _settle(h, 3)
            stub = pb_grpc.OperatorStub(h.channel)
            cal = await stub.GetCalibration(pb.GetCalibrationRequest(), timeout=TIMEOUT)
            (key,) = [k for k in cal.keys if k.key == MODEL]
            assert (key.learning.window, key.learning.client_share, key.learning.recent) == (16, 0.25, 3)
            assert sorted(c.client_hash for c in key.learning.clients) == \
                sorted(h.service.router.client_hash(f"id:user-{i}") for i in range(3))
            assert all(c.recent == 1 and c.share == pytest.approx(1 / 3, abs=1e-3) for c in key.learning.clients)
            assert b"user-" not in cal.SerializeToString()
            before = set_headers(await h.route(chat(long_text(5000), max_tokens=16)))
            after_reset = await stub.ResetCalibration(pb.ResetCalibrationRequest(model=MODEL), timeout=TIMEOUT)
            assert [k.key for k in after_reset.keys] == [] and h.samples() == 0
            assert h.service.budget.learning(MODEL) is None
            fresh = set_headers(await h.route(chat(long_text(5000), max_tokens=16)))
            assert fresh["x-token-source"] == "prior"
            assert before["x-token-pool"] == fresh["x-token-pool"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ResetCalibration(pb.ResetCalibrationRequest(model=MODEL), timeout=TIMEOUT)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    run(scenario())


def test_reset_needs_read_write():
    async def scenario():
        async with running({"service": {"routing_filter": "ext_proc"}}) as h:
            await _learn_via_stream(h, {})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.OperatorStub(h.channel).ResetCalibration(pb.ResetCalibrationRequest(model=MODEL),
                                                                       timeout=TIMEOUT)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            for _ in range(100):
                if h.samples() == 1:
                    break
                await asyncio.sleep(0.01)
            assert h.samples() == 1  # nothing was reset
    run(scenario())
