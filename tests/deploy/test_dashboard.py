"""The Grafana dashboard compose provisions: every query parses as PromQL and names only metrics
(and label values) that the running router, Envoy and pools really export."""

from __future__ import annotations

import json
import re

import promql_parser
import pytest
import yaml
from compose_topology import REPO, Topology, dotenv

DASHBOARD = REPO / "envoy" / "compose" / "grafana" / "dashboards" / "extproc.json"
PROVISIONING = REPO / "envoy" / "compose" / "grafana" / "provisioning"
# Grafana's own variables, replaced as Grafana would before the query reaches Prometheus.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}


def _queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]


def _selectors(node) -> list:
    """Every VectorSelector in a parsed expression."""
    if isinstance(node, promql_parser.VectorSelector):
        return [node]
    out = []
    for attr in ("args", "expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        for c in child if isinstance(child, list) else [child]:
            if c is not None and not isinstance(c, (str, int, float)):
                out += _selectors(c)
    return out


def _parse(expr: str):
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return promql_parser.parse(expr)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _exported(text: str) -> dict[str, list[dict]]:
    """Series name -> label sets of its samples, from Prometheus text as exposed. A labelled family
    with no child yet has only its TYPE line: its series appear at the first observation."""
    out: dict[str, list[dict]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            for suffix in (("_bucket", "_sum", "_count") if kind.strip() in ("histogram", "summary") else ("",)):
                out.setdefault(name + suffix, [])
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            out.setdefault(m[1], []).append(dict(_LABEL.findall(m[2] or "")))
    return out


def _ext_proc_routing_envoy_stats(tmp_path) -> str:
    """/stats/prometheus of a real Envoy whose routing filter is ext_proc (the compose file runs
    the ext_authz default; the dashboard covers both). Envoy creates filter stats at start."""
    import subprocess
    import urllib.request

    from extproc.service.envoy_config import EnvoyLayout, render_yaml
    from extproc.stack import _http_ok, _wait, envoy_binary, free_port

    admin = free_port()
    config = tmp_path / "ext-proc-routing.yaml"
    config.write_text(render_yaml(EnvoyLayout(listen_port=free_port(), admin_port=admin, routing_filter="ext_proc")))
    proc = subprocess.Popen([envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "-l", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{admin}/ready"), "envoy", 60, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5) as r:
            return r.read().decode()
    finally:
        proc.terminate()
        proc.wait(30)


def test_every_query_parses_and_the_dashboard_covers_the_issue():
    queries = _queries()
    assert queries
    for title, expr in queries:
        try:
            _parse(expr)
        except Exception as exc:  # noqa: BLE001 - the parser's own error, with the query
            pytest.fail(f"{title}: {expr!r} does not parse: {exc}")
    titles = " | ".join(t for t, _ in queries).lower()
    for topic in ("decisions per pool", "estimate error", "calibration", "spillovers", "misroutes", "fail-open",
                  "router time", "router round trip"):
        assert topic in titles, topic


def test_grafana_provisioning_loads_this_dashboard_from_prometheus():
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "extproc.yaml").read_text())["providers"][0]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in compose["volumes"]}
    # the provider's path is where compose mounts the directory holding this file
    assert (REPO / mounted[provider["options"]["path"]]).resolve() == DASHBOARD.parent.resolve()
    assert (REPO / mounted["/etc/grafana/provisioning"]).resolve() == PROVISIONING.resolve()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    uids = {t["datasource"]["uid"] for p in panels for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}


def test_every_metric_a_query_names_is_exported(sim_topology: Topology, tmp_path):
    # traffic first, so that histograms and labelled series exist
    import http.client
    for content in ("Say hello.", "Name three rivers."):
        conn = http.client.HTTPConnection("127.0.0.1", sim_topology.local("envoy", 10000), timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": dotenv()["MODEL"], "messages": [{"role": "user", "content": content}], "max_tokens": 4}),
            headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:300]
        resp.read()
        conn.close()
    exported: dict[str, list[dict]] = {}
    prometheus = yaml.safe_load((REPO / "envoy" / "compose" / "prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        for group in job["static_configs"]:
            for target in group["targets"]:
                host, _, port = target.rpartition(":")
                text = sim_topology.scrape(host, int(port), job.get("metrics_path", "/metrics"))
                for name, label_sets in _exported(text).items():
                    # Prometheus adds the target's labels (e.g. pool) to every sample it stores
                    exported.setdefault(name, []).extend({**ls, **group.get("labels", {})} for ls in label_sets)
    for name, label_sets in _exported(_ext_proc_routing_envoy_stats(tmp_path)).items():
        exported.setdefault(name, []).extend(label_sets)
    missing, no_series = [], []
    for title, expr in _queries():
        for sel in _selectors(_parse(expr)):
            if sel.name not in exported:
                missing.append(f"{title}: {sel.name}")
                continue
            for m in sel.matchers.matchers:
                if m.name != "__name__" and str(m.op).endswith("Equal") and \
                        not any(ls.get(m.name) == m.value for ls in exported[sel.name]):
                    no_series.append(f"{title}: {sel.name}{{{m.name}={m.value!r}}}")
    assert not missing, f"metrics no component exports: {missing}"
    assert not no_series, f"label values no series has: {no_series}"
