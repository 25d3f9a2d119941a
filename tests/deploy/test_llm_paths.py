"""Which paths every shipped routing sends through the router: the LLM APIs (Anthropic Messages
among them), and never a path that generates nothing (``/v1/messages/count_tokens``, ``/v1/models``),
which goes to the default route of the largest pool with no router call."""

from __future__ import annotations

import re

import pytest
import yaml
from compose_topology import REPO

from extproc.service.envoy_config import LLM_PATHS, ROUTE_FILTER

GENERATIONS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
NOT_GENERATIONS = ("/v1/messages/count_tokens", "/v1/models", "/tokenize", "/v1/messagesx")


def _docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / rel).read_text()) if d]


def test_the_llm_paths_are_the_generation_apis():
    assert set(LLM_PATHS) == set(GENERATIONS)


def _envoy_route(rel: str, path: str) -> dict:
    """The first route of a bootstrap that a POST without the router's headers takes (what the
    routing filter runs on), matched as Envoy matches: prefix, or RE2 over the whole path."""
    (listener,) = _docs(rel)[0]["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        match = route["match"]
        if any(h.get("present_match") or "string_match" in h and h["name"] != ":method"
               for h in match.get("headers", [])):
            continue  # a pool route: needs the header only the router sets
        if "safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path) is None:
            continue
        if "prefix" in match and not path.startswith(match["prefix"]):
            continue
        return route
    raise AssertionError(f"no route for {path} in {rel}")


@pytest.mark.parametrize("rel", ["envoy/envoy.yaml", "envoy/compose/envoy.yaml"])
def test_envoy_bootstraps_route_generations_through_the_router_and_nothing_else(rel):
    for path in GENERATIONS + tuple(p + "?beta=true" for p in GENERATIONS) + ("/v1/messages/",):
        route = _envoy_route(rel, path)
        assert ROUTE_FILTER not in route.get("typed_per_filter_config", {}), path  # the router runs
    for path in NOT_GENERATIONS:
        route = _envoy_route(rel, path)
        assert route["typed_per_filter_config"][ROUTE_FILTER].get("disabled") is True, path


def _exact_paths(matches: list[dict]) -> set[str]:
    return {m["path"]["value"] for m in matches if m.get("path", {}).get("type") == "Exact"}


def test_istio_sends_every_generation_api_through_the_router_route():
    vs = next(d for d in _docs("envoy/istio/routing.yaml") if d["kind"] == "VirtualService")
    undecided = [r for r in vs["spec"]["http"] if any("uri" in m for m in r.get("match", []))]
    assert len(undecided) == 1
    assert {m["uri"]["exact"] for m in undecided[0]["match"]} == set(GENERATIONS)


@pytest.mark.parametrize("rel", ["envoy/envoy-gateway/gateway.yaml", "envoy/gie/gateway.yaml"])
def test_gateway_api_routes_match_every_generation_api_exactly(rel):
    routes = [d for d in _docs(rel) if d["kind"] == "HTTPRoute"]
    llm_rules = [rule for r in routes for rule in r["spec"]["rules"] if _exact_paths(rule.get("matches", []))]
    assert llm_rules
    for rule in llm_rules:  # every pool rule, read and unread, and the undecided one
        assert _exact_paths(rule["matches"]) == set(GENERATIONS), rule.get("name")
    # count_tokens and the rest: only a prefix rule (no router policy, no pool header) takes them
    prefixes = [m["path"]["value"] for r in routes for rule in r["spec"]["rules"] for m in rule.get("matches", [])
                if m.get("path", {}).get("type") == "PathPrefix"]
    assert prefixes == ["/"]
