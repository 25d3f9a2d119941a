"""The fleet simulator against closed-form queueing results, conservation and reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleet_helpers import trace_or_skip

from extproc.fleet import routing, sim, workload
from extproc.fleet.instance import InstanceProfile, profile_named


def _server(c: int, step_s: float, **over) -> InstanceProfile:
    """An instance that is exactly c parallel servers: every running sequence gets one token per
    ``step_s`` whatever the batch, prefill costs nothing, the cache never fills."""
    fields = dict(name="mmc", model="m", gpus=1, max_model_len=1 << 20, max_num_seqs=c,
                  kv_capacity_tokens=1 << 40, prefill_tokens_per_s=1e15, prefill_base_s=0.0,
                  prefill_quadratic_s=0.0, decode_base_s=step_s, decode_per_seq_s=0.0, decode_per_kv_token_s=0.0)
    fields.update(over)
    return InstanceProfile(**fields)


def _erlang_c(c: int, a: float) -> float:
    """Probability an arrival waits in M/M/c with offered load a = lambda/mu."""
    rho = a / c
    head = sum(a ** k / math.factorial(k) for k in range(c))
    tail = a ** c / math.factorial(c) / (1 - rho)
    return tail / (head + tail)


def _mmc_run(c: int, lam: float, mean_service_s: float, n: int, seed: int):
    step = 1e-3
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / lam, n))
    # Service = (output - 1) decode steps: geometric outputs with a 1,000-step mean are exponential
    # service times to within one step.
    mean_steps = mean_service_s / step
    output = 1 + rng.geometric(1 / mean_steps, n)
    wl = workload.synthetic(arrival, np.full(n, 16), output)
    res = sim.simulate(wl, [sim.PoolSpec("p", _server(c, step), 1)], routing.LeastLoaded, warmup=0.05)
    return res, step


@pytest.mark.parametrize("c, rho", [(1, 0.7), (8, 0.85)])
def test_mmc_waiting_time_matches_erlang_c(c, rho):
    mean_s = 1.0
    lam = rho * c / mean_s
    res, step = _mmc_run(c, lam, mean_s, 120_000, seed=3)
    m = res.measured()
    # Time to first token is the wait in queue plus the one iteration that prefills the prompt
    # (and, when the instance was busy, the rest of the iteration in progress).
    wait = res.ttft[m]
    p_wait = _erlang_c(c, lam * mean_s)
    expected_wq = p_wait / (c / mean_s - lam)
    assert abs(wait.mean() - expected_wq) / expected_wq < 0.05, (wait.mean(), expected_wq)
    assert abs((wait > 2 * step).mean() - p_wait) < 0.02
    # Sojourn = wait + service: the service part must be the configured exponential mean.
    sojourn = (res.finish - res.workload.arrival)[m]
    assert abs(sojourn.mean() - (expected_wq + mean_s)) / (expected_wq + mean_s) < 0.05


def test_littles_law_and_conservation_on_a_real_trace():
    trace = trace_or_skip("azure-conv")
    wl = workload.from_trace(trace, rate=200, count=20_000)
    pools = [sim.PoolSpec("short", profile_named("short"), 12), sim.PoolSpec("long", profile_named("long"), 8)]
    res = sim.simulate(wl, pools, lambda inst, w: routing.TokenBudget(inst, w, ratios=np.ones(len(w))))
    # Every arrival completes or is counted as rejected.
    assert ((res.status == sim.DONE) | (res.status == sim.REJECTED)).all()
    assert (res.status == sim.DONE).sum() + (res.status == sim.REJECTED).sum() == len(wl)
    done = res.status == sim.DONE
    assert np.all(res.first_token[done] >= wl.arrival[done])
    assert np.all(res.finish[done] >= res.first_token[done])
    # Little's law over the whole run: time-average in system = throughput x mean time in system.
    l_avg = res.little_area / res.horizon_s
    w = (res.finish - wl.arrival)[done].mean()
    lam = done.sum() / res.horizon_s
    assert abs(l_avg - lam * w) / l_avg < 1e-6
    assert sum(p.requests + p.rejected for p in res.pools) == len(wl)


def test_a_seed_reproduces_a_run_and_another_seed_does_not():
    trace = trace_or_skip("azure-code")

    def run(seed):
        wl = workload.poisson(trace, rate=100, count=5_000, seed=seed)
        ratios = routing.ErrorModel("lognormal", bias=0.0, sd=0.1).ratios(len(wl), seed)
        pools = [sim.PoolSpec("short", profile_named("short"), 4), sim.PoolSpec("long", profile_named("long"), 4)]
        return sim.simulate(wl, pools, lambda inst, w: routing.TokenBudget(inst, w, ratios=ratios))

    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a.first_token, b.first_token, equal_nan=True)
    assert np.array_equal(a.finish, b.finish, equal_nan=True)
    assert np.array_equal(a.instance_of, b.instance_of)
    assert not np.array_equal(a.finish, c.finish, equal_nan=True)


def test_preemption_when_the_cache_runs_out_and_every_request_still_completes():
    # A cache of 4,096 tokens for 8 sequences of 1,000-token prompts that grow by 400 tokens each.
    prof = _server(8, 0.01, kv_capacity_tokens=4_096, max_model_len=4_096)
    n = 200
    wl = workload.synthetic(np.arange(n) * 0.05, np.full(n, 1_000), np.full(n, 400))
    res = sim.simulate(wl, [sim.PoolSpec("p", prof, 1)], routing.LeastLoaded)
    assert res.preempted.sum() > 0
    assert (res.status == sim.DONE).all()
    # No more than the cache ever: the utilisation integral stays within capacity.
    assert 0 < res.pools[0].kv_util <= 1.0


def test_misrouted_requests_are_rejected_by_the_short_pool_not_lost():
    n = 1_000
    rng = np.random.default_rng(0)
    prompt = rng.integers(6_000, 9_000, n)
    wl = workload.synthetic(np.arange(n) * 0.01, prompt, np.full(n, 100))
    ratios = np.full(n, 0.8)  # the estimate is 20% short: prompts near the limit look like they fit
    pools = [sim.PoolSpec("short", profile_named("short"), 2), sim.PoolSpec("long", profile_named("long"), 2)]
    res = sim.simulate(wl, pools, lambda inst, w: routing.TokenBudget(inst, w, ratios=ratios))
    truly_long = wl.total > 8_192
    est_short = np.ceil(prompt * 0.8) + 100 <= 8_192
    assert (res.status == sim.REJECTED).sum() == (truly_long & est_short).sum() > 0
    assert (res.status[~(truly_long & est_short)] == sim.DONE).all()


def test_spillover_moves_load_to_the_long_pool_only_when_the_short_pool_is_full():
    trace = trace_or_skip("azure-conv")
    wl = workload.from_trace(trace, rate=300, count=6_000)
    pools = [sim.PoolSpec("short", profile_named("short"), 2), sim.PoolSpec("long", profile_named("long"), 6)]
    routers = []

    def factory(spill):
        def make(inst, w):
            routers.append(routing.TokenBudget(inst, w, ratios=np.ones(len(w)), spill_at=spill))
            return routers[-1]
        return make

    plain = sim.simulate(wl, pools, factory(None))
    spilled = sim.simulate(wl, pools, factory([128, None]))
    assert routers[0].spilled == 0 and routers[1].spilled > 0
    assert spilled.pools[1].requests > plain.pools[1].requests
    assert spilled.latency()["ttft_s_p99"] < plain.latency()["ttft_s_p99"]



def test_dispatch_by_pending_prefill_avoids_instances_busy_with_long_prompts():
    trace = trace_or_skip("mooncake")
    wl = workload.from_trace(trace, rate=10, count=4_000)
    prof = profile_named("long").with_overrides(max_model_len=131_072, max_num_seqs=8)
    indexes = []

    def factory(dispatch):
        def make(inst, w):
            router = routing.LeastLoaded(inst, w, dispatch=dispatch)
            indexes.append(router.index)
            return router
        return make

    by_count = sim.simulate(wl, [sim.PoolSpec("p", prof, 60)], factory("least-requests"))
    by_tokens = sim.simulate(wl, [sim.PoolSpec("p", prof, 60)], factory("least-prefill"))
    assert (by_tokens.status == sim.DONE).all() and (by_count.status == sim.DONE).all()
    # The wait beyond a prompt's own prefill is what dispatch can change.
    from extproc.fleet.plan import SLO

    def wait_p99(res):
        return np.percentile(SLO().ttft_measure(res, prof)[res.measured()], 99)
    assert wait_p99(by_tokens) < 0.8 * wait_p99(by_count)
    # Every prompt routed was prefilled and every request finished: the index is back to zero.
    tokens_index = indexes[1]
    assert set(tokens_index.pending.values()) == {0} and set(tokens_index.count.values()) == {0}
    assert set(indexes[0].load.values()) == {0}
    with pytest.raises(ValueError, match="unknown dispatch"):
        routing.LeastLoaded([], wl, dispatch="random")
