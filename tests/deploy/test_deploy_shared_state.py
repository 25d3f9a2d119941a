"""Compose and Kubernetes run the Redis the router replicas share their calibration through, with
service.shared_state wired to it (the compose profile really runs it: test_compose_sim_topology.py)."""

from __future__ import annotations

from urllib.parse import urlsplit

import yaml
from compose_topology import REPO, compose_doc, dockerfile_env

from extproc.config import load_config
from extproc.service.manifests import ClusterNames

NAMES = ClusterNames()
K8S = REPO / "envoy" / "kubernetes"


def _k8s(kind: str, name: str) -> dict:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _redis_args(args: list[str]) -> dict[str, str]:
    assert args[0] == "redis-server"
    return dict(zip(args[1::2], args[2::2]))


def test_kubernetes_routers_follow_the_redis_that_ships_beside_them():
    router = _k8s("Deployment", NAMES.router_service)["spec"]["template"]
    (container,) = router["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    url = env["EXTPROC_SERVICE__SHARED_STATE"]
    assert url == NAMES.shared_state_url
    config = load_config(str(REPO / "config" / "router.yaml"), {**dockerfile_env(), **env})
    assert config.service.shared_state == url
    host, port = urlsplit(url).hostname, urlsplit(url).port
    service = _k8s("Service", NAMES.redis_service)
    assert host == NAMES.fqdn(service["metadata"]["name"]) and service["spec"]["ports"][0]["port"] == port
    redis = _k8s("Deployment", NAMES.redis_service)
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (rc,) = redis["spec"]["template"]["spec"]["containers"]
    assert rc["image"] == "redis:7"  # the official image
    args = _redis_args(rc["args"])
    assert args["--maxmemory-policy"] == "noeviction" and args["--maxmemory"]  # bounded; the snapshot key stays
    assert args["--port"] == str(port)
    # only the router's pods reach it: whoever writes to it teaches the calibration
    policy = _k8s("NetworkPolicy", NAMES.redis_service)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= router["metadata"]["labels"].items()
    # a fleet-wide client hash key, from a Secret where the operator made one
    assert {"secretRef": {"name": "extproc-router-secrets", "optional": True}} in container["envFrom"]


def test_compose_routers_follow_the_compose_redis():
    doc = compose_doc()
    router, redis = doc["services"]["router"], doc["services"]["redis"]
    url = urlsplit(router["environment"]["EXTPROC_SERVICE__SHARED_STATE"])
    assert url.hostname == "redis" and redis["image"] == "redis:7"
    assert _redis_args(redis["command"])["--port"] == str(url.port)
    assert _redis_args(redis["command"])["--maxmemory-policy"] == "noeviction"
    # a router starts without Redis (from its own snapshot): it never waits for it to be healthy
    assert router["depends_on"]["redis"]["condition"] == "service_started"
