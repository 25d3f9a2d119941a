"""The compose CPU profile, started for real without Docker (same commands, environment and mounted
files; compose host names mapped to loopback ports): requests go through Envoy to the pool the
router picks, and Prometheus' scrape targets answer."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import yaml
from compose_topology import REPO, Topology

SHORT_PROMPT = "Say hello in one short sentence."


def _chat(topology: Topology, content: str, max_tokens: int = 16) -> http.client.HTTPResponse:
    engine = topology.doc["services"]["pool-short-sim"]["command"]
    body = {"model": engine[engine.index("--model") + 1], "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    conn = http.client.HTTPConnection("127.0.0.1", topology.local("envoy", 10000), timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    resp = conn.getresponse()
    resp.data = resp.read()
    conn.close()
    return resp


def _served(topology: Topology, pool_host: str) -> float:
    """Requests a pool finished, from its own vLLM-named metrics."""
    total = 0.0
    for line in topology.scrape(pool_host, 8000).splitlines():
        if line.startswith("vllm:request_success_total{"):
            total += float(line.rpartition(" ")[2])
    return total


def test_sim_profile_runs_the_router_envoy_and_both_pools(sim_topology: Topology):
    assert set(sim_topology.procs) == {"router", "redis", "envoy", "pool-short-sim", "pool-long-sim"}
    assert all(p.poll() is None for p in sim_topology.procs.values())
    # the router follows the calibration shared through the compose Redis
    up = [ln for ln in sim_topology.scrape("router", 9464).splitlines() if ln.startswith("extproc_shared_state_up ")]
    assert up == ["extproc_shared_state_up 1.0"], up


def test_a_short_and_a_long_request_reach_their_pools_through_envoy(sim_topology: Topology):
    before = {p: _served(sim_topology, f"pool-{p}") for p in ("short", "long")}
    short = _chat(sim_topology, SHORT_PROMPT)
    assert short.status == 200, short.data[:500]
    assert short.getheader("x-token-pool") is None  # the router's headers go upstream, not back
    # ~12K tokens of prose: more than the short pool's 8,192-token window holds
    long_ = _chat(sim_topology, " ".join(["The merchants of the northern towns wrote about prices and roads."] * 1100))
    assert long_.status == 200, long_.data[:500]
    after = {p: _served(sim_topology, f"pool-{p}") for p in ("short", "long")}
    assert after["short"] - before["short"] == 1 and after["long"] - before["long"] == 1, (before, after)
    decisions = [ln for ln in sim_topology.scrape("router", 9464).splitlines()
                 if ln.startswith("extproc_decisions_total{")]
    pools = {ln.split('pool="')[1].split('"')[0] for ln in decisions}
    assert pools == {"short", "long"}, decisions


def test_prometheus_scrape_targets_answer_with_metrics(sim_topology: Topology):
    """Every target in envoy/compose/prometheus.yml is a compose service port that serves
    Prometheus text on the job's path."""
    doc = yaml.safe_load((REPO / "envoy" / "compose" / "prometheus.yml").read_text())
    seen = set()
    for job in doc["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for group in job["static_configs"]:
            for target in group["targets"]:
                host, _, port = target.rpartition(":")
                assert host in sim_topology.names, f"{job['job_name']}: {host} is no compose service"
                text = sim_topology.scrape(host, int(port), path)
                assert "# TYPE " in text, (target, text[:200])
                seen.add(sim_topology.names[host])
    assert {"router", "envoy", "pool-short-sim", "pool-long-sim"} <= seen


def test_the_router_container_health_check_passes(sim_topology: Topology):
    """The compose healthcheck command, with the router container's environment."""
    test = sim_topology.doc["services"]["router"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    _, env = sim_topology.command("router")
    out = subprocess.run([sys.executable, *test[2:]], env={**__import__("os").environ, **env},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SERVING" in out.stdout
