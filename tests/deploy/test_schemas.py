"""Every Kubernetes object we ship (envoy/**/*.yaml) against its real schema, offline: the gateways'
kinds (Istio, Envoy Gateway, Gateway API, the Inference Extension) against their CRDs in
../shared/data/crds, strictly (crd_schema.py: a field the API server would prune is an error), and
Kubernetes' own kinds against Kubernetes' schemas (kubernetes-validate, strict). No object goes
unchecked, and the checker is shown to fail on an unknown field, a wrong type, a bad value."""

from __future__ import annotations

import copy

import pytest
import yaml
from crd_schema import REPO, CRDSchemas, CRDsUnavailable, describe, metadata_errors
from tls_rendering import rendered_with_tls

KUBERNETES_VERSION = "1.33"
# The gateways' API groups the CRDs must cover (the brief of the shared data: crds/)
GATEWAY_GROUPS = {"gateway.networking.k8s.io", "inference.networking.k8s.io", "gateway.envoyproxy.io",
                  "networking.istio.io"}


def shipped_objects() -> list[tuple[str, dict]]:
    """(file, object) for every Kubernetes object under envoy/: YAML documents with a string
    apiVersion and a kind (Envoy bootstraps have neither; Grafana's provisioning files say
    ``apiVersion: 1``)."""
    out = []
    for path in sorted((REPO / "envoy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str) and "kind" in doc:
                out.append((str(path.relative_to(REPO)), doc))
    return out


def tls_objects() -> list[tuple[str, dict]]:
    """The objects rendered from config/router.yaml with service.tls on (tls_rendering.py): not
    shipped, but what `extproc deploy-manifests` writes for a router serving mTLS."""
    out = []
    for path, text in rendered_with_tls().items():
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str) and "kind" in doc:
                out.append((f"{path} (service.tls)", doc))
    return out


OBJECTS = shipped_objects() + tls_objects()
IDS = [f"{path}:{describe(doc)}" for path, doc in OBJECTS]


@pytest.fixture(scope="module")
def crds() -> CRDSchemas:
    try:
        return CRDSchemas()
    except CRDsUnavailable as exc:
        pytest.skip(str(exc))


def _kubernetes_errors(doc: dict) -> list[str] | None:
    """Kubernetes' strict schema errors for a built-in kind; None when it is no built-in kind."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return None
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


def test_the_crds_cover_every_gateway_we_ship_for(crds):
    assert GATEWAY_GROUPS <= crds.groups()
    assert ("inference.networking.k8s.io/v1", "InferencePool") in crds.versions


def test_every_shipped_object_has_a_schema(crds):
    kinds = {(d["apiVersion"], d["kind"]) for _, d in OBJECTS}
    # the targets we ship: plain Kubernetes, Istio, Envoy Gateway, the Inference Extension
    assert {("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"),
            ("policy/v1", "PodDisruptionBudget"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
            ("networking.istio.io/v1alpha3", "EnvoyFilter"), ("gateway.networking.k8s.io/v1", "HTTPRoute"),
            ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"), ("inference.networking.k8s.io/v1", "InferencePool"),
            ("rbac.authorization.k8s.io/v1", "Role")} <= kinds
    unchecked = [f"{p}:{describe(d)} ({d['apiVersion']})" for p, d in OBJECTS
                 if not crds.knows(d) and _kubernetes_errors(d) is None]
    assert not unchecked, f"no CRD and no Kubernetes schema for: {unchecked}"


@pytest.mark.parametrize("path,doc", OBJECTS, ids=IDS)
def test_shipped_object_conforms_to_its_schema(path, doc, request):
    errors = _kubernetes_errors(doc)
    if errors is None:  # a gateway's kind: its CRD (the check skips without ../shared/data/crds)
        crds = request.getfixturevalue("crds")
        if not crds.knows(doc):
            pytest.fail(f"{doc['apiVersion']} {doc['kind']}: no schema (test_every_shipped_object_has_a_schema)")
        errors = crds.errors(doc)
    assert not errors, f"{path}: {describe(doc)}:\n  " + "\n  ".join(errors)


def test_the_cel_rules_our_objects_come_near():
    """The CRDs' CEL rules (x-kubernetes-validations) the schema check cannot evaluate, spelled out
    for the fields our objects use."""
    for path, doc in OBJECTS:
        what = f"{path}:{describe(doc)}"
        spec = doc.get("spec") or {}
        if doc["kind"] == "HTTPRoute":
            names = [r["name"] for r in spec["rules"] if "name" in r]
            assert len(names) == len(set(names)), what  # rule names are unique
            assert sum(len(r.get("matches") or [{}]) for r in spec["rules"]) <= 128, what
            for rule in spec["rules"]:
                for ref in rule.get("backendRefs") or []:
                    if ref.get("group", "") == "" and ref.get("kind", "Service") == "Service":
                        assert "port" in ref, what  # a Service reference names its port
        if doc["kind"] == "InferencePool":
            ref = spec["endpointPickerRef"]
            assert ref.get("kind", "Service") != "Service" or "port" in ref, what
            ports = [p["number"] for p in spec["targetPorts"]]
            assert len(ports) == len(set(ports)), what
        if doc["kind"] == "EnvoyExtensionPolicy":
            assert ("targetRef" in spec) != ("targetRefs" in spec), what
            for ext in spec["extProc"]:
                assert "backendRef" not in ext, what
                assert all(ref.get("port") for ref in ext["backendRefs"]), what
                assert not any(n.startswith("envoy.filters.http")
                               for n in ext.get("metadata", {}).get("writableNamespaces", [])), what
        if doc["kind"] == "EnvoyFilter":
            assert ("workloadSelector" in spec) + ("targetRefs" in spec) <= 1, what
            assert all("waypoint" not in p["match"] for p in spec["configPatches"]), what


# -- the checker can fail ---------------------------------------------------------------------------

def _shipped(kind: str, path: str) -> dict:
    return copy.deepcopy(next(d for p, d in OBJECTS if p == path and d["kind"] == kind))


@pytest.mark.parametrize("kind,path,mutate,expect", [
    # an unknown field, where the API server would silently drop it: at the top of spec, deep
    # inside a list, and in an object the CRD declares without properties
    ("HTTPRoute", "envoy/envoy-gateway/gateway.yaml",
     lambda d: d["spec"].update(rule=[]), "'rule' was unexpected"),
    ("HTTPRoute", "envoy/envoy-gateway/gateway.yaml",
     lambda d: d["spec"]["rules"][0]["matches"][0].update(header=[]), "'header' was unexpected"),
    ("EnvoyExtensionPolicy", "envoy/envoy-gateway/gateway.yaml",
     lambda d: d["spec"]["extProc"][0]["processingMode"]["request"].update(bodyMode="Buffered"),
     "'bodyMode' was unexpected"),
    ("EnvoyFilter", "envoy/istio/envoyfilter.yaml",
     lambda d: d["spec"]["configPatches"][0]["match"].update(listenr={}), "'listenr' was unexpected"),
    ("DestinationRule", "envoy/istio/routing.yaml",
     lambda d: d["spec"]["trafficPolicy"]["connectionPool"]["http"].update(idleTimeoutSeconds=3600),
     "'idleTimeoutSeconds' was unexpected"),
    ("InferencePool", "envoy/gie/inferencepools.yaml",
     lambda d: d["spec"]["endpointPickerRef"].update(portNumber=9002), "'portNumber' was unexpected"),
    ("InferencePool", "envoy/gie/inferencepools.yaml",
     lambda d: d["spec"]["endpointPickerRef"].update(failureMode="Open"), "is not one of"),
    ("InferencePool", "envoy/gie/inferencepools.yaml",
     lambda d: d["spec"].pop("targetPorts"), "'targetPorts' is a required property"),
    # a wrong type, a value outside an enum, a pattern, a bound, a missing required field
    ("EnvoyExtensionPolicy", "envoy/envoy-gateway/gateway.yaml",
     lambda d: d["spec"]["extProc"][0]["backendRefs"][0].update(port="50051"), "is not of type 'integer'"),
    ("HTTPRoute", "envoy/envoy-gateway/gateway.yaml",
     lambda d: d["spec"]["rules"][0]["matches"][0]["headers"][0].update(type="Exactly"), "is not one of"),
    ("EnvoyFilter", "envoy/istio/envoyfilter.yaml",
     lambda d: d["spec"]["configPatches"][0].update(applyTo="HTTP_FILTERS"), "is not one of"),
    ("ClientTrafficPolicy", "envoy/envoy-gateway/gateway.yaml",
     lambda d: d["spec"]["connection"].update(bufferLimit="50 MiB"), "does not match"),
    ("HTTPRoute", "envoy/envoy-gateway/gateway.yaml",
     lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(port=70000), "is greater than the maximum"),
    ("HTTPRoute", "envoy/envoy-gateway/gateway.yaml",
     lambda d: d["spec"]["rules"][0]["backendRefs"][0].pop("name"), "'name' is a required property"),
    # metadata is ObjectMeta's, strictly, whatever the kind
    ("EnvoyFilter", "envoy/istio/envoyfilter.yaml",
     lambda d: d["metadata"].update(label={"a": "b"}), "label"),
    ("EnvoyFilter", "envoy/istio/envoyfilter.yaml",
     lambda d: d["metadata"].update(name="Extproc_Filter"), "not a DNS subdomain"),
    # a version the CRDs do not serve
    ("EnvoyFilter", "envoy/istio/envoyfilter.yaml",
     lambda d: d.update(apiVersion="networking.istio.io/v2"), "no served CRD version"),
])
def test_the_checker_refuses_what_the_api_server_would_drop_or_reject(kind, path, mutate, expect, crds):
    doc = _shipped(kind, path)
    assert crds.errors(doc) == []
    mutate(doc)
    errors = crds.errors(doc)
    assert errors and any(expect in e for e in errors), errors


def test_the_checker_keeps_what_the_crd_leaves_open(crds):
    """Nodes marked x-kubernetes-preserve-unknown-fields (an EnvoyFilter's Envoy config) take any
    field: Envoy checks that part (tests/deploy/test_manifests.py runs it in the real Envoy)."""
    doc = _shipped("EnvoyFilter", "envoy/istio/envoyfilter.yaml")
    doc["spec"]["configPatches"][0]["patch"]["value"]["any_envoy_field"] = {"nested": [1, 2]}
    assert crds.errors(doc) == []


def test_without_the_crds_the_checks_skip_with_the_reason(tmp_path):
    with pytest.raises(CRDsUnavailable, match="shared/data/crds"):
        CRDSchemas(tmp_path / "crds")


def test_the_kubernetes_checker_refuses_an_unknown_field():
    doc = copy.deepcopy(next(d for p, d in OBJECTS if d["kind"] == "Deployment"))
    assert _kubernetes_errors(doc) == []
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert _kubernetes_errors(doc)
    assert metadata_errors({"metadata": {"name": "ok", "labelz": {}}})
