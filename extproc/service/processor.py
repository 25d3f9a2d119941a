"""The gRPC servicers: protobuf in, ``Router`` calls (service/router.py), protobuf out.

One ext_proc ``Process`` method serves both ext_proc filters (see envoy_config.py):

* the routing filter's stream (``service.routing_filter: ext_proc``) — request headers, then the BUFFERED body; the body response sets
  the pool header and provenance headers, clears the route cache and emits dynamic metadata.
  The stream lives until Envoy finishes the HTTP request, so its end is the request's end:
  that is where in-flight counts per pool go down;
* the usage filter's stream (``observability_mode``: Envoy does not wait for us) — only for
  requests the routing side marked for reading; it feeds the response's status, content type
  and bytes to the core's ``ResponseReader`` and hands the facts to ``Router.response_read``.

``RequestEndsServicer`` reads Envoy's gRPC access log: which ext_authz-checked requests ended.

This module never parses JSON bodies itself: that is the core's (extproc.budget).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from ..budget.request import api_for_path
from ..budget.response import ResponseReader
from ..budget.stream_usage import UsageEventStripper
from .envoy_config import METADATA_NAMESPACE
from .router import Routed, Router

log = logging.getLogger("extproc.service")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MODE = processing_mode_pb2.ProcessingMode
_SKIP_BODY = _MODE(request_body_mode=_MODE.NONE, response_header_mode=_MODE.SKIP,
                   response_body_mode=_MODE.NONE, request_trailer_mode=_MODE.SKIP, response_trailer_mode=_MODE.SKIP)
# Envoy honours a mode override only on a *headers* response. A request that may get
# include_usage injected therefore asks for its response headers (request-headers response), and
# an injected stream asks for its response body there (response-headers response), so that the
# routing stream itself reads and strips the usage event.
_ASK_RESPONSE_HEADERS = _MODE(request_body_mode=_MODE.BUFFERED, response_header_mode=_MODE.SEND,
                              response_body_mode=_MODE.NONE, request_trailer_mode=_MODE.SKIP,
                              response_trailer_mode=_MODE.SKIP)
_READ_RESPONSE_BODY = _MODE(response_body_mode=_MODE.STREAMED, response_trailer_mode=_MODE.SKIP)
_READ_ERROR_BODY = _MODE(response_body_mode=_MODE.BUFFERED, response_trailer_mode=_MODE.SKIP)


def _header(headers: pb.HttpHeaders, name: str) -> str | None:
    for h in headers.headers.headers:
        if h.key == name:
            return h.raw_value.decode("latin-1") if h.raw_value else h.value
    return None


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, router: Router) -> None:
        self.r = router
        self.refresh()

    def refresh(self) -> None:
        """The three possible request-headers responses, built once per config (gRPC serialises a
        message on each send; it is never mutated after this): a reload with new header names
        calls this again."""
        strip = pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(remove_headers=self.r.s.router_headers())))
        self.headers_plain = pb.ProcessingResponse(request_headers=strip)
        self.headers_skip = pb.ProcessingResponse(request_headers=strip, mode_override=_SKIP_BODY)
        self.headers_ask_response = pb.ProcessingResponse(request_headers=strip, mode_override=_ASK_RESPONSE_HEADERS)

    async def Process(self, request_iterator, context):
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            return
        try:
            if first.observability_mode:
                await self._observe(first, request_iterator)
                return
            async for response in self._route(first, request_iterator):
                yield response
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not take the service down: Envoy fails open on this stream
            self.r.metrics.stream_errors.inc()
            log.exception("ext_proc stream failed")
            raise

    # -- routing filter ------------------------------------------------------------------------
    async def _route(self, first: pb.ProcessingRequest, rest):
        stream = _RoutingStream(self)
        try:
            req = first
            while True:
                phase = _PHASES.get(req.WhichOneof("request"))
                if phase is not None:
                    answer = phase(stream, req)
                    yield answer if isinstance(answer, pb.ProcessingResponse) else await answer
                try:
                    req = await anext(rest)
                except StopAsyncIteration:
                    break
        finally:
            stream.close()

    # -- usage filter (observability mode: replies are never read) ------------------------------
    async def _observe(self, first: pb.ProcessingRequest, rest) -> None:
        """Feed the response to the reader, then hand its facts over; drain the rest without
        work (Envoy may hold an observability stream open after the response is complete)."""
        r = self.r
        r.metrics.usage_streams.inc()
        decision_id = None
        reader: ResponseReader | None = None
        done = False
        req = first
        while True:
            kind = req.WhichOneof("request")
            if done:
                pass
            elif kind == "request_headers":
                decision_id = _header(req.request_headers, r.h["decision"])
                done = not r.awaits(decision_id)  # not marked for reading (or forgotten)
            elif kind == "response_headers":
                hdrs = req.response_headers
                reader = ResponseReader(_status(hdrs), _header(hdrs, "content-type") or "")
                if hdrs.end_of_stream:
                    r.response_read(decision_id, reader.finish())
                    done = True
            elif kind == "response_body" and reader is not None:
                t0 = time.perf_counter()
                reader.feed(req.response_body.body)
                if req.response_body.end_of_stream:
                    r.response_read(decision_id, reader.finish())
                    done = True
                r.metrics.phase["response"].observe(time.perf_counter() - t0)
            try:
                req = await anext(rest)
            except StopAsyncIteration:
                break
        if not done and reader is not None:  # the stream ended before the response did (client gone)
            r.response_read(decision_id, reader.finish())


class _RoutingStream:
    """One request on the routing filter's stream: a method per phase (named as the message's
    ``request`` field), each returning the answer to that phase's message; the request body's
    may be an awaitable of it (``Router.route``)."""

    __slots__ = ("svc", "r", "path", "routed", "client", "may_inject", "chunks", "reader", "stripper")

    def __init__(self, svc: ExtProcServicer) -> None:
        self.svc = svc
        self.r = svc.r
        self.path = ""
        self.routed: Routed | None = None
        self.client: str | None = None
        self.may_inject = False
        self.chunks: list[bytes] = []
        self.reader: ResponseReader | None = None         # an injected stream's response is read here,
        self.stripper: UsageEventStripper | None = None   # and the usage event nobody asked for stripped

    def request_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        t0 = time.perf_counter()
        hdrs = req.request_headers
        self.path = _header(hdrs, ":path") or ""
        if _header(hdrs, ":method") != "POST" or api_for_path(self.path) == "unknown" or hdrs.end_of_stream:
            resp = self.svc.headers_skip  # not an LLM call: no buffering
        else:
            self.client = self.r.client_of(lambda name: _header(hdrs, name))
            self.may_inject = self.r.may_inject()
            resp = self.svc.headers_ask_response if self.may_inject else self.svc.headers_plain
        self.r.metrics.phase["request_headers"].observe(time.perf_counter() - t0)
        return resp

    def request_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | Awaitable[pb.ProcessingResponse]:
        if self.routed is not None:  # one decision per request (Envoy sends one final body)
            return pb.ProcessingResponse(request_body=pb.BodyResponse())
        self.chunks.append(req.request_body.body)
        if not req.request_body.end_of_stream:
            return pb.ProcessingResponse(request_body=pb.BodyResponse())
        t0 = time.perf_counter()
        body = b"".join(self.chunks)
        self.chunks.clear()
        routed = self.r.route(body, self.path, may_inject=self.may_inject, client=self.client)
        return self._routed(routed, t0) if isinstance(routed, Routed) else self._routed_later(routed, t0)

    async def _routed_later(self, routed: Awaitable[Routed], t0: float) -> pb.ProcessingResponse:
        return self._routed(await routed, t0)

    def _routed(self, routed: Routed, t0: float) -> pb.ProcessingResponse:
        self.routed = routed  # counted in its pool from here on: ``close`` counts it out
        if routed.new_body is not None:
            self.stripper = UsageEventStripper()
        resp = _body_response(self.r, routed)
        self.r.metrics.phase["request_body"].observe(time.perf_counter() - t0)
        return resp

    def request_trailers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())

    def response_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        routed = self.routed
        if self.stripper is None or routed is None:  # not an injected stream: the usage filter reads it
            return resp
        hdrs = req.response_headers
        self.reader = ResponseReader(_status(hdrs), _header(hdrs, "content-type") or "")
        if hdrs.end_of_stream:
            self.r.learn_from(routed.decision, routed.observation, routed.pool, self.reader.finish(), routed.client)
            self.reader = self.stripper = None
        elif self.reader.status == 200 and self.reader.streamed:
            resp.mode_override.CopyFrom(_READ_RESPONSE_BODY)
        else:  # not a stream: nothing to strip, but a 400 may be a misroute
            self.stripper = None
            resp.mode_override.CopyFrom(_READ_ERROR_BODY)
        return resp

    def response_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """Response chunks the routing stream reads (an injected stream, or its error body): fed
        to the reader; the usage event the client did not ask for is stripped."""
        body, routed, reader = req.response_body, self.routed, self.reader
        if reader is None or routed is None:
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        t0 = time.perf_counter()
        reader.feed(body.body)
        out = body.body
        if self.stripper is not None:
            out = self.stripper.feed(body.body)
            if body.end_of_stream:
                out += self.stripper.finish()
        if body.end_of_stream:
            self.r.learn_from(routed.decision, routed.observation, routed.pool, reader.finish(), routed.client)
            self.reader = self.stripper = None
        self.r.metrics.phase["response"].observe(time.perf_counter() - t0)
        if out == body.body:
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        return pb.ProcessingResponse(response_body=pb.BodyResponse(
            response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=out))))

    def response_trailers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    def close(self) -> None:
        """The stream ended, so the request did: its pool stops counting it."""
        if self.routed is not None:
            self.r.finished(self.routed.pool)


_PHASES = {name: getattr(_RoutingStream, name) for name in (
    "request_headers", "request_body", "request_trailers", "response_headers", "response_body", "response_trailers")}


def _body_response(r: Router, routed: Routed) -> pb.ProcessingResponse:
    """The request-body answer that carries a decision: its headers, the route cache cleared,
    the access-log metadata, and the body with include_usage injected where it was."""
    values = r.decision_headers(routed)
    if routed.new_body is not None:  # Envoy forwards the mutated body with the old length otherwise
        values.append(("content-length", str(len(routed.new_body))))
    mutation = pb.HeaderMutation(set_headers=[
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
        for k, v in values])
    meta = struct_pb2.Struct()
    meta.update({METADATA_NAMESPACE: r.decision_fields(routed)})
    common = pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
    resp = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=meta)
    if routed.new_body is not None:  # (protobuf copied ``common`` into resp: set it there)
        resp.request_body.response.body_mutation.body = routed.new_body
    return resp


def _status(headers: pb.HttpHeaders) -> int:
    text = _header(headers, ":status") or ""
    return int(text) if text.isdigit() else 0


class RequestEndsServicer(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's gRPC access-log stream, reduced to what the router needs from it: which checked
    requests have ended (the entries carry the decision id header and nothing of the prompt).
    Envoy batches entries (``buffer_flush_interval``), so this costs a message per batch, not
    per request."""

    def __init__(self, router: Router) -> None:
        self.r = router

    async def StreamAccessLogs(self, request_iterator, context):
        async for msg in request_iterator:
            header = self.r.h["decision"]  # per batch: the stream outlives a reload of the header names
            for entry in msg.http_logs.log_entry:
                decision_id = entry.request.request_headers.get(header)
                if decision_id:
                    self.r.request_ended(decision_id)
        return als_pb2.StreamAccessLogsResponse()
