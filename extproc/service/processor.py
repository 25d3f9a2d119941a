"""The gRPC servicers: protobuf in, ``Router`` calls (service/router.py), protobuf out.

One ext_proc ``Process`` method serves both ext_proc filters (see envoy_config.py):

* the routing filter's stream (``service.routing_filter: ext_proc``) — request headers, then the BUFFERED body; the body response sets
  the pool header and provenance headers, clears the route cache and emits dynamic metadata.
  The stream lives until Envoy finishes the HTTP request, so its end is the request's end:
  that is where in-flight counts per pool go down (load-aware spillover needs them);
* the usage filter's stream (``observability_mode``: Envoy does not wait for us) — only for
  requests the routing side marked as sampled; it reads ``usage.prompt_tokens`` from the JSON
  body or the SSE stream, or the exact count of a context-length 400, and feeds the calibrator.

``RequestEndsServicer`` reads Envoy's gRPC access log: which ext_authz-checked requests ended.

This module never parses JSON bodies itself: that is the core's (extproc.budget).
"""

from __future__ import annotations

import asyncio
import logging
import time

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from ..budget.request import api_for_path
from ..budget.usage import MAX_JSON_BODY, SSEUsageScanner, UsageEventStripper, usage_from_json
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
        # The three possible request-headers responses, built once (gRPC serialises a message
        # on each send; it is never mutated after this).
        strip = pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(remove_headers=router.s.router_headers())))
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
        r = self.r
        path = ""
        pool = None
        routed: Routed | None = None
        stripper: UsageEventStripper | None = None
        may_inject = False
        error_status = 0
        error_chunks: list[bytes] = []
        chunks: list[bytes] = []
        try:
            req = first
            while True:
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    t0 = time.perf_counter()
                    hdrs = req.request_headers
                    path = _header(hdrs, ":path") or ""
                    method = _header(hdrs, ":method") or ""
                    if method != "POST" or api_for_path(path) == "unknown" or hdrs.end_of_stream:
                        resp = self.headers_skip  # not an LLM call: no buffering
                    elif r.may_inject():
                        may_inject = True
                        resp = self.headers_ask_response
                    else:
                        resp = self.headers_plain
                    r.metrics.phase["request_headers"].observe(time.perf_counter() - t0)
                    yield resp
                elif kind == "request_body":
                    if routed is not None:  # one decision per request (Envoy sends one final body)
                        yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                    elif not req.request_body.end_of_stream:
                        chunks.append(req.request_body.body)
                        yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                    else:
                        chunks.append(req.request_body.body)
                        t0 = time.perf_counter()
                        body = b"".join(chunks)
                        chunks.clear()
                        if len(body) > r.s.offload_bytes:
                            # Keep the loop responsive for other streams: only the pure estimate runs
                            # in a thread; if this stream is cancelled meanwhile, nothing was counted.
                            d = await asyncio.to_thread(r.budget.route, body, path)
                            routed = r.record(d, body, path, may_inject)
                        else:
                            routed = r.decide(body, path, may_inject)
                        pool = routed.pool
                        if routed.new_body is not None:
                            stripper = UsageEventStripper()
                        yield self._body_response(routed)
                        r.metrics.phase["request_body"].observe(time.perf_counter() - t0)
                elif kind == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_headers":
                    resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                    if stripper is not None:
                        status = _header(req.response_headers, ":status")
                        ctype = _header(req.response_headers, "content-type") or ""
                        if status == "200" and "text/event-stream" in ctype:
                            resp.mode_override.CopyFrom(_READ_RESPONSE_BODY)
                        else:  # not a stream: nothing to strip; a 400 may be a context-length misroute
                            stripper = None
                            if status == "400" and not req.response_headers.end_of_stream:
                                error_status = 400
                                resp.mode_override.CopyFrom(_READ_ERROR_BODY)
                    yield resp
                elif kind == "response_body":
                    if error_status and routed is not None:
                        error_chunks.append(req.response_body.body)
                        if req.response_body.end_of_stream:
                            r.learn_from(routed.decision, routed.pool, error_status, None,
                                         b"".join(error_chunks)[:MAX_JSON_BODY], False)
                        yield pb.ProcessingResponse(response_body=pb.BodyResponse())
                    else:
                        yield self._strip_usage(req.response_body, routed, stripper)
                elif kind == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                try:
                    req = await anext(rest)
                except StopAsyncIteration:
                    break
        finally:
            if pool is not None:
                r.finished(pool)

    def _strip_usage(self, body: pb.HttpBody, routed: Routed | None,
                     stripper: UsageEventStripper | None) -> pb.ProcessingResponse:
        """Response chunks of a stream whose usage the router asked for: usage out, learned."""
        if stripper is None or routed is None:
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        t0 = time.perf_counter()
        had = stripper.prompt_tokens
        out = stripper.feed(body.body)
        if body.end_of_stream:
            out += stripper.finish()
        if had is None and stripper.prompt_tokens is not None:
            self.r.learn_from(routed.decision, routed.pool, 200, stripper.prompt_tokens, None, True)
        elif body.end_of_stream and stripper.prompt_tokens is None:
            self.r.metrics.usage.labels("stream_missed").inc()
        self.r.metrics.phase["response"].observe(time.perf_counter() - t0)
        if out == body.body:
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        return pb.ProcessingResponse(response_body=pb.BodyResponse(
            response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=out))))

    def _body_response(self, routed: Routed) -> pb.ProcessingResponse:
        values = self.r.decision_headers(routed)
        if routed.new_body is not None:  # Envoy forwards the mutated body with the old length otherwise
            values.append(("content-length", str(len(routed.new_body))))
        mutation = pb.HeaderMutation(set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
            for k, v in values])
        meta = struct_pb2.Struct()
        meta.update({METADATA_NAMESPACE: self.r.decision_fields(routed)})
        common = pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
        resp = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=meta)
        if routed.new_body is not None:  # (protobuf copied ``common`` into resp: set it there)
            resp.request_body.response.body_mutation.body = routed.new_body
        return resp

    # -- usage filter (observability mode: replies are never read) ------------------------------
    async def _observe(self, first: pb.ProcessingRequest, rest) -> None:
        """Read usage as soon as the response has it, then drain the stream without work:
        Envoy may hold an observability stream open after the response is complete."""
        r = self.r
        r.metrics.usage_streams.inc()
        sample_id = None
        status = None
        streamed = False
        scanner: SSEUsageScanner | None = None
        body: list[bytes] = []
        size = 0
        learned = False
        req = first
        while True:
            kind = req.WhichOneof("request")
            if learned:
                pass
            elif kind == "request_headers":
                sample_id = _header(req.request_headers, r.h["decision"])
                learned = sample_id not in r.pending  # not sampled (or forgotten): nothing to read
            elif kind == "response_headers":
                hdrs = req.response_headers
                status_text = _header(hdrs, ":status") or "0"
                status = int(status_text) if status_text.isdigit() else 0
                streamed = "text/event-stream" in (_header(hdrs, "content-type") or "")
                scanner = SSEUsageScanner() if streamed and status == 200 else None
                if hdrs.end_of_stream:
                    r.learn(sample_id, status, None, None, streamed)
                    learned = True
            elif kind == "response_body":
                t0 = time.perf_counter()
                chunk = req.response_body.body
                eos = req.response_body.end_of_stream
                if scanner is not None:
                    found = scanner.feed(chunk)
                    if found is None and eos:
                        found = scanner.finish()
                    if found is not None or eos:
                        r.learn(sample_id, status, found, None, streamed)
                        learned = True
                else:
                    if size + len(chunk) <= MAX_JSON_BODY:
                        body.append(chunk)
                        size += len(chunk)
                    if eos:
                        raw = b"".join(body)
                        tokens = usage_from_json(raw) if status == 200 else None
                        r.learn(sample_id, status, tokens, raw if status == 400 else None, streamed)
                        learned = True
                r.metrics.phase["response"].observe(time.perf_counter() - t0)
            try:
                req = await anext(rest)
            except StopAsyncIteration:
                break
        if not learned and sample_id:  # the stream ended before the response did (client gone)
            if scanner is not None:
                r.learn(sample_id, status, scanner.finish(), None, streamed)
            else:
                raw = b"".join(body)
                r.learn(sample_id, status, usage_from_json(raw) if status == 200 else None,
                        raw if status == 400 else None, streamed)


class RequestEndsServicer(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's gRPC access-log stream, reduced to what the router needs from it: which checked
    requests have ended (the entries carry the decision id header and nothing of the prompt).
    Envoy batches entries (``buffer_flush_interval``), so this costs a message per batch, not
    per request."""

    def __init__(self, router: Router) -> None:
        self.r = router

    async def StreamAccessLogs(self, request_iterator, context):
        header = self.r.h["decision"]
        async for msg in request_iterator:
            for entry in msg.http_logs.log_entry:
                decision_id = entry.request.request_headers.get(header)
                if decision_id:
                    self.r.request_ended(decision_id)
        return als_pb2.StreamAccessLogsResponse()
