"""The deployment files rendered for a router serving mTLS (tls_rendering.py; their schemas:
test_schemas.py): every gateway speaks TLS to the router's two ports with the router's name
checked and a client certificate, and the router's pod mounts the Secret its config names."""

from __future__ import annotations

import yaml
from compose_topology import REPO
from tls_rendering import TLS, rendered_with_tls

from extproc.service.manifests import ClusterNames

NAMES = ClusterNames()
ROUTER = NAMES.fqdn(NAMES.router_service)


def _objects(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_istio_and_gie_gateways_speak_mtls_to_both_router_ports():
    files = rendered_with_tls()
    for path in ("envoy/istio/routing.yaml", "envoy/gie/gateway.yaml"):
        rule = _one(_objects(files[path]), "DestinationRule", NAMES.router_service)
        ports = {p["port"]["number"]: p["tls"] for p in rule["spec"]["trafficPolicy"]["portLevelSettings"]}
        assert set(ports) == {NAMES.grpc_port, NAMES.http_port}, path
        for tls in ports.values():
            assert tls == {"mode": "MUTUAL", "credentialName": NAMES.gateway_tls_secret, "sni": ROUTER,
                           "subjectAltNames": [ROUTER]}, path
        assert "tls" not in rule["spec"]["trafficPolicy"]  # the metrics port stays plain HTTP


def test_envoy_gateway_checks_the_router_certificate_and_presents_its_own():
    docs = _objects(rendered_with_tls()["envoy/envoy-gateway/gateway.yaml"])
    policy = _one(docs, "BackendTLSPolicy", NAMES.router_service)
    assert policy["spec"]["targetRefs"] == [{"group": "", "kind": "Service", "name": NAMES.router_service,
                                             "sectionName": "grpc"}]
    assert policy["spec"]["validation"] == {"caCertificateRefs": [
        {"group": "", "kind": "ConfigMap", "name": NAMES.router_ca_configmap}], "hostname": ROUTER}
    gateway = _one(docs, "Gateway", "llm-gateway")
    assert gateway["spec"]["tls"]["backend"]["clientCertificateRef"]["name"] == NAMES.gateway_tls_secret
    extension = _one(docs, "EnvoyExtensionPolicy", "extproc-route")
    assert extension["spec"]["extProc"][0]["backendRefs"] == [{"name": NAMES.router_service, "port": NAMES.grpc_port}]


def test_the_compose_bootstrap_reaches_the_router_over_mtls():
    boot = yaml.safe_load(rendered_with_tls()["envoy/compose/envoy.yaml"])
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    for name, alpn in (("extproc", "h2"), ("extproc_http", "http/1.1")):
        common = clusters[name]["transport_socket"]["typed_config"]["common_tls_context"]
        assert common["alpn_protocols"] == [alpn]
        assert common["validation_context"]["trusted_ca"]["filename"] == TLS["envoy"]["ca"]
        assert common["tls_certificates"] == [{"certificate_chain": {"filename": TLS["envoy"]["cert"]},
                                               "private_key": {"filename": TLS["envoy"]["key"]}}]
    assert all("transport_socket" not in c for n, c in clusters.items() if n.startswith("pool_"))


def test_the_router_pod_mounts_the_secret_its_tls_config_names():
    deployment = next(d for d in _objects((REPO / "envoy/kubernetes/router.yaml").read_text()) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    secret = next(v for v in pod["volumes"] if "secret" in v)
    assert secret["secret"]["secretName"] == NAMES.router_tls_secret
    assert secret["secret"]["optional"] is True  # TLS off (the default): the pod starts without it
    for path in (TLS["cert"], TLS["key"], TLS["client_ca"]):
        assert path.rsplit("/", 1)[0] == mounts[secret["name"]], path
