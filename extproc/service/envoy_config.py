"""Envoy bootstrap for the router: rendered from the router's own config, so pools, header names
and ports are said once. ``envoy/envoy.yaml`` is this rendering for the built-in defaults.

Filter chain (decode order):

1. an *early* header mutation (``early_header_mutation_extensions``, applied before the route is
   chosen — an HTTP filter would be too late: the route is cached before filters run) removes
   every client copy of the router's headers, so a client cannot pick its pool even while the
   router is down or slow.
2. the routing filter, named ``extproc.route``: request headers held, body buffered; the router's
   answer sets the pool header and clears the route cache, so the route is chosen again on the
   header. Nothing on the response path. ``failure_mode_allow``: if the router is down or slow,
   the request continues on the default route — the largest pool, which holds anything (an
   outage costs efficiency, never correctness). Two kinds (``service.routing_filter``):

   * ``ext_authz`` (default): one HTTP check per request with the body (``with_request_body``),
     answered by the router's check endpoint (service/check.py); the pool and provenance headers
     of its 200 go upstream (``allowed_upstream_headers``) and into dynamic metadata;
   * ``ext_proc``: a gRPC stream per request, headers then the BUFFERED body; the body response
     sets the headers. The stream lives until the request ends, which spillover needs.
3. ``ext_proc`` (usage) in ``observability_mode``: Envoy sends the response headers and body
   chunks without waiting for replies (no added latency). It is enabled only on the routes of
   requests the router marked for reading (``<prefix>read: 1``: those at risk of a misroute and a
   share for calibration), so router CPU on the response path is bounded by that share, not by
   every chunk of every stream.

Routes: for each pool, a read and an unread route matching the pool header; LLM paths
without a pool header (router down, or not yet decided) go to the largest pool; anything else
goes to the largest pool with both ext_proc filters disabled (no buffering, no gRPC).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import yaml

from ..config import ConfigError, EnvoyTlsSettings, ServiceSettings
from .check import CHECK_PREFIX, HEALTH_PATH

LLM_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
ROUTE_FILTER = "extproc.route"
METADATA_NAMESPACE = "extproc.route"  # dynamic metadata the router emits (access logs)
USAGE_FILTER = "extproc.usage"
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_AUTHZ_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
AUTHZ_METADATA_NAMESPACE = "envoy.filters.http.ext_authz"  # where ext_authz puts allowed response headers
BUFFER_LIMIT = 50 * 1024 * 1024  # 8 MiB prompts and their JSON escapes pass with room


@dataclass(frozen=True)
class EnvoyLayout:
    listen_address: str = "127.0.0.1"
    listen_port: int = 10000
    admin_address: str = "127.0.0.1"  # 0.0.0.0 where a Prometheus in another container scrapes it
    admin_port: int = 9901
    router_address: tuple[str, int] = ("127.0.0.1", 50051)
    router_http_address: tuple[str, int] = ("127.0.0.1", 50052)
    routing_filter: str = "ext_authz"
    pools: tuple[tuple[str, str, int], ...] = (("short", "127.0.0.1", 8001), ("long", "127.0.0.1", 8002))
    pool_header: str = "x-token-pool"
    header_prefix: str = "x-token-"
    message_timeout_ms: int = 1000
    upstream_timeout_s: int = 600
    access_log_path: str = "/dev/stdout"
    # Names of the clusters that reach the router: our own bootstrap defines them; a gateway
    # (Istio) names the clusters it builds for the router's Service its own way.
    router_cluster: str = "extproc"
    router_http_cluster: str = "extproc_http"
    # Envoy's global cap on open downstream connections (the overload manager refuses new ones
    # above it instead of running out of memory or file descriptors). LLM calls are long: at
    # 1,000 req/s of 30 s streams about 30,000 are open at once, so the cap sits above that.
    max_downstream_connections: int = 50_000
    # TLS to the router (service.tls.envoy): both router clusters get an UpstreamTlsContext
    router_tls: EnvoyTlsSettings | None = None


def _socket(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _cluster(name: str, host: str, port: int, http2: bool = False, health_path: str | None = None) -> dict:
    c: dict = {
        "name": name,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",  # service names (compose, k8s) resolve
        "connect_timeout": "0.25s",
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(host, port)}}]}]},
    }
    if http2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {
                    "max_concurrent_streams": 1024,
                    "initial_stream_window_size": 16 * 1024 * 1024,
                    "initial_connection_window_size": 64 * 1024 * 1024}}}}
        c["health_checks"] = [{
            "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s",
            "unhealthy_threshold": 2, "healthy_threshold": 1,
            "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
        }]
    if health_path:
        c["health_checks"] = [{
            "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s",
            "unhealthy_threshold": 2, "healthy_threshold": 1, "http_health_check": {"path": health_path}}]
    if http2 or health_path:
        # Fail-open must stay fast: a dead router is reported unhealthy, and the filter fails
        # without waiting for a connection that cannot come.
        c["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return c


def upstream_tls(tls: EnvoyTlsSettings, alpn: str) -> dict:
    """The transport socket of a cluster that reaches the router over TLS: the router's
    certificate checked against ``ca`` (and its name, with ``server_name``, also sent as SNI), and
    under mTLS Envoy's own certificate. ``alpn``: h2 for gRPC, http/1.1 for the check endpoint."""
    common: dict = {"alpn_protocols": [alpn], "validation_context": {"trusted_ca": {"filename": tls.ca}}}
    if tls.server_name:
        common["validation_context"]["match_typed_subject_alt_names"] = [
            {"san_type": "DNS", "matcher": {"exact": tls.server_name}}]
    if tls.cert:
        common["tls_certificates"] = [{"certificate_chain": {"filename": tls.cert},
                                       "private_key": {"filename": tls.key}}]
    ctx: dict = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                 "common_tls_context": common}
    if tls.server_name:
        ctx["sni"] = tls.server_name
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def _route(match: dict, cluster: str, timeout_s: int, per_filter: dict) -> dict:
    return {"match": match, "route": {"cluster": cluster, "timeout": f"{timeout_s}s"},
            "typed_per_filter_config": copy.deepcopy(per_filter)}  # shared dicts would turn into YAML anchors


def _disabled(kind: str = "ext_proc") -> dict:
    return {"@type": _AUTHZ_PER_ROUTE if kind == "ext_authz" else _PER_ROUTE, "disabled": True}


def per_route_filters(lay: EnvoyLayout) -> dict[str, dict]:
    """``typed_per_filter_config`` for each kind of route: ``read`` (a pool's route for requests
    whose response the router reads), ``unread``, ``undecided`` (an LLM call without a pool
    header: router down or slow) and ``other`` (no LLM call: neither filter runs)."""
    return {"read": {}, "unread": {USAGE_FILTER: _disabled()}, "undecided": {USAGE_FILTER: _disabled()},
            "other": {ROUTE_FILTER: _disabled(lay.routing_filter), USAGE_FILTER: _disabled()}}


LLM_PATH_REGEX = "^(" + "|".join(LLM_PATHS) + ")/?(\\?.*)?$"


def _seconds(ms: int) -> str:
    return f"{ms / 1000:g}s"


def _ext_proc(lay: EnvoyLayout, modes: tuple[str, str, str, str], stat_prefix: str, **extra) -> dict:
    """An ext_proc filter on the router's cluster: (request headers, request body, response
    headers, response body) modes; fails open, with an explicit message timeout. Its own stat
    prefix keeps the routing and the usage filter apart in Envoy's stats (fail-open counts)."""
    keys = ("request_header_mode", "request_body_mode", "response_header_mode", "response_body_mode")
    return {"@type": _EXT_PROC,
            "grpc_service": {"envoy_grpc": {"cluster_name": lay.router_cluster}, "timeout": _seconds(lay.message_timeout_ms)},
            "failure_mode_allow": True, "message_timeout": _seconds(lay.message_timeout_ms),
            "processing_mode": {**dict(zip(keys, modes)), "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
            "stat_prefix": stat_prefix, **extra}


def http_filters(lay: EnvoyLayout) -> list[dict]:
    """The router's two HTTP filters, in decode order, to go before Envoy's router filter: the
    routing filter (``service.routing_filter``) and the usage filter (observability mode)."""
    ours = router_headers(lay)
    if lay.routing_filter == "ext_authz":
        names = {"patterns": [{"exact": h} for h in ours]}
        route_filter = {
            "@type": _EXT_AUTHZ, "transport_api_version": "V3", "failure_mode_allow": True, "clear_route_cache": True,
            # partial: a body over the limit reaches the router truncated (unreadable: the largest
            # pool) instead of being refused with a 413
            "with_request_body": {"max_request_bytes": BUFFER_LIMIT, "allow_partial_message": True},
            # the router needs the path and the body, never the client's credentials
            "disallowed_headers": {"patterns": [{"exact": h} for h in ("authorization", "proxy-authorization", "cookie")]},
            "http_service": {
                "server_uri": {"uri": "http://%s:%d" % lay.router_http_address, "cluster": lay.router_http_cluster,
                               "timeout": _seconds(lay.message_timeout_ms)},
                "path_prefix": CHECK_PREFIX,
                "authorization_response": {"allowed_upstream_headers": names, "dynamic_metadata_from_headers": names}},
        }
    else:
        route_filter = _ext_proc(lay, ("SEND", "BUFFERED", "SKIP", "NONE"), "route", allow_mode_override=True,
                                 mutation_rules={"disallow_system": True},
                                 metadata_options={"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}})
    return [{"name": ROUTE_FILTER, "typed_config": route_filter},
            {"name": USAGE_FILTER, "typed_config": _ext_proc(lay, ("SEND", "NONE", "SEND", "STREAMED"), "usage",
                                                             observability_mode=True)}]


def router_headers(lay: EnvoyLayout) -> list[str]:
    return ServiceSettings(pool_header=lay.pool_header, header_prefix=lay.header_prefix).router_headers()


def header_strip(lay: EnvoyLayout) -> dict:
    """The early header mutation that removes every client copy of the router's headers before
    the route is chosen (an HTTP filter would run after the route is cached)."""
    return {"name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": [{"remove": h} for h in router_headers(lay)]}}


def request_ends_log(lay: EnvoyLayout) -> list[dict]:
    """With ext_authz, a check does not see its request end; Envoy's gRPC access log tells the
    router, in batches, which decision ids have ended (in-flight counts, spillover). The ext_proc
    routing stream ends with the request: nothing to log."""
    if lay.routing_filter != "ext_authz":
        return []
    decision_header = f"{lay.header_prefix}decision"
    return [{
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"header_filter": {"header": {"name": decision_header, "present_match": True}}},
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {"log_name": "extproc.ends", "transport_api_version": "V3",
                              "grpc_service": {"envoy_grpc": {"cluster_name": lay.router_cluster}},
                              "buffer_flush_interval": "0.05s", "buffer_size_bytes": 16384},
            "additional_request_headers_to_log": [decision_header]}}]


def render(layout: EnvoyLayout | None = None, with_router: bool = True) -> dict:
    """The Envoy bootstrap as a dict (``yaml.safe_dump`` it for a file). ``with_router=False``
    leaves the router's filters out (same listener and routes): the baseline that overhead is
    measured against."""
    lay = layout or EnvoyLayout()
    largest = lay.pools[-1][0]
    read_header = f"{lay.header_prefix}read"
    per_route = per_route_filters(lay)
    routes = []
    for name, _, _ in lay.pools:
        pool_match = {"name": lay.pool_header, "string_match": {"exact": name}}
        routes.append(_route(
            {"prefix": "/", "headers": [pool_match, {"name": read_header, "string_match": {"exact": "1"}}]},
            f"pool_{name}", lay.upstream_timeout_s, per_route["read"]))
        routes.append(_route({"prefix": "/", "headers": [pool_match]}, f"pool_{name}",
                             lay.upstream_timeout_s, per_route["unread"]))
    routes.append(_route({"safe_regex": {"regex": LLM_PATH_REGEX},
                          "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
                         f"pool_{largest}", lay.upstream_timeout_s, per_route["undecided"]))
    routes.append(_route({"prefix": "/"}, f"pool_{largest}", lay.upstream_timeout_s, per_route["other"]))

    decision_namespace = AUTHZ_METADATA_NAMESPACE if lay.routing_filter == "ext_authz" else METADATA_NAMESPACE
    fmt = ("[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%\" %RESPONSE_CODE% "
           "id=%REQ(X-REQUEST-ID)% "
           "%BYTES_RECEIVED% %BYTES_SENT% %DURATION%ms upstream=%UPSTREAM_CLUSTER% "
           f"pool=%REQ({lay.pool_header})% budget=%REQ({lay.header_prefix}budget)% "
           f"source=%REQ({lay.header_prefix}source)% reason=%REQ({lay.header_prefix}reason)% "
           f"ext_proc=%FILTER_STATE({ROUTE_FILTER}:PLAIN)% "
           f"decision=%DYNAMIC_METADATA({decision_namespace})%\n")
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llm",
        # the edge proxy: Envoy appends the peer it saw to x-forwarded-for, the one address a
        # client cannot forge (the router's default client identity, service.client_trusted_hops)
        "use_remote_address": True,
        "preserve_external_request_id": True,  # a client's x-request-id still names its request in the logs
        "codec_type": "AUTO",
        "stream_idle_timeout": "600s",
        "request_timeout": "0s",
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": lay.access_log_path, "log_format": {"text_format_source": {"inline_string": fmt}}}}]
        + request_ends_log(lay),
        "route_config": {"name": "pools", "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": routes}]},
        "early_header_mutation_extensions": [header_strip(lay)],
        "http_filters": http_filters(lay) + [
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    if not with_router:
        hcm["http_filters"] = hcm["http_filters"][-1:]
        del hcm["early_header_mutation_extensions"]
        hcm["access_log"] = hcm["access_log"][:1]
        for route in routes:
            route["typed_per_filter_config"] = {}
    clusters = [_cluster(f"pool_{name}", host, port) for name, host, port in lay.pools]
    router = [_cluster(lay.router_cluster, *lay.router_address, http2=True)]
    if with_router and lay.routing_filter == "ext_authz":
        router.append(_cluster(lay.router_http_cluster, *lay.router_http_address, health_path=HEALTH_PATH.decode()))
    if lay.router_tls is not None:
        for c, alpn in zip(router, ("h2", "http/1.1")):
            c["transport_socket"] = upstream_tls(lay.router_tls, alpn)
    clusters += router
    return {
        "admin": {"address": _socket(lay.admin_address, lay.admin_port)},
        "overload_manager": overload_manager(lay),
        "static_resources": {
            "listeners": [{
                "name": "llm",
                "address": _socket(lay.listen_address, lay.listen_port),
                "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": clusters,
        },
    }


def overload_manager(lay: EnvoyLayout) -> dict:
    """A global downstream connection limit: without one Envoy accepts connections until it runs
    out of file descriptors or memory (and warns about it at every start)."""
    return {"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                     "DownstreamConnectionsConfig",
            "max_active_downstream_connections": lay.max_downstream_connections}}]}


def layout_from_config(config, listen_port: int = 10000, admin_port: int = 9901,
                       upstreams: list[str] | tuple[str, ...] = (), message_timeout_ms: int = 1000,
                       listen_address: str = "127.0.0.1", router: str | None = None,
                       router_http: str | None = None, admin_address: str = "127.0.0.1",
                       with_tls: bool = True) -> EnvoyLayout:
    """The Envoy layout for a router config; ``upstreams`` are ``pool=host:port`` (default:
    127.0.0.1:8001, 8002, … in pool order). ``with_tls=False``: no TLS to the router even if it
    serves it (a gateway that sets up its own, from Kubernetes Secrets)."""
    given = {}
    for item in upstreams:
        name, _, addr = item.partition("=")
        host, _, port = addr.rpartition(":")
        if not name or not host or not port.isdigit():
            raise ValueError(f"upstream must be pool=host:port, got {item!r}")
        given[name] = (host, int(port))
    pools = []
    for i, p in enumerate(config.budget.pools):
        host, port = given.pop(p.name, ("127.0.0.1", 8001 + i))
        pools.append((p.name, host, port))
    if given:
        raise ValueError(f"upstream for unknown pool(s): {', '.join(given)}")
    rhost, _, rport = (router or config.service.grpc_address).rpartition(":")
    if not rhost or not rport.isdigit():
        raise ValueError(f"router address must be host:port, got {router!r}")
    hhost, _, hport = (router_http or config.service.http_address).rpartition(":")
    if not hhost or not hport.isdigit():
        raise ValueError(f"router HTTP address must be host:port, got {router_http!r}")
    return EnvoyLayout(listen_address=listen_address, listen_port=listen_port, admin_address=admin_address,
                       router_tls=router_tls(config) if with_tls else None, admin_port=admin_port, router_address=(rhost, int(rport)),
                       router_http_address=(hhost, int(hport)), routing_filter=config.service.routing_filter,
                       upstream_timeout_s=max(1, int(config.service.max_request_s)),
                       pools=tuple(pools), pool_header=config.service.pool_header,
                       header_prefix=config.service.header_prefix, message_timeout_ms=message_timeout_ms)


def router_tls(config) -> EnvoyTlsSettings | None:
    """How Envoy reaches this router: None in plaintext; under TLS the config must say (ConfigError)."""
    tls = config.service.tls
    if tls is None:
        return None
    if tls.envoy is None:
        raise ConfigError("service.tls.envoy", "the router serves TLS: Envoy's side (ca, and under mTLS cert and "
                          "key) is needed to render its clusters")
    return tls.envoy


def render_yaml(layout: EnvoyLayout | None = None, with_router: bool = True) -> str:
    head = ("# Generated by `extproc envoy-config` from the router's config (extproc/service/envoy_config.py).\n"
            "# Edit the router config and re-render rather than editing this file by hand.\n")
    return head + yaml.safe_dump(render(layout, with_router), sort_keys=False, width=120)
