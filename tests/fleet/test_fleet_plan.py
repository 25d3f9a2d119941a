"""Cost model, SLO sizing, workloads and the fleet CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fleet_helpers import trace_or_skip

from extproc.fleet import cost, plan, routing, sim, workload
from extproc.fleet.instance import hardware_profile, profile_named



def test_time_scaling_hits_the_rate_and_tiling_keeps_the_lengths():
    trace = trace_or_skip("azure-conv")
    wl = workload.from_trace(trace, rate=500, count=3 * len(trace.times) + 5)
    assert abs(wl.rate - 500) / 500 < 0.01
    assert np.all(np.diff(wl.arrival) >= 0)
    n = len(trace.times)
    assert np.array_equal(wl.prompt[:n], trace.prompt) and np.array_equal(wl.prompt[n:2 * n], trace.prompt)
    p = workload.poisson(trace, rate=200, count=20_000, seed=1)
    assert abs(p.rate - 200) / 200 < 0.03


def test_traces_match_the_shared_data_readme():
    # Share of requests <= 8,192 total tokens: code 100%, conv 99.99%, mooncake 53.7%.
    shares = {name: float((t.prompt + t.output <= 8_192).mean())
              for name, t in ((n, trace_or_skip(n)) for n in ("azure-code", "azure-conv", "mooncake"))}
    assert shares["azure-code"] == 1.0
    assert 0.9995 < shares["azure-conv"] < 1.0
    assert abs(shares["mooncake"] - 0.537) < 0.001


def test_alpha_of_load_makes_the_formula_exact_and_alpha_of_count_overstates_it():
    rng = np.random.default_rng(0)
    short_n, long_n = 9_000, 1_000
    prompt = np.concatenate([rng.integers(200, 2_000, short_n), rng.integers(20_000, 60_000, long_n)])
    output = rng.integers(50, 500, short_n + long_n)
    is_short = prompt + output <= 8_192
    s, l = profile_named("short"), profile_named("long")
    m = cost.cost_model(s, l, prompt, output, is_short)
    # The pooled fleet's load, computed directly from per-request instance-seconds.
    homog = cost.load_s(l, prompt, output).sum()
    pooled = (cost.load_s(s, prompt[is_short], output[is_short]).sum()
              + cost.load_s(l, prompt, output)[~is_short].sum())
    assert m.savings == pytest.approx(1 - pooled / homog, rel=1e-9)
    assert m.alpha_count == pytest.approx(0.9)
    assert m.alpha_load < m.alpha_count and m.drift > 0
    assert m.rho > 1


def test_sizing_returns_the_fewest_instances_that_meet_the_slo():
    trace = trace_or_skip("azure-conv")
    wl = workload.from_trace(trace, rate=60, count=4_000)
    prof = profile_named("short")
    slo = plan.SLO()
    sized = plan.size_pool("short", wl, prof, slo)
    assert sized.feasible and sized.instances >= 1
    assert slo.met(sized.result, prof)
    fewer = sim.simulate(wl, [sim.PoolSpec("short", prof, sized.instances - 1)], routing.LeastLoaded)
    assert not slo.met(fewer, prof)


def test_slo_queue_basis_forgives_only_the_prompts_own_prefill():
    prof = profile_named("long")
    n = 200
    # One request at a time on one instance: no queueing at all, 60K-token prompts.
    wl = workload.synthetic(np.arange(n) * 100.0, np.full(n, 60_000), np.full(n, 10))
    res = sim.simulate(wl, [sim.PoolSpec("long", prof, 1)], routing.LeastLoaded)
    assert np.nanmin(res.ttft) > 2.0  # the prefill alone breaks a literal 2 s TTFT
    assert plan.SLO(ttft_basis="queue").met(res, prof)
    assert not plan.SLO(ttft_basis="total").met(res, prof)
    with pytest.raises(ValueError, match="ttft_basis"):
        plan.SLO(ttft_basis="mean")


def test_pool_shape_follows_the_papers_pools():
    assert hardware_profile("llama3-70b-a100", max_model_len=8_192).max_num_seqs == 128
    assert hardware_profile("llama3-70b-a100", max_model_len=65_536).max_num_seqs == 16
    q = hardware_profile("qwen3-235b-mi300x", max_model_len=65_536)
    assert q.gpus == 8 and q.max_num_seqs * q.max_model_len <= q.kv_capacity_tokens
    with pytest.raises(ValueError, match="unknown hardware"):
        hardware_profile("tpu", max_model_len=8_192)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True, text=True, timeout=300)


def test_plan_cli_json_table_and_plot(tmp_path):
    trace_or_skip("azure-conv")
    png = tmp_path / "sweep.png"
    out = _cli("plan", "--rate", "100", "--requests", "3000", "--sweep", "4096,8192", "--plot", str(png), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [p["short_limit"] for p in doc["plans"]] == [4096, 8192]
    for p in doc["plans"]:
        assert p["homogeneous_gpus"] == 8 * p["homogeneous_instances"] > 0
        assert p["savings"] == pytest.approx(1 - p["pooled_gpus"] / p["homogeneous_gpus"])
        assert 0 < p["cost_model"]["alpha_load"] <= 1 and p["cost_model"]["rho"] > 1
        assert any("SLO" in a for a in p["assumptions"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert doc["rate_asked"] == 100
    for p in doc["plans"]:
        for row in [p["homogeneous"], *p["pools"]]:
            assert row["slo_ttft_basis"] == "queue"
            # the queue basis forgives the prompt's own prefill: never above the literal TTFT
            assert row["slo_ttft_s_p99"] is None or row["slo_ttft_s_p99"] <= row["ttft_s_p99"] + 1e-9
            if row["feasible"] and row["slo_ttft_s_p99"] is not None:
                assert row["slo_ttft_s_p99"] <= p["slo"]["ttft_p99_s"]
    table = _cli("plan", "--rate", "100", "--requests", "3000")
    assert table.returncode == 0, table.stderr
    assert "cost model: alpha" in table.stdout and "per year at $2.21/GPU-h" in table.stdout
    # the rate asked for, and apart from it what the time-scaled trace delivered
    assert "3,000 requests at 100 req/s asked (" in table.stdout and "req/s delivered by the trace" in table.stdout
    # the TTFT feasibility is judged on, labelled, beside the literal TTFT
    assert "queue TTFT p99 s" in table.stdout and "TTFT p99 s" in table.stdout
    assert "feasible: P99 queue TTFT (TTFT beyond the prompt's own unloaded prefill) <= 2 s" in table.stdout
    total = _cli("plan", "--rate", "100", "--requests", "3000", "--ttft-basis", "total")
    assert total.returncode == 0 and "queue TTFT" not in total.stdout and "feasible: P99 TTFT <= 2 s" in total.stdout


def test_the_cli_says_rates_and_gpu_changes_in_words():
    from extproc.fleet.cli import change_text, rate_text

    assert rate_text(1000, 1000.4) == "1,000 req/s"
    assert rate_text(1000, 883.2) == "1,000 req/s asked (883 req/s delivered by the trace's arrivals)"
    assert change_text(0.135) == "13.5% fewer"
    assert change_text(-0.097) == "9.7% more"  # never "-9.7% fewer"
    assert change_text(0.0) == "no change"


def test_sized_rows_carry_the_ttft_the_slo_judges():
    prof = profile_named("long")
    n = 200
    wl = workload.synthetic(np.arange(n) * 100.0, np.full(n, 60_000), np.full(n, 10))
    res = sim.simulate(wl, [sim.PoolSpec("long", prof, 1)], routing.LeastLoaded)
    sized = plan.Sized("long", prof, 1, n, res)
    queue, total = sized.row(plan.SLO(ttft_basis="queue")), sized.row(plan.SLO(ttft_basis="total"))
    assert total["slo_ttft_s_p99"] == pytest.approx(total["ttft_s_p99"]) and total["ttft_s_p99"] > 2.0
    assert queue["slo_ttft_s_p99"] < 2.0 < queue["ttft_s_p99"]  # what made it feasible, now printed
    assert "slo_ttft_s_p99" not in sized.row()


def test_simulate_cli_reports_each_pool():
    trace_or_skip("azure-conv")
    out = _cli("simulate", "--rate", "100", "--requests", "3000", "--short-instances", "3", "--long-instances", "1",
               "--error", "lognormal:0.02:0.03")
    assert out.returncode == 0, out.stderr
    assert "short" in out.stdout and "long" in out.stdout and "µs per request" in out.stdout
    # the warm-up left out of the latencies is said, with its size
    assert "latencies leave out the first 10% of requests (300, --warmup" in out.stdout
    doc = json.loads(_cli("simulate", "--rate", "100", "--requests", "2000", "--router", "round-robin",
                          "--instances", "4", "--json").stdout)
    assert doc["completed"] + doc["rejected"] == 2000
    assert doc["warmup"] == 0.1 and doc["rate_asked"] == 100


@pytest.mark.parametrize("args, message", [
    (("--short", "70000", "--long", "65536"), "must be below"),
    (("--error", "bogus"), "--error"),
    (("--error", "lognormal:x"), "lognormal:BIAS:SD"),
    (("--trace", "/nonexistent.csv"), "not found"),
    (("--rate", "0"), "--rate"),
])
def test_cli_refuses_bad_input_with_the_reason(args, message):
    out = _cli("simulate", "--instances", "2", "--router", "least-loaded", *args)
    assert out.returncode == 2
    assert message in out.stderr


def test_simulate_cli_runs_n_pools():
    trace_or_skip("mooncake")
    doc = json.loads(_cli("simulate", "--trace", "mooncake", "--rate", "20", "--requests", "2000",
                          "--pool", "8192:20", "--pool", "32768:20", "--pool", "131072:40", "--json").stdout)
    assert [p["name"] for p in doc["pools"]] == ["8K", "32K", "128K"]
    assert all(p["requests"] > 0 for p in doc["pools"])
    assert doc["completed"] + doc["rejected"] == 2000
