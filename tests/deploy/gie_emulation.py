"""What Istio builds for a Gateway API gateway with InferencePools attached (the Inference
Extension), as an Envoy bootstrap the real Envoy can validate and run, and a stand-in endpoint
picker that speaks the picker's protocol.

From Istio's sources (pilot/pkg/config/kube/gateway, pilot/pkg/networking/core):

* each HTTPRoute rule is split into one route per match, named by the rule's ``name`` (or
  ``<namespace>.<route>.<index>``), and the routes sorted as Gateway API ranks matches: exact path
  over prefix, longer path, a method, more header matches (``sortHTTPRoutes``);
* an InferencePool backend is a headless "shadow" Service ``<pool>-ip-<sha256(pool)[:8]>`` on port
  54321; its cluster picks the host the picker names in the ``envoy.lb`` metadata
  (``x-gateway-destination-endpoint``), round robin when there is none (``applyOverrideHostPolicy``);
* the gateway's filter chain gets one ext_proc filter named ``envoy.filters.http.ext_proc`` (headers
  skipped, fail open: idle) before the router; a route whose backend is an InferencePool switches it
  on for its picker with FULL_DUPLEX_STREAMED bodies both ways (``InferencePoolExtProc``, route.go).

Then our EnvoyFilter is applied as Istio applies it (istio_emulation.apply_patch). Left out: the
gateway's TLS to the picker (a DestinationRule; plain HTTP/2 here) and Istio's other filters.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent import futures

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from istio_emulation import ISTIO_OVERLOAD_MANAGER, ROUTER_FILTER, apply_patch

PICKER_FILTER = "envoy.filters.http.ext_proc"
SHADOW_PORT = 54321
ENDPOINT_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
_HCM = "envoy.filters.network.http_connection_manager"


def shadow_service(pool: str, namespace: str) -> str:
    """Istio's shadow Service for an InferencePool (InferencePoolServiceName)."""
    return f"{pool}-ip-{hashlib.sha256(pool.encode()).hexdigest()[:8]}.{namespace}.svc.cluster.local"


def cluster_name(host: str, port: int) -> str:
    return f"outbound|{port}||{host}"


def _rank(match: dict) -> tuple:
    path = match.get("path") or {}
    kind = {"Exact": 3, "PathPrefix": 2, "RegularExpression": 1}.get(path.get("type"), -1)
    return (kind, len(path.get("value", "")), "method" in match, len(match.get("headers") or []))


def split_and_sort(route: dict) -> list[tuple[str, dict, dict]]:
    """(route name, the one match, the rule) per match, in the order Istio puts them."""
    ns, name = route["metadata"]["namespace"], route["metadata"]["name"]
    out = []
    for i, rule in enumerate(route["spec"]["rules"]):
        for m in rule.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]:
            out.append((rule.get("name") or f"{ns}.{name}.{i}", m, rule))
    # a stable sort, most specific first (Istio's sortHTTPRoutes)
    return sorted(out, key=lambda t: _rank(t[1]), reverse=True)


def _envoy_match(m: dict) -> dict:
    path = m.get("path") or {"type": "PathPrefix", "value": "/"}
    assert path["type"] in ("Exact", "PathPrefix"), path
    match: dict = {"path": path["value"]} if path["type"] == "Exact" else {"prefix": path["value"]}
    headers = [{"name": h["name"], "string_match": {"exact": h["value"]}} for h in m.get("headers") or []]
    assert all(h.get("type", "Exact") == "Exact" for h in m.get("headers") or [])
    if "method" in m:
        headers.append({"name": ":method", "string_match": {"exact": m["method"]}})
    if headers:
        match["headers"] = headers
    return match


def _picker_per_route(picker_cluster: str, fail_open: bool) -> dict:
    full_duplex = {"request_header_mode": "SEND", "request_body_mode": "FULL_DUPLEX_STREAMED",
                   "request_trailer_mode": "SEND", "response_header_mode": "SEND",
                   "response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND"}
    return {"@type": _PER_ROUTE, "overrides": {
        "failure_mode_allow": fail_open, "processing_mode": full_duplex,
        "grpc_service": {"envoy_grpc": {"cluster_name": picker_cluster}}}}


def _static_cluster(name: str, ports: list[int], http2: bool = False) -> dict:
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
             for p in ports]}]}}
    if http2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return c


def gateway_bootstrap(envoy_filter: dict, http_route: dict, inference_pools: list[dict],
                      pool_endpoints: dict[str, list[int]], picker_ports: dict[str, int],
                      router_endpoints: dict[tuple[str, int], int], grpc_ports: set[int],
                      listen_port: int, admin_port: int, access_log: str) -> dict:
    """The gateway's Envoy config. ``pool_endpoints``: local ports of each InferencePool's pods (by
    pool name); ``picker_ports``: each pool's picker; ``router_endpoints``: the router's Services."""
    pools = {p["metadata"]["name"]: p for p in inference_pools}
    ns = http_route["metadata"]["namespace"]
    routes, clusters = [], []
    for name, match, rule in split_and_sort(http_route):
        (ref,) = rule["backendRefs"]
        assert ref["kind"] == "InferencePool" and ref["group"] == "inference.networking.k8s.io", ref
        pool = pools[ref["name"]]  # the route names an InferencePool we ship
        picker = pool["spec"]["endpointPickerRef"]
        picker_host = f"{picker['name']}.{ns}.svc.cluster.local"
        routes.append({"name": name, "match": _envoy_match(match),
                       "route": {"cluster": cluster_name(shadow_service(ref["name"], ns), SHADOW_PORT),
                                 "timeout": rule.get("timeouts", {}).get("request", "15s")},
                       "typed_per_filter_config": {PICKER_FILTER: _picker_per_route(
                           cluster_name(picker_host, picker["port"]["number"]), picker.get("failureMode") == "FailOpen")}})
    for name, pool in pools.items():
        c = _static_cluster(cluster_name(shadow_service(name, ns), SHADOW_PORT), pool_endpoints[name])
        c["load_balancing_policy"] = {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                "override_host_sources": [{"metadata": {"key": LB_NAMESPACE, "path": [{"key": ENDPOINT_HEADER}]}}],
                "selected_host_key": {"key": LB_NAMESPACE, "path": [{"key": f"{ENDPOINT_HEADER}-served"}]},
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies."
                                              "round_robin.v3.RoundRobin"}}}]}}}}]}
        clusters.append(c)
        picker = pool["spec"]["endpointPickerRef"]
        clusters.append(_static_cluster(cluster_name(f"{picker['name']}.{ns}.svc.cluster.local", picker["port"]["number"]),
                                        [picker_ports[name]], http2=True))
    for (host, port), local in router_endpoints.items():
        clusters.append(_static_cluster(cluster_name(host, port), [local], http2=port in grpc_ports))
    idle_picker = {"@type": _EXT_PROC, "grpc_service": {"envoy_grpc": {"cluster_name": "dummy"}, "timeout": "10s"},
                   "failure_mode_allow": True, "message_timeout": "1000s",
                   "processing_mode": {"request_header_mode": "SKIP", "response_header_mode": "SKIP"},
                   "metadata_options": {"receiving_namespaces": {"untyped": [LB_NAMESPACE]},
                                        "forwarding_namespaces": {"untyped": [LB_NAMESPACE]}}}
    log_format = ("%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% upstream=%UPSTREAM_HOST% "
                  f"picked=%DYNAMIC_METADATA({LB_NAMESPACE}:{ENDPOINT_HEADER})% pool=%REQ(x-token-pool)%\n")
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "outbound_0.0.0.0_80",
           "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
               "path": access_log, "log_format": {"text_format_source": {"inline_string": log_format}}}}],
           "route_config": {"name": "http.80", "virtual_hosts": [{"name": "*:80", "domains": ["*"], "routes": routes}]},
           "http_filters": [{"name": PICKER_FILTER, "typed_config": idle_picker},
                            {"name": ROUTER_FILTER, "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    listener = {"name": "0.0.0.0_80", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": _HCM, "typed_config": hcm}]}]}
    for patch in envoy_filter["spec"]["configPatches"]:
        apply_patch(patch, listener, hcm, routes, clusters)
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "overload_manager": ISTIO_OVERLOAD_MANAGER,
            "static_resources": {"listeners": [listener], "clusters": clusters}}


class StandInPicker(pb_grpc.ExternalProcessorServicer):
    """An endpoint picker for one pool, speaking the picker's protocol as GIE's EPP does
    (pkg/epp/handlers): it reads the whole request body, then answers the headers with the picked
    endpoint in ``x-gateway-destination-endpoint`` and in the ``envoy.lb`` metadata (clearing the
    route cache), and streams the body back; bodyless requests get an endpoint at once. Responses
    stream through unchanged. It records every request it picked for and the headers it saw."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.seen: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def _picked(self, headers: dict[str, str]) -> pb.ProcessingResponse:
        with self._lock:
            self.seen.append(headers)
        lb = struct_pb2.Struct()
        lb.update({LB_NAMESPACE: {ENDPOINT_HEADER: self.endpoint}})
        mutation = pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=ENDPOINT_HEADER, raw_value=self.endpoint.encode()))])
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation,
                                                                          clear_route_cache=True)),
            dynamic_metadata=lb)

    @staticmethod
    def _body(chunk: bytes, end: bool, request: bool) -> pb.ProcessingResponse:
        body = pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(
            streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end))))
        return pb.ProcessingResponse(request_body=body) if request else pb.ProcessingResponse(response_body=body)

    def Process(self, request_iterator, context):
        headers: dict[str, str] = {}
        body = b""
        for req in request_iterator:
            kind = req.WhichOneof("request")
            if kind == "request_headers":
                headers = {h.key: (h.raw_value or h.value.encode()).decode()
                           for h in req.request_headers.headers.headers}
                if req.request_headers.end_of_stream:
                    yield self._picked(headers)
            elif kind == "request_body":
                body += req.request_body.body
                if req.request_body.end_of_stream:
                    yield self._picked(headers)
                    yield self._body(body, True, request=True)
            elif kind == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
            elif kind == "response_headers":
                yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            elif kind == "response_body":
                yield self._body(req.response_body.body, req.response_body.end_of_stream, request=False)
            elif kind == "response_trailers":
                yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def serve_picker(picker: StandInPicker, port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_ExternalProcessorServicer_to_server(picker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server
