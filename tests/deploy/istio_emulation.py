"""What Istio builds for the ingress gateway from our manifests, as an Envoy bootstrap the real Envoy
can validate and run: the VirtualService's routes (by name, on Istio's ``outbound|port||host``
clusters), then the EnvoyFilter's patches applied the way Istio applies them (MERGE merges
messages and appends to lists; INSERT_BEFORE puts a filter before the matched one).

Only the patch kinds our EnvoyFilter uses are understood; any other fails loudly, so a new kind of
patch cannot pass unnoticed.
"""

from __future__ import annotations

import copy

ROUTER_FILTER = "envoy.filters.http.router"
# Istio's bootstrap caps downstream connections, by default at 2^31-1 (pkg/bootstrap/config.go)
ISTIO_OVERLOAD_MANAGER = {"resource_monitors": [{
    "name": "envoy.resource_monitors.global_downstream_max_connections",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                              "DownstreamConnectionsConfig", "max_active_downstream_connections": 2**31 - 1}}]}
_HCM = "envoy.filters.network.http_connection_manager"


def merge(into: dict, value: dict) -> None:
    """Protobuf merge as Istio's MERGE does it: messages recursively, lists appended, scalars set."""
    for key, v in value.items():
        if isinstance(v, dict) and isinstance(into.get(key), dict):
            merge(into[key], v)
        elif isinstance(v, list) and isinstance(into.get(key), list):
            into[key] = into[key] + copy.deepcopy(v)
        else:
            into[key] = copy.deepcopy(v)


def _route(http: dict, cluster_of) -> dict:
    matches = http.get("match") or [{}]
    assert len(matches) == 1 or all("headers" not in m for m in matches), "one Envoy route per match"
    routes = []
    for m in matches:
        match: dict = {"prefix": "/"}
        if "uri" in m:
            match = {"path": m["uri"]["exact"]}
        headers = [{"name": k, "string_match": {"exact": v["exact"]}} for k, v in (m.get("headers") or {}).items()]
        if "method" in m:
            headers.append({"name": ":method", "string_match": {"exact": m["method"]["exact"]}})
        if headers:
            match["headers"] = headers
        (dest,) = http["route"]
        routes.append({"name": http["name"], "match": match,
                       "route": {"cluster": cluster_of(dest["destination"]["host"], dest["destination"]["port"]["number"]),
                                 "timeout": http.get("timeout", "15s")}})
    return routes


def gateway_bootstrap(envoy_filter: dict, virtual_service: dict, endpoints: dict[tuple[str, int], int],
                      grpc_ports: set[int], listen_port: int, admin_port: int) -> dict:
    """The gateway's Envoy config: ``endpoints`` maps each Service (host, port) to a local port;
    ports in ``grpc_ports`` get HTTP/2 clusters (Istio's choice for a ``grpc`` Service port)."""
    def cluster_of(host: str, port: int) -> str:
        assert (host, port) in endpoints, f"the VirtualService sends to {host}:{port}, which is no Service"
        return f"outbound|{port}||{host}"

    routes = [r for http in virtual_service["spec"]["http"] for r in _route(http, cluster_of)]
    clusters = []
    for (host, port), local in endpoints.items():
        c = {"name": f"outbound|{port}||{host}", "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": f"outbound|{port}||{host}", "endpoints": [{"lb_endpoints": [
                 {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": local}}}}]}]}}
        if port in grpc_ports:
            c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
        clusters.append(c)
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "outbound_0.0.0.0_8080",
           "route_config": {"name": "http.8080", "virtual_hosts": [{"name": "*:80", "domains": ["*"], "routes": routes}]},
           "http_filters": [{"name": ROUTER_FILTER, "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    listener = {"name": "0.0.0.0_8080",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": _HCM, "typed_config": hcm}]}]}
    for patch in envoy_filter["spec"]["configPatches"]:
        apply_patch(patch, listener, hcm, routes, clusters)
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "overload_manager": ISTIO_OVERLOAD_MANAGER,
            "static_resources": {"listeners": [listener], "clusters": clusters}}


def apply_patch(patch: dict, listener: dict, hcm: dict, routes: list[dict], clusters: list[dict]) -> None:
    kind, op, value, match = patch["applyTo"], patch["patch"]["operation"], patch["patch"]["value"], patch["match"]
    assert match.get("context") == "GATEWAY", patch
    if kind == "NETWORK_FILTER" and op == "MERGE":
        assert match["listener"]["filterChain"]["filter"]["name"] == _HCM
        assert value["typed_config"]["@type"] == hcm["@type"]
        merge(hcm, {k: v for k, v in value["typed_config"].items() if k != "@type"})
    elif kind == "HTTP_FILTER" and op == "INSERT_BEFORE":
        anchor = match["listener"]["filterChain"]["filter"]["subFilter"]["name"]
        names = [f["name"] for f in hcm["http_filters"]]
        hcm["http_filters"].insert(names.index(anchor), copy.deepcopy(value))
    elif kind == "HTTP_ROUTE" and op == "MERGE":
        name = match["routeConfiguration"]["vhost"]["route"]["name"]
        hits = [r for r in routes if r["name"] == name]
        assert hits, f"the EnvoyFilter patches route {name!r}, which the VirtualService does not have"
        for r in hits:
            merge(r, value)
    elif kind == "LISTENER" and op == "MERGE":
        merge(listener, value)
    elif kind == "CLUSTER" and op == "MERGE":
        name = f"outbound|{match['cluster']['portNumber']}||{match['cluster']['service']}"
        hits = [c for c in clusters if c["name"] == name]
        assert hits, f"the EnvoyFilter patches cluster {name}, which no Service gives"
        merge(hits[0], value)
    else:
        raise AssertionError(f"patch kind this emulation does not know: {kind} {op}")
