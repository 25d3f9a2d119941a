"""Runs inside the vllm-sr-sim venv (never the project's): one JSON job on stdin, one JSON answer on stdout.

benchmarks/authors_sim.py builds the workload and starts this script; everything here talks to
fleet_sim (the package vllm-sr-sim installs) through its public classes, plus one opt-in patch
(``corrected``) that holds a KV slot for the request's whole service time instead of
service_time / n_slots (fleet_sim/core/instance.py:297-300) and balances on active + queued
requests (its own "least_loaded"), to show what the defect is worth.

Jobs:
  {"job": "analytical", "cdf", "rate", "threshold", "long_ctx", "slo_ttft_s", "profile"}
  {"job": "des", "requests", "pools": [[id, n, max_ctx], ...], "threshold", "profile", "corrected", "slo_*"}
  {"job": "size", "requests", "max_ctx", "profile", "corrected", "slo_*", "deadline_s"}
"""

from __future__ import annotations

import heapq
import json
import math
import sys
import time
from collections import Counter

import fleet_sim
import fleet_sim.core.instance as instance_module
from fleet_sim import A100_80GB, QWEN3_235B_A22B, Fleet, FleetConfig, PoolConfig, Request
from fleet_sim.gpu_profiles import ProfileBuilder, ServingConfig
from fleet_sim.hardware import HardwareSpec
from fleet_sim.optimizer import FleetOptimizer

# vllm-sr-sim has no AMD part; these are MI300X datasheet figures, priced as NOTES has it.
MI300X = HardwareSpec(
    name="MI300X", mem_bw=5.3e12, mem_capacity=192 * 10**9, fp16_tc_flops=1307.4e12,
    fp8_tc_flops=2614.9e12, nvlink_bw=896e9, inter_node_bw=50e9, pcie_bw=64e9, sm_version=0,
    power=750.0, cost_per_hr=3.67,
)


def build_profile(name: str) -> tuple[object, int]:
    """The profile and how many physical GPUs one of its priced units stands for."""
    if name == "a100-llama3-70b":
        # The CLI's default: KV of an 8-GPU TP8 instance, priced as one A100 ($2.21/h).
        return A100_80GB, 1
    if name == "mi300x-qwen3-235b-fp8":
        cfg = ServingConfig(tp=8, ep=8, dtype_bytes=1.0)
        return ProfileBuilder().build(MI300X, QWEN3_235B_A22B, cfg), cfg.tp
    raise ValueError(f"unknown profile {name!r}")


class _FullServiceHeap:
    """Stands in for heapq inside instance.py: the only push there is a completion event, and this
    one moves it from start + service/n_slots to start + service (the request's physical end)."""

    heappop = staticmethod(heapq.heappop)

    @staticmethod
    def heappush(heap: list, event: object) -> None:
        event.time = event.req.physical_end_time
        heapq.heappush(heap, event)


def set_corrected(corrected: bool) -> None:
    instance_module.heapq = _FullServiceHeap if corrected else heapq


def percentile(values: list[float], p: float) -> float:
    # The same index rule as FleetSimResult.percentile (fleet.py:233).
    if not values:
        return float("nan")
    values = sorted(values)
    return values[max(0, int(len(values) * p / 100) - 1)]


def run_des(requests: list, pools: list, threshold: int, profile: object, job: dict) -> dict:
    set_corrected(job.get("corrected", False))
    # Its default "least_queue" ignores busy slots (pool.py:94-95): with slots held for the whole
    # service time, requests queue behind full instances while others idle, so the correction also
    # takes its own "least_loaded" (active + queued).
    balancing = "least_loaded" if job.get("corrected") else "least_queue"
    arrivals = [(t, Request(i, t, l_in, l_out)) for i, (t, l_in, l_out) in enumerate(requests)]
    config = FleetConfig(
        pools=[PoolConfig(pool_id, profile, n, max_ctx, lb_strategy=balancing) for pool_id, n, max_ctx in pools],
        router_type="LengthRouter", router_kwargs={"threshold": threshold},
    )
    started = time.perf_counter()
    result = Fleet(config).run(arrivals)
    wall = time.perf_counter() - started
    ttft = [r.ttft for r in result.completed if r.ttft is not None]
    waits = [r.queue_wait for r in result.completed if r.queue_wait is not None]
    tpot = [r.tpot for r in result.completed if r.tpot is not None]
    p99_ttft, p99_tpot = percentile(ttft, 99), percentile(tpot, 99)
    lost = len(arrivals) - len(result.completed)
    per_instance = Counter((r.pool_id, r.instance_id) for r in result.completed)
    return {
        "instances": sum(n for _, n, _ in pools), "requests": len(arrivals),
        "completed": len(result.completed), "lost": lost,
        "p99_ttft_s": p99_ttft, "p99_tpot_s": p99_tpot, "p99_queue_wait_s": percentile(waits, 99),
        "slo_met": lost == 0 and p99_ttft <= job["slo_ttft_s"] and p99_tpot <= job["slo_tpot_s"],
        "instances_used": len(per_instance),
        "busiest_instance_requests": max(per_instance.values(), default=0),
        "des_wall_s": wall, "us_per_request": wall / max(1, len(arrivals)) * 1e6,
    }


def little_guess(requests: list, max_ctx: int, profile: object) -> int:
    """Instances a slot-holding model needs by Little's law: rate × mean service / slots."""
    if len(requests) < 2:
        return 1
    span = requests[-1][0] - requests[0][0] or 1.0
    mean_service = sum(profile.service_time(a, b, max_ctx) for _, a, b in requests) / len(requests)
    return max(1, math.ceil(len(requests) / span * mean_service / profile.n_slots(max_ctx)))


def size_pool(requests: list, max_ctx: int, profile: object, job: dict) -> dict:
    """Smallest instance count whose DES run meets the SLO, searched up from a guess, then bisected
    to 2 %. Stops at the deadline and says so, and calls the SLO infeasible when doubling the
    instances leaves P99 TTFT where it was: that floor is prefill, not queueing."""
    deadline = time.monotonic() + job["deadline_s"]
    runs: dict[int, dict] = {}

    def meets(n: int) -> bool:
        if n not in runs:
            runs[n] = run_des(requests, [["pool", n, max_ctx]], max_ctx, profile, job)
        return runs[n]["slo_met"]

    guess = little_guess(requests, max_ctx, profile)
    if not job.get("corrected"):
        guess = max(1, guess // profile.n_slots(max_ctx))
    lo, hi, n, infeasible = 0, None, guess, False
    while hi is None and time.monotonic() < deadline and n <= 100_000:
        if meets(n):
            hi = n
        elif lo and runs[n]["lost"] == 0 and runs[n]["p99_ttft_s"] > 0.99 * runs[lo]["p99_ttft_s"]:
            infeasible = True  # twice the instances, same P99: the floor is not queueing
            break
        else:
            lo, n = n, n * 2
    while hi is not None and hi - lo > max(1, hi // 50) and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    out_of_time = time.monotonic() >= deadline
    return {
        "instances": hi, "complete": (hi is not None or infeasible) and not out_of_time, "guess": guess,
        "infeasible": infeasible,
        "p99_ttft_floor_s": min(v["p99_ttft_s"] for v in runs.values()) if infeasible else None,
        "runs": [{"n": k, **{f: v[f] for f in ("p99_ttft_s", "p99_tpot_s", "p99_queue_wait_s", "lost", "slo_met",
                                                 "us_per_request", "des_wall_s")}}
                 for k, v in sorted(runs.items())],
    }


def analytical(job: dict, profile: object) -> dict:
    cdf = [(int(t), float(f)) for t, f in job["cdf"]]
    started = time.perf_counter()
    # The homogeneous baseline exactly as `vllm-sr-sim pareto` builds it (run_sim.py cmd_pareto).
    homo = FleetOptimizer(profile, profile, B_short=job["long_ctx"], t_slo_ms=job["slo_ttft_s"] * 1000,
                          long_max_ctx=job["long_ctx"]).sweep_analytical(cdf, job["rate"], [1.0])[0]
    pooled = FleetOptimizer(profile, profile, B_short=job["threshold"], t_slo_ms=job["slo_ttft_s"] * 1000,
                            long_max_ctx=job["long_ctx"]).sweep_analytical(cdf, job["rate"], [1.0])[0]
    wall = time.perf_counter() - started

    def fleet(r: object) -> dict:
        return {"short": r.n_s, "long": r.n_l, "total": r.total_gpus, "usd_per_year": r.cost_per_hr * 8760,
                "p99_ttft_short_s": r.p99_ttft_short_ms / 1000, "p99_ttft_long_s": r.p99_ttft_long_ms / 1000,
                "slo_met": r.slo_met}

    return {"homogeneous": fleet(homo), "pooled": fleet(pooled), "wall_s": wall}


def main() -> None:
    job = json.load(sys.stdin)
    profile, gpus_per_unit = build_profile(job["profile"])
    if job["job"] == "analytical":
        answer = analytical(job, profile)
    elif job["job"] == "des":
        answer = run_des(job["requests"], job["pools"], job["threshold"], profile, job)
    elif job["job"] == "size":
        answer = size_pool(job["requests"], job["max_ctx"], profile, job)
    else:
        raise SystemExit(f"unknown job {job['job']!r}")
    answer.update(version=fleet_sim.__version__, gpus_per_unit=gpus_per_unit, profile_name=profile.name,
                  n_slots={str(c): profile.n_slots(c) for c in job.get("contexts", [])})
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
