"""A real ``Service`` (grpc.aio server on 127.0.0.1, ephemeral port) and a grpc.aio client speaking
ext_proc ProcessingRequest messages the way Envoy does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config import parse_config
from extproc.service.app import Service

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
TIMEOUT = 10.0
_MAX = 64 << 20


def header_map(pairs: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])


def request_headers(path: str = "/v1/chat/completions", method: str = "POST", extra: dict | None = None,
                    eos: bool = False, observability: bool = False) -> pb.ProcessingRequest:
    hdrs = {":method": method, ":path": path, ":authority": "llm", "content-type": "application/json",
            **(extra or {})}
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(hdrs), end_of_stream=eos),
                                observability_mode=observability)


def request_body(data: bytes, eos: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def response_headers(status: int, content_type: str, eos: bool = False, observability: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=header_map({":status": str(status), "content-type": content_type}), end_of_stream=eos),
        observability_mode=observability)


def response_body(data: bytes, eos: bool = False, observability: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos),
                                observability_mode=observability)


def chat(content: str = "What is the capital of France?", max_tokens: int | None = 16, **extra) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return json.dumps(body).encode()


def set_headers(resp: pb.ProcessingResponse) -> dict[str, str]:
    """Headers a response sets (request_body or request_headers common response)."""
    which = resp.WhichOneof("response")
    common = getattr(resp, which).response
    return {h.header.key: (h.header.raw_value.decode() if h.header.raw_value else h.header.value)
            for h in common.header_mutation.set_headers}


class Harness:
    def __init__(self, service: Service, channel: grpc.aio.Channel) -> None:
        self.service = service
        self.channel = channel
        self.stub = pb_grpc.ExternalProcessorStub(channel)

    @property
    def registry(self):
        return self.service.metrics.registry

    def value(self, name: str, **labels) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
        want = set(labels.items())
        return sum(s.value for metric in self.registry.collect() for s in metric.samples
                   if s.name == name and want <= set(s.labels.items()))

    def samples(self, model: str = MODEL) -> int:
        return self.service.budget.estimator.samples(model)

    def open(self):
        """A bidirectional Process call driven with write()/read()/done_writing()."""
        return self.stub.Process(timeout=TIMEOUT)

    async def exchange(self, messages: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
        """Send each message and read its reply, as Envoy does on the routing stream; then end the stream."""
        call = self.open()
        out = []
        for m in messages:
            await call.write(m)
            out.append(await asyncio.wait_for(call.read(), TIMEOUT))
        await call.done_writing()
        rest = await asyncio.wait_for(_drain(call), TIMEOUT)
        assert rest == [], rest
        return out

    async def send_all(self, messages: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
        """Send everything, end the stream, collect what came back (observability mode: nothing)."""
        call = self.open()
        for m in messages:
            await call.write(m)
        await call.done_writing()
        return await asyncio.wait_for(_drain(call), TIMEOUT)

    async def route(self, body: bytes, path: str = "/v1/chat/completions") -> pb.ProcessingResponse:
        _, body_resp = await self.exchange([request_headers(path), request_body(body)])
        return body_resp

    async def serving(self) -> bool:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
        return resp.status == health_pb2.HealthCheckResponse.SERVING


async def _drain(call) -> list:
    out = []
    for _ in range(10_000):
        msg = await call.read()
        if msg is grpc.aio.EOF:
            break
        out.append(msg)
    return out


@contextlib.asynccontextmanager
async def running(doc: dict | None = None) -> AsyncIterator[Harness]:
    service = Service(parse_config(doc or {}))
    await service.start(grpc_address="127.0.0.1:0", metrics_address=None, http_address="127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=[
        ("grpc.max_send_message_length", _MAX), ("grpc.max_receive_message_length", _MAX)])
    try:
        yield Harness(service, channel)
    finally:
        await channel.close()
        await service.stop(grace=0)


def long_text(tokens: int) -> str:
    return " ".join(f"word{i % 97} and more of the river text" for i in range(tokens // 8))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))
