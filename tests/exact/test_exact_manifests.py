"""Where exact counts reach the pools in the shipped deployments: config/router.yaml's
``exact.pool_addresses`` are the pools' compose aliases and Kubernetes Services, on their port;
the image fetches the built-in tokenizers at build time."""

from __future__ import annotations

import pathlib

import yaml

from extproc.config import load_config
from extproc.service.manifests import ClusterNames, pool_tokenize_addresses

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_the_shipped_config_asks_the_pools_where_compose_and_kubernetes_serve_them():
    config = load_config(str(REPO / "config" / "router.yaml"), environ={})
    addresses = pool_tokenize_addresses(config, ClusterNames())
    rules = config.exact.rules
    assert {r.pool_url for r in rules} <= set(addresses.values()) and all(r.source == "local" for r in rules)
    text = (REPO / "config" / "router.yaml").read_text()
    assert yaml.safe_load(text)["exact"]["pool_addresses"] == addresses
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    aliases = {a for svc in compose.values() for a in (svc.get("networks") or {}).get("default", {}).get("aliases", [])}
    k8s = [d for d in yaml.safe_load_all((REPO / "envoy" / "kubernetes" / "vllm-pools.yaml").read_text())
           if d and d["kind"] == "Service"]
    router_ns = next(yaml.safe_load_all((REPO / "envoy" / "kubernetes" / "router.yaml").read_text()))["metadata"]["namespace"]
    for pool, url in addresses.items():
        host, port = url.removeprefix("http://").split(":")
        assert host in aliases, (host, aliases)
        svc = next(d for d in k8s if d["metadata"]["name"] == host)
        assert svc["metadata"]["namespace"] == router_ns and int(port) in [p["port"] for p in svc["spec"]["ports"]]


def test_the_image_carries_the_builtin_tokenizers():
    text = (REPO / "Dockerfile").read_text()
    assert "ENV XDG_CACHE_HOME=" in text and "family_dir(f) for f in BUILTIN" in text
