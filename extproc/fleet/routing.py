"""Fleet routers for the simulator and the error the token-budget router makes.

A router picks an instance for each arriving request. ``simulate`` calls ``choose(i)`` on arrival,
``placed(instance, prompt_tokens)`` once the request is queued there, ``prefilled(instance, tokens)``
when prompts finish prefilling and ``done(instance)`` when a request finishes.

* ``RoundRobin`` and ``LeastLoaded`` are the homogeneous baselines; inside a pool, instances are
  picked by outstanding requests (Envoy's LEAST_REQUEST) or by prompt tokens not yet prefilled;
* ``TokenBudget`` is the router this project ships, in the simulator's terms: the smallest pool whose
  context holds the *estimated* budget (prompt estimate + output reserve), least loaded within the
  pool, optionally spilling to a larger pool when every instance of the preferred pool is full.

The estimate error is an array of ratios (estimated prompt tokens / true prompt tokens), one per
request, drawn once from an ``ErrorModel`` so a seed reproduces a run. A ratio below 1 can send a
request to a pool that cannot hold it: vLLM answers 400 and the simulator counts a rejection.
"""

from __future__ import annotations

import heapq
import math
import pathlib
from dataclasses import dataclass

import numpy as np

from extproc.fleet.workload import Workload


class RequestCount:
    """Instances by outstanding requests (a bucket queue): least loaded in O(1); among equals, the one
    that reached that load first (deterministic, and it spreads work like round robin). This is what
    Envoy's LEAST_REQUEST balancer does inside a pool's cluster."""

    def __init__(self, members: list) -> None:
        self.load: dict[int, int] = {m.idx: 0 for m in members}
        self.buckets: list[dict[int, object]] = [{m.idx: m for m in members}]
        self.low = 0

    def least(self):
        buckets = self.buckets
        while not buckets[self.low]:
            self.low += 1
        return next(iter(buckets[self.low].values()))

    def least_load(self) -> int:
        self.least()
        return self.low

    def _move(self, inst, delta: int) -> None:
        old = self.load[inst.idx]
        new = old + delta
        self.load[inst.idx] = new
        del self.buckets[old][inst.idx]
        while len(self.buckets) <= new:
            self.buckets.append({})
        self.buckets[new][inst.idx] = inst
        if new < self.low:
            self.low = new

    def placed(self, inst, tokens: int) -> None:
        self._move(inst, 1)

    def prefilled(self, inst, tokens: int) -> None:
        pass

    def done(self, inst) -> None:
        self._move(inst, -1)


class PendingPrefill:
    """Instances by prompt tokens routed there and not yet prefilled, then by outstanding requests.

    A new request's time to first token is mostly the prefill work queued ahead of it; counting
    requests cannot tell an instance idling from one in the middle of a 100K-token prompt. A
    token-aware router knows each request's estimate, so it can dispatch on this."""

    def __init__(self, members: list) -> None:
        self.pending: dict[int, int] = {m.idx: 0 for m in members}
        self.count: dict[int, int] = {m.idx: 0 for m in members}
        self.inst = {m.idx: m for m in members}
        self.heap: list[tuple[int, int, int]] = [(0, 0, m.idx) for m in members]
        heapq.heapify(self.heap)

    def least(self):
        heap, pending, count = self.heap, self.pending, self.count
        while True:
            p, c, idx = heap[0]
            if pending[idx] == p and count[idx] == c:
                return self.inst[idx]
            heapq.heappop(heap)

    def least_load(self) -> int:
        return self.count[self.least().idx]

    def _push(self, idx: int) -> None:
        heap = self.heap
        if len(heap) > 4 * len(self.inst) + 1024:  # drop stale entries now and then: bounded memory
            heap[:] = [(self.pending[i], self.count[i], i) for i in self.inst]
            heapq.heapify(heap)
        else:
            heapq.heappush(heap, (self.pending[idx], self.count[idx], idx))

    def placed(self, inst, tokens: int) -> None:
        self.pending[inst.idx] += tokens
        self.count[inst.idx] += 1
        self._push(inst.idx)

    def prefilled(self, inst, tokens: int) -> None:
        self.pending[inst.idx] -= tokens
        self._push(inst.idx)

    def done(self, inst) -> None:
        self.count[inst.idx] -= 1
        self._push(inst.idx)


DISPATCH = {"least-requests": RequestCount, "least-prefill": PendingPrefill}


def _dispatch(name: str):
    try:
        return DISPATCH[name]
    except KeyError:
        raise ValueError(f"unknown dispatch {name!r}; known: {', '.join(DISPATCH)}") from None


class RoundRobin:
    def __init__(self, instances: list, workload: Workload) -> None:
        self.n = len(instances)
        self.next = 0

    def choose(self, i: int) -> int:
        k = self.next
        self.next = (k + 1) % self.n
        return k

    def placed(self, inst, tokens: int) -> None:
        pass

    def prefilled(self, inst, tokens: int) -> None:
        pass

    def done(self, inst) -> None:
        pass


class LeastLoaded:
    """One homogeneous pool, least loaded first (``dispatch``: least-requests or least-prefill)."""

    def __init__(self, instances: list, workload: Workload, dispatch: str = "least-requests") -> None:
        self.index = _dispatch(dispatch)(instances)
        self.placed = self.index.placed
        self.prefilled = self.index.prefilled
        self.done = self.index.done

    def choose(self, i: int) -> int:
        return self.index.least().idx


@dataclass(frozen=True)
class ErrorModel:
    """How far the router's prompt estimate is from the truth, as a ratio estimate / true.

    ``kind``: "exact" (an oracle), "lognormal" (``exp(N(bias, sd))``), or "replay" (ratios measured
    by running the budget core on real request bodies with exact token counts, resampled)."""

    kind: str = "exact"
    bias: float = 0.0
    sd: float = 0.0
    samples: tuple[float, ...] = ()

    def ratios(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed + 7919)
        if self.kind == "exact":
            return np.ones(n)
        if self.kind == "lognormal":
            return np.exp(rng.normal(self.bias, self.sd, n))
        if self.kind == "replay":
            if not self.samples:
                raise ValueError("replay error model has no samples")
            return rng.choice(np.asarray(self.samples), n)
        raise ValueError(f"unknown error model {self.kind!r}; known: exact, lognormal, replay")

    def describe(self) -> str:
        if self.kind == "lognormal":
            return f"lognormal(bias {self.bias:+.3f}, sd {self.sd:.3f})"
        if self.kind == "replay":
            s = np.asarray(self.samples)
            return (f"replay of the budget core on {len(s)} real requests (estimate/true: p1 "
                    f"{np.percentile(s, 1):.3f}, median {np.median(s):.3f}, p99 {np.percentile(s, 99):.3f})")
        return "exact (oracle budgets)"


def replayed_errors(requests_path: str | pathlib.Path, seed: int = 0) -> ErrorModel:
    """Run the budget core on real bodies in online order (decide, then learn the true count) and
    keep each decision's conservative prompt estimate over the exact count vLLM reported."""
    import orjson

    from extproc.budget.router import BudgetRouter

    rows = [orjson.loads(line) for line in pathlib.Path(requests_path).read_bytes().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    ratios = []
    for family, model in (("llama3", "meta-llama/Meta-Llama-3-70B-Instruct"), ("qwen3", "Qwen/Qwen3-235B-A22B")):
        router = BudgetRouter()
        for k in rng.permutation(len(rows)):
            row = rows[k]
            body = dict(row["body"], model=model)
            truth = row["prompt_tokens"][family]
            decision, observation = router.route_learnable(orjson.dumps(body))
            ratios.append((decision.budget_tokens - decision.output_tokens) / truth)
            if observation is not None:
                router.observe(observation, truth)
    return ErrorModel("replay", samples=tuple(ratios))


class TokenBudget:
    """Smallest pool whose context holds the estimated budget; least loaded inside the pool.

    ``pools`` are (max_model_len, member instances) sorted by context. ``spill_at`` (outstanding
    requests per instance, per pool; None for no spillover) sends a request to the next larger pool
    that holds its estimate when every instance of the preferred pool has that many."""

    def __init__(self, instances: list, workload: Workload, *, ratios: np.ndarray,
                 spill_at: list[int | None] | None = None, dispatch: str = "least-requests") -> None:
        by_pool: dict[int, list] = {}
        for inst in instances:
            by_pool.setdefault(inst.pool, []).append(inst)
        self.pools = sorted(by_pool.values(), key=lambda members: members[0].profile.max_model_len)
        self.limits = [members[0].profile.max_model_len for members in self.pools]
        self.index = [_dispatch(dispatch)(members) for members in self.pools]
        self.index_of = {inst.idx: k for k, members in enumerate(self.pools) for inst in members}
        spill = spill_at or [None] * len(self.pools)
        self.spill_at = [math.inf if s is None else s for s in spill]
        est = np.ceil(workload.prompt * ratios).astype(np.int64) + workload.output
        # The preferred pool of every request, computed once: the first limit >= the estimate.
        limits = np.array(self.limits)
        self.preferred = np.minimum(np.searchsorted(limits, est, side="left"), len(limits) - 1).tolist()
        self.estimate = est.tolist()
        self.spilled = 0

    def choose(self, i: int) -> int:
        k = self.preferred[i]
        index = self.index[k]
        inst = index.least()
        if self.spill_at[k] != math.inf and index.least_load() >= self.spill_at[k]:
            est = self.estimate[i]
            for j in range(k + 1, len(self.pools)):
                if self.limits[j] >= est and self.index[j].least_load() < self.spill_at[j]:
                    self.spilled += 1
                    return self.index[j].least().idx
        return inst.idx

    def placed(self, inst, tokens: int) -> None:
        self.index[self.index_of[inst.idx]].placed(inst, tokens)

    def prefilled(self, inst, tokens: int) -> None:
        self.index[self.index_of[inst.idx]].prefilled(inst, tokens)

    def done(self, inst) -> None:
        self.index[self.index_of[inst.idx]].done(inst)
