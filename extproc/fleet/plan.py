"""Sizing: the fewest instances per pool that meet a latency SLO, homogeneous against pooled.

Each configuration is sized by simulation: instances are added until the pool's P99 TTFT and P99 TPOT
(over requests after the warm-up) meet the SLO, then the fewest that still meet it is found by
bisection. Without spillover the token-budget router's split depends only on each request's estimate,
so the pools are independent and each is sized on its own share of the trace. Misrouted requests (the
estimate fits the short pool, the truth does not) are rejected by the short pool at once; they are
counted, not sized for.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from extproc.fleet import routing, sim
from extproc.fleet.cost import CostModel, cost_model, dollars_per_year, load_s
from extproc.fleet.instance import InstanceProfile
from extproc.fleet.workload import Workload


@dataclass(frozen=True)
class SLO:
    """Latency targets each pool must meet at P99, over requests after the warm-up.

    ``ttft_basis`` "queue" holds the TTFT target against TTFT minus the prompt's own unloaded prefill
    time: what capacity can buy. A 100K-token prompt needs ~20 s of prefill on 8x A100 however many
    instances there are, so a literal P99 TTFT of 2 s cannot be met on a trace with long prompts
    (Mooncake); on Azure 2023 the two differ by the ~0.1-0.3 s a typical prompt's prefill takes.
    "total" is the literal TTFT."""

    ttft_p99_s: float = 2.0
    tpot_p99_s: float = 0.080
    ttft_basis: str = "queue"

    def __post_init__(self) -> None:
        if self.ttft_basis not in ("queue", "total"):
            raise ValueError(f"ttft_basis must be 'queue' or 'total', got {self.ttft_basis!r}")

    def ttft_measure(self, result: sim.SimResult, profile: InstanceProfile) -> np.ndarray:
        ttft = result.ttft
        if self.ttft_basis == "queue":
            ttft = ttft - profile.prefill_s(result.workload.prompt.astype(float))
        return ttft

    def met(self, result: sim.SimResult, profile: InstanceProfile) -> bool:
        if (result.status == sim.REJECTED).any():
            return False
        m = result.measured()
        ttft = self.ttft_measure(result, profile)[m]
        tpot = result.tpot[m]
        tpot = tpot[~np.isnan(tpot)]
        return bool((not len(ttft) or np.percentile(ttft, 99) <= self.ttft_p99_s)
                    and (not len(tpot) or np.percentile(tpot, 99) <= self.tpot_p99_s))

    def describe(self) -> str:
        basis = " beyond the prompt's own prefill" if self.ttft_basis == "queue" else ""
        return f"P99 TTFT{basis} <= {self.ttft_p99_s} s, P99 TPOT <= {1000 * self.tpot_p99_s:.0f} ms"

    def ttft_p99(self, result: sim.SimResult | None, profile: InstanceProfile) -> float | None:
        """The P99 TTFT this SLO judges (on its basis), over the requests latency statistics count."""
        if result is None:
            return None
        ttft = self.ttft_measure(result, profile)[result.measured()]
        return float(np.percentile(ttft, 99)) if len(ttft) else None


@dataclass
class Sized:
    """The smallest pool that met the SLO, and the simulation that showed it."""

    name: str
    profile: InstanceProfile
    instances: int
    requests: int
    result: sim.SimResult | None
    simulations: int = 0
    feasible: bool = True

    @property
    def gpus(self) -> int:
        return self.instances * self.profile.gpus

    def row(self, slo: SLO | None = None) -> dict:
        """The pool's size and latencies; with ``slo``, also the P99 TTFT on the basis it judges
        feasibility (``slo_ttft_s_p99``: beyond the prompt's own prefill for the queue basis)."""
        lat = self.result.latency() if self.result is not None else {}
        judged = {} if slo is None else {"slo_ttft_basis": slo.ttft_basis,
                                         "slo_ttft_s_p99": slo.ttft_p99(self.result, self.profile)}
        return {"pool": self.name, "max_model_len": self.profile.max_model_len,
                "max_num_seqs": self.profile.max_num_seqs, "requests": self.requests,
                "instances": self.instances, "gpus": self.gpus, "feasible": self.feasible,
                "simulations": self.simulations,
                **{k: lat.get(k) for k in ("ttft_s_p50", "ttft_s_p99", "tpot_s_p50", "tpot_s_p99")}, **judged,
                "preemptions": int(self.result.preempted.sum()) if self.result is not None else 0,
                "kv_util": self.result.pools[0].kv_util if self.result is not None else 0.0,
                "seq_util": self.result.pools[0].seq_util if self.result is not None else 0.0}


def size_pool(name: str, workload: Workload, profile: InstanceProfile, slo: SLO, *, warmup: float = 0.1,
              max_instances: int = 20_000, on_sim: Callable[[], None] | None = None,
              dispatch: str = "least-requests") -> Sized:
    """Fewest instances of ``profile`` serving ``workload`` within ``slo``, least loaded first."""
    factory = functools.partial(routing.LeastLoaded, dispatch=dispatch)
    if len(workload) == 0:
        return Sized(name, profile, 0, 0, None)
    cache: dict[int, sim.SimResult] = {}

    def run(n: int) -> sim.SimResult:
        if n not in cache:
            cache[n] = sim.simulate(workload, [sim.PoolSpec(name, profile, n)], factory, warmup=warmup)
            if on_sim is not None:
                on_sim()
        return cache[n]

    # The load at 100% busy is where the search starts; queueing needs some headroom above it.
    guess = max(1, math.ceil(workload.rate * float(load_s(profile, workload.prompt, workload.output).mean())))
    hi = guess
    while not slo.met(run(hi), profile):
        if hi >= max_instances:
            return Sized(name, profile, hi, len(workload), run(hi), len(cache), feasible=False)
        hi = min(max_instances, math.ceil(hi * 1.3) + 1)
    lo = max(0, min(hi - 1, int(guess * 0.7)))
    if lo >= 1 and slo.met(run(lo), profile):
        hi, lo = lo, 0
    while hi - lo > 1:  # run(lo) misses the SLO (or lo == 0), run(hi) meets it
        mid = (lo + hi) // 2
        if slo.met(run(mid), profile):
            hi = mid
        else:
            lo = mid
    return Sized(name, profile, hi, len(workload), run(hi), len(cache))


@dataclass
class Plan:
    """Homogeneous against pooled for one workload: sizes, GPUs, dollars and the cost model."""

    workload: str
    rate: float
    requests: int
    slo: SLO
    homogeneous: Sized
    pools: list[Sized]
    model: CostModel
    price_per_gpu_hour: float
    misrouted: int
    too_long: int
    error_model: str
    short_limit: int
    assumptions: list[str] = field(default_factory=list)

    @property
    def pooled_gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    @property
    def pooled_instances(self) -> int:
        return sum(p.instances for p in self.pools)

    @property
    def savings(self) -> float:
        h = self.homogeneous.gpus
        return 1.0 - self.pooled_gpus / h if h else 0.0

    def as_dict(self) -> dict:
        price = self.price_per_gpu_hour
        return {
            "workload": self.workload, "rate": self.rate, "requests": self.requests,
            "slo": vars(self.slo), "short_limit": self.short_limit, "error_model": self.error_model,
            "homogeneous": self.homogeneous.row(self.slo), "pools": [p.row(self.slo) for p in self.pools],
            "homogeneous_gpus": self.homogeneous.gpus, "pooled_gpus": self.pooled_gpus,
            "homogeneous_instances": self.homogeneous.instances, "pooled_instances": self.pooled_instances,
            "savings": self.savings,
            "usd_per_year": {"homogeneous": dollars_per_year(self.homogeneous.gpus, price),
                             "pooled": dollars_per_year(self.pooled_gpus, price),
                             "price_per_gpu_hour": price},
            "cost_model": self.model.as_dict(), "misrouted": self.misrouted, "too_long": self.too_long,
            "assumptions": self.assumptions,
        }


def long_context(workload: Workload, floor: int = 65_536) -> int:
    """The long pool's context: 64K, or the next power of two holding the workload's longest request."""
    return max(floor, 1 << (int(workload.total.max()) - 1).bit_length())


def plan(workload: Workload, short: InstanceProfile, long: InstanceProfile, *, slo: SLO = SLO(),
         error: routing.ErrorModel = routing.ErrorModel(), seed: int = 0, price_per_gpu_hour: float,
         warmup: float = 0.1, on_sim: Callable[[], None] | None = None,
         homogeneous: Sized | None = None, dispatch: str = "least-requests") -> Plan:
    """Size the homogeneous fleet (every instance ``long``) and the two pools for ``workload``.
    ``homogeneous`` reuses a sizing already done for the same workload, long profile and SLO."""
    ratios = error.ratios(len(workload), seed)
    estimate = np.ceil(workload.prompt * ratios).astype(np.int64) + workload.output
    to_short = estimate <= short.max_model_len
    truly_fits_short = workload.total <= short.max_model_len
    fits_long = workload.total <= long.max_model_len
    misrouted = to_short & ~truly_fits_short
    too_long = ~fits_long
    servable = fits_long
    kw = dict(warmup=warmup, on_sim=on_sim, dispatch=dispatch)
    homog = homogeneous or size_pool("homogeneous", workload.subset(servable), long, slo, **kw)
    short_sized = size_pool("short", workload.subset(to_short & truly_fits_short), short, slo, **kw)
    long_sized = size_pool("long", workload.subset(~to_short & servable), long, slo, **kw)
    model = cost_model(short, long, workload.prompt[servable], workload.output[servable], to_short[servable])
    assumptions = [
        f"instance: {long.model} on {long.gpus} GPU(s) per instance; the same hardware in both pools",
        f"short pool: max_model_len {short.max_model_len}, max_num_seqs {short.max_num_seqs}; "
        f"long pool and homogeneous fleet: max_model_len {long.max_model_len}, max_num_seqs {long.max_num_seqs}",
        f"KV cache {long.kv_capacity_tokens:,} tokens per instance",
        f"SLO per pool: {slo.describe()}, over requests after the first {warmup:.0%} (the fleet starts empty)",
        f"budget = estimated prompt + the request's real output (clients send max_tokens = what they generate); "
        f"estimate error: {error.describe()}",
        f"GPU cost ${price_per_gpu_hour}/GPU-h, {24 * 365} h/yr; GPUs = instances x {long.gpus}",
        f"dispatch inside a pool: {dispatch} ("
        + ("outstanding requests, as Envoy's LEAST_REQUEST" if dispatch == "least-requests"
           else "prompt tokens not yet prefilled, then outstanding requests") + "); no spillover when sizing",
    ]
    if too_long.any():
        assumptions.append(f"{int(too_long.sum())} requests exceed the long pool's context and are rejected by "
                           f"every fleet (not sized for)")
    return Plan(workload.name, workload.rate, len(workload), slo, homog, [short_sized, long_sized], model,
                price_per_gpu_hour, int(misrouted.sum()), int(too_long.sum()), error.describe(),
                short.max_model_len, assumptions)


def sweep(workload: Workload, hardware: str, limits: list[int], long: InstanceProfile, **kwargs) -> list[Plan]:
    """One plan per short-pool context limit (the long pool and the homogeneous fleet fixed)."""
    from extproc.fleet.instance import hardware_profile

    plans: list[Plan] = []
    for limit in limits:
        if limit >= long.max_model_len:
            raise ValueError(f"short-pool limit {limit} must be below the long pool's {long.max_model_len}")
        short = hardware_profile(hardware, max_model_len=limit, name="short")
        plans.append(plan(workload, short, long, homogeneous=plans[0].homogeneous if plans else None, **kwargs))
    return plans


def fleet_ttft_p50(p: Plan) -> float:
    """Median TTFT over every request the pools served (requests weighted, not pools)."""
    parts = [s.result.ttft[s.result.measured()] for s in p.pools if s.result is not None]
    values = np.concatenate(parts) if parts else np.array([np.nan])
    return float(np.median(values))


def pareto_front(plans: list[Plan]) -> list[bool]:
    """Plans no other plan beats on both GPUs and fleet median TTFT."""
    points = [(p.pooled_gpus, fleet_ttft_p50(p)) for p in plans]
    return [not any(o[0] <= g and o[1] <= t and o != (g, t) for o in points) for g, t in points]
