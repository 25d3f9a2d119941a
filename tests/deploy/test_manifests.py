"""The Istio, Envoy Gateway and Kubernetes manifests: the committed files are the rendering of
config/router.yaml (their schemas: test_schemas.py); the EnvoyFilter, patched
into a gateway's Envoy as Istio does it, is accepted by the real Envoy and routes requests through
the real router; the Envoy Gateway resources reference what exists."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest
import yaml
from compose_topology import REPO, Topology, dockerfile_env, dotenv
from istio_emulation import gateway_bootstrap

from extproc.config import load_config
from extproc.service.envoy_config import render as render_bootstrap
from extproc.service.manifests import ClusterNames, compose_envoy_args, render_all, write_all
from extproc.stack import _http_ok, _wait, envoy_binary, free_port

NAMES = ClusterNames()
K8S = REPO / "envoy" / "kubernetes"


def _docs(path) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]


def _kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in _docs(p.relative_to(REPO))]


def _bootstrap_filters(routing_filter: str) -> dict:
    from extproc.service.envoy_config import EnvoyLayout
    hcm = render_bootstrap(EnvoyLayout(routing_filter=routing_filter))["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in hcm["http_filters"]}


def _validate(path) -> subprocess.CompletedProcess:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
                          capture_output=True, text=True, timeout=60)


# -- generated files ------------------------------------------------------------------------------

def test_committed_manifests_are_the_rendering_of_the_router_config():
    assert write_all(REPO, check=True) == [], "run `extproc deploy-manifests` and commit the result"
    # the compose Envoy config is exactly what the documented CLI command prints
    out = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", *compose_envoy_args()],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env={"PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout == (REPO / "envoy" / "compose" / "envoy.yaml").read_text()


def test_rendering_follows_the_router_config(tmp_path):
    """Another pool header reaches every manifest (nothing is written twice by hand)."""
    (tmp_path / "config").mkdir()
    doc = yaml.safe_load((REPO / "config" / "router.yaml").read_text())
    doc["service"] = {**doc.get("service", {}), "pool_header": "x-llm-pool"}
    (tmp_path / "config" / "router.yaml").write_text(yaml.safe_dump(doc))
    files = render_all(tmp_path)
    for rel in ("envoy/compose/envoy.yaml", "envoy/istio/envoyfilter.yaml", "envoy/istio/routing.yaml",
                "envoy/envoy-gateway/gateway.yaml", "envoy/kubernetes/configmap.yaml", "envoy/gie/gateway.yaml",
                "envoy/gie/envoyfilter.yaml", "envoy/gie/envoyfilter-ext-proc.yaml"):
        assert "x-llm-pool" in files[rel], rel
        assert "x-token-pool" not in files[rel], rel


# -- Kubernetes ------------------------------------------------------------------------------------

def test_the_configmap_holds_a_config_the_router_accepts(tmp_path):
    configmap = _kind(_k8s_docs(), "ConfigMap", "extproc-router-config")
    path = tmp_path / "router.yaml"
    path.write_text(configmap["data"]["router.yaml"])
    config = load_config(str(path), environ=dockerfile_env())  # as the image runs it
    assert config.service.grpc_address.endswith(f":{NAMES.grpc_port}")
    assert config.service.http_address.endswith(f":{NAMES.http_port}")
    assert configmap["data"]["router.yaml"] == (REPO / "config" / "router.yaml").read_text()


def test_router_deployment_probes_health_over_grpc_and_mounts_its_config():
    docs = _k8s_docs()
    deploy = _kind(docs, "Deployment", NAMES.router_service)
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == NAMES.grpc_port and ports["http-check"] == NAMES.http_port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == NAMES.grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == "envoy.service.ext_proc.v3.ExternalProcessor"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    config_arg = container["args"][container["args"].index("--config") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir = config_arg.rsplit("/", 1)[0]
    assert volumes[mounts[config_dir]]["configMap"]["name"] == "extproc-router-config"
    snapshot_dir = dockerfile_env()["EXTPROC_SERVICE__SNAPSHOT_PATH"].rsplit("/", 1)[0]
    assert snapshot_dir in mounts  # the root filesystem is read-only: the snapshot needs a volume
    # several replicas, each reading the pools' own load: spillover on, against the ready pods
    # behind each pool's headless Service (README, "Spillover")
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    configmap = _kind(docs, "ConfigMap", "extproc-router-config")
    assert deploy["spec"]["replicas"] > 1
    config_file = REPO / "config" / "router.yaml"
    assert configmap["data"]["router.yaml"] == config_file.read_text()
    compose = load_config(str(config_file), {}).service.spillover
    assert [(m.pool, m.dns) for m in compose.pools] == [("short", "pool-short:8000"), ("long", "pool-long:8000")]
    spill = load_config(str(config_file), {**dockerfile_env(), **env}).service.spillover
    assert [m.pool for m in spill.pools] == ["short", "long"]
    for m in spill.pools:
        name, _, port = m.dns.rpartition(":")
        assert name.endswith(f".{NAMES.namespace}.svc.cluster.local") and int(port) == NAMES.pool_port
        headless = _kind(docs, "Service", name.split(".")[0])
        assert headless["spec"]["clusterIP"] == "None"
        pods = _kind(docs, "Deployment", NAMES.pool_service(m.pool))["spec"]["template"]["metadata"]["labels"]
        assert headless["spec"]["selector"].items() <= pods.items()
        assert NAMES.pool_port in [p["port"] for p in headless["spec"]["ports"]]
    # the grace period outlasts the router's own drain (service.grace_period_s)
    drain = load_config(None, {}).service.grace_period_s
    assert pod["terminationGracePeriodSeconds"] > drain

    service = _kind(docs, "Service", NAMES.router_service)
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["grpc"]["port"] == NAMES.grpc_port and by_name["grpc"]["appProtocol"] == "grpc"
    pdb = _kind(docs, "PodDisruptionBudget", NAMES.router_service)
    assert pdb["spec"]["minAvailable"] >= 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    hpa = _kind(docs, "HorizontalPodAutoscaler", NAMES.router_service)
    assert hpa["spec"]["scaleTargetRef"]["name"] == NAMES.router_service
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"] - 1 and hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_vllm_pools_match_the_router_pools():
    docs = _k8s_docs()
    windows = {p.name: p.max_context for p in load_config(str(REPO / "config" / "router.yaml"), {}).budget.pools}
    for pool, window in windows.items():
        deploy = _kind(docs, "Deployment", NAMES.pool_service(pool))
        (container,) = deploy["spec"]["template"]["spec"]["containers"]
        # the release compose runs and the simulated engines behave as (.env's VLLM_TAG)
        assert container["image"] == f"vllm/vllm-openai:{dotenv()['VLLM_TAG']}"
        assert int(container["args"][container["args"].index("--max-model-len") + 1]) == window
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        service = _kind(docs, "Service", NAMES.pool_service(pool))
        assert service["spec"]["ports"][0]["port"] == NAMES.pool_port


# -- Istio -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,routing_filter", [("envoy/istio/envoyfilter.yaml", "ext_authz"),
                                                 ("envoy/istio/envoyfilter-ext-proc.yaml", "ext_proc")])
def test_istio_envoy_filter_carries_our_filters_with_our_settings(path, routing_filter):
    (ef,) = _docs(path)
    assert ef["kind"] == "EnvoyFilter" and ef["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway"}
    inserted = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    assert [p["patch"]["operation"] for p in inserted] == ["INSERT_BEFORE", "INSERT_BEFORE"]
    assert all(p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
               for p in inserted)
    ours = _bootstrap_filters(routing_filter)
    for p in inserted:
        f = p["patch"]["value"]
        mine = ours[f["name"]]
        cfg = f["typed_config"]
        assert cfg["@type"] == mine["@type"] and cfg["failure_mode_allow"] is True
        # everything but the cluster names (Istio's) is our bootstrap's: timeouts, body limits,
        # modes, the allowed and disallowed headers
        strip = json.dumps(cfg).replace(NAMES.istio_cluster(NAMES.fqdn(NAMES.router_service), NAMES.grpc_port), "extproc")
        strip = strip.replace(NAMES.istio_cluster(NAMES.fqdn(NAMES.router_service), NAMES.http_port), "extproc_http")
        strip = strip.replace(f"http://{NAMES.fqdn(NAMES.router_service)}:{NAMES.http_port}", "http://127.0.0.1:50052")
        assert json.loads(strip) == mine, f["name"]


def _istio_bootstrap(path: str, endpoints: dict, listen_port: int = 10000, admin_port: int = 9901) -> dict:
    (ef,) = _docs(path)
    vs = _kind(_docs("envoy/istio/routing.yaml"), "VirtualService")
    return gateway_bootstrap(ef, vs, endpoints, {NAMES.grpc_port}, listen_port, admin_port)


def _service_endpoints(local) -> dict:
    router = NAMES.fqdn(NAMES.router_service)
    out = {(router, NAMES.grpc_port): local("router", 50051), (router, NAMES.http_port): local("router", 50052)}
    for pool in ("short", "long"):
        out[(NAMES.fqdn(NAMES.pool_service(pool)), NAMES.pool_port)] = local(f"pool-{pool}", 8000)
    return out


@pytest.mark.parametrize("path", ["envoy/istio/envoyfilter.yaml", "envoy/istio/envoyfilter-ext-proc.yaml"])
def test_istio_gateway_with_the_envoy_filter_validates_in_envoy(path, tmp_path):
    doc = _istio_bootstrap(path, _service_endpoints(lambda host, port: port))
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(doc))
    result = _validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_istio_routing_sends_to_the_services_we_ship():
    docs = _docs("envoy/istio/routing.yaml")
    services = {f"{d['metadata']['name']}.{d['metadata']['namespace']}.svc.cluster.local"
                for d in _k8s_docs() if d["kind"] == "Service"}
    vs = _kind(docs, "VirtualService")
    assert vs["spec"]["gateways"] == [_kind(docs, "Gateway")["metadata"]["name"]]
    for http in vs["spec"]["http"]:
        for dest in http["route"]:
            assert dest["destination"]["host"] in services
    for rule in [d for d in docs if d["kind"] == "DestinationRule"]:
        assert rule["spec"]["host"] in services


@pytest.mark.parametrize("path", ["envoy/istio/envoyfilter.yaml", "envoy/istio/envoyfilter-ext-proc.yaml"])
def test_istio_gateway_routes_through_the_router(path, sim_topology: Topology, tmp_path):
    """The gateway Envoy as Istio would configure it, in front of the compose topology's router and
    pools: a short request lands on the short pool, a long one on the long pool."""
    listen, admin = free_port(), free_port()
    doc = _istio_bootstrap(path, _service_endpoints(sim_topology.local), listen, admin)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(doc))
    log = open(tmp_path / "envoy.log", "wb")
    proc = subprocess.Popen([envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1",
                             "-l", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{admin}/ready"), "gateway envoy", 60, proc, tmp_path / "envoy.log")
        before = _pool_counts(sim_topology)
        for content in ("Say hello.", " ".join(["Prices, roads and weather in the northern towns."] * 1300)):
            conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=60)
            conn.request("POST", "/v1/chat/completions", headers={"content-type": "application/json",
                                                                  "x-token-pool": "long"},  # stripped: not the client's call
                         body=json.dumps({"model": dotenv()["MODEL"], "messages": [{"role": "user", "content": content}],
                                          "max_tokens": 8}))
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status == 200, body[:300]
        after = _pool_counts(sim_topology)
        assert after["short"] - before["short"] == 1 and after["long"] - before["long"] == 1, (before, after)
        with __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=failure_mode_allowed",
                                                          timeout=5) as r:
            stats = r.read().decode()
        assert all(line.rstrip().endswith(": 0") for line in stats.splitlines() if line.strip()), stats  # no fail-open
    finally:
        proc.terminate()
        proc.wait(30)


def _pool_counts(topology: Topology) -> dict[str, float]:
    out = {}
    for pool in ("short", "long"):
        out[pool] = sum(float(ln.rpartition(" ")[2]) for ln in topology.scrape(f"pool-{pool}", 8000).splitlines()
                        if ln.startswith("vllm:request_success_total{"))
    return out


# -- Envoy Gateway -----------------------------------------------------------------------------------

def test_envoy_gateway_policy_attaches_the_router_as_ext_proc_with_our_settings():
    docs = _docs("envoy/envoy-gateway/gateway.yaml")
    k8s = _k8s_docs()
    policy = _kind(docs, "EnvoyExtensionPolicy")
    (target,) = policy["spec"]["targetRefs"]
    route = _kind(docs, "HTTPRoute", target["name"])
    (ext,) = policy["spec"]["extProc"]
    (backend,) = ext["backendRefs"]
    router = _kind(k8s, "Service", backend["name"])
    assert backend["port"] in {p["port"] for p in router["spec"]["ports"] if p.get("appProtocol") == "grpc"}
    ours = _bootstrap_filters("ext_proc")["extproc.route"]
    assert ext["failOpen"] is ours["failure_mode_allow"] is True
    assert ext["messageTimeout"] == ours["message_timeout"]
    assert ext["processingMode"]["request"]["body"].upper() == ours["processing_mode"]["request_body_mode"]
    assert "response" not in ext["processingMode"]  # nothing on the response path, as ours
    # routing on the pool header to the pool Services, the largest as the default
    pools = [p.name for p in load_config(str(REPO / "config" / "router.yaml"), {}).budget.pools]
    header = load_config(None, {}).service.pool_header
    for rule in route["spec"]["rules"]:
        (ref,) = rule["backendRefs"]
        assert _kind(k8s, "Service", ref["name"])["spec"]["ports"][0]["port"] == ref["port"]
        values = {h["value"] for m in rule["matches"] for h in m.get("headers", []) if h["name"] == header}
        assert values <= set(pools)
        assert ref["name"] == NAMES.pool_service(values.pop() if values else pools[-1])
    gateway = _kind(docs, "Gateway")
    assert all(r["spec"]["parentRefs"] == [{"name": gateway["metadata"]["name"]}]
               for r in docs if r["kind"] == "HTTPRoute")
    assert gateway["spec"]["gatewayClassName"] == _kind(docs, "GatewayClass")["metadata"]["name"]
    limit = _kind(docs, "ClientTrafficPolicy")["spec"]["connection"]["bufferLimit"]
    assert int(limit.removesuffix("Mi")) << 20 >= _bootstrap_filters("ext_authz")["extproc.route"][
        "with_request_body"]["max_request_bytes"]
