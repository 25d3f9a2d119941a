"""Discrete-event simulation of a fleet of vLLM instances behind a router.

Each instance runs vLLM's continuous batching, timed by ``extproc.fleet.instance`` (the same model
the simulated engine sleeps by):

* an iteration decodes one token for every running sequence and may carry prefill work; its length
  is ``decode_step_s(batch, kv_tokens)`` plus the prefill chunk's share;
* waiting requests are admitted FCFS at iteration boundaries while the instance has a free sequence
  slot and KV cache for the prompt; one boundary admits prompts up to ``max_num_batched_tokens``
  (a longer prompt is prefilled alone over several iterations, as chunked prefill does); the first
  output token comes out of the iteration that finishes the prompt;
* when the KV cache cannot take the next token of every running sequence, the newest sequence is
  preempted (vLLM's recompute mode): its cache is freed, it goes back to the head of the queue and
  later prefills its prompt plus what it had generated.

The simulator does not tick iteration by iteration. Between two events of an instance (a sequence
finishing, a prefill finishing, the cache filling up, an admission) the batch is constant, each step
adds ``batch`` tokens to the cache, so the step times form an arithmetic series: the time of k steps
and the steps that fit in a time are closed forms. Events therefore cost O(log n) per request, not
per token, which is what makes a million requests take seconds.

Simplifications, each small against the SLOs simulated: KV is counted in tokens, not 16-token
blocks (at most 16 tokens per sequence); prompts admitted in one boundary share one prefill finish
time; prefix caching is not modelled (a recompute pays the full prefill).
"""

from __future__ import annotations

import collections
import heapq
import math
import time as _time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from extproc.fleet.instance import InstanceProfile
from extproc.fleet.workload import Workload

# Request states in ``SimResult.status``.
DONE, REJECTED = 1, 2


class Instance:
    """One vLLM instance's scheduler state. Times are seconds, ``steps`` counts iterations."""

    __slots__ = (
        "idx", "pool", "profile", "a0", "a1", "ckv", "cap", "max_seqs", "btok",
        "pre_base", "pre_rate", "pre_quad",
        "t", "steps", "dec", "heap", "kv_off", "group", "group_tokens", "group_end", "group_cost",
        "waiting", "outstanding", "version", "event_step",
        "busy_s", "seq_s", "kv_s", "preemptions", "idle_since",
    )

    def __init__(self, idx: int, pool: int, profile: InstanceProfile):
        self.idx, self.pool, self.profile = idx, pool, profile
        self.a0, self.a1, self.ckv = profile.decode_base_s, profile.decode_per_seq_s, profile.decode_per_kv_token_s
        self.cap, self.max_seqs = profile.kv_capacity_tokens, profile.max_num_seqs
        self.btok = profile.max_num_batched_tokens
        self.pre_base, self.pre_rate, self.pre_quad = (
            profile.prefill_base_s, profile.prefill_tokens_per_s, profile.prefill_quadratic_s)
        self.t = 0.0
        self.steps = 0
        self.dec: dict[int, tuple[int, int, int]] = {}  # seq -> (join step, generated at join, finish step)
        self.heap: list[tuple[int, int]] = []  # (finish step, seq); stale entries skipped
        self.kv_off = 0  # KV tokens of decoding sequences = kv_off + len(dec) * steps
        self.group: list[int] = []  # sequences being prefilled together
        self.group_tokens = 0
        self.group_end = 0
        self.group_cost = 0.0  # seconds the prefill adds to each of its iterations
        self.waiting: collections.deque[int] = collections.deque()
        self.outstanding = 0  # routed here and not finished (the least-loaded router's measure)
        self.version = 0
        self.event_step = -1  # absolute step of the scheduled event, -1 when none
        self.busy_s = 0.0
        self.seq_s = 0.0  # integral of running sequences over time
        self.kv_s = 0.0  # integral of KV tokens in use over time
        self.preemptions = 0
        self.idle_since = 0.0

    # The k-step time from the current boundary: sum over i < k of A + ckv * (kv0 + b * i).
    def _coeffs(self) -> tuple[float, float]:
        b = len(self.dec)
        a = self.group_cost if self.group else 0.0
        if b:
            a += self.a0 + self.a1 * b + self.ckv * (self.kv_off + b * self.steps)
            return a, self.ckv * b
        return a, 0.0

    def span_s(self, k: int) -> float:
        a, c = self._coeffs()
        return k * a + c * k * (k - 1) * 0.5

    def steps_within(self, dt: float) -> int:
        """Whole iterations completed ``dt`` seconds after the current boundary."""
        a, c = self._coeffs()
        if c == 0.0:
            return int(dt / a) if a > 0 else 0
        h = 0.5 * c
        b1 = a - h
        k = int((-b1 + math.sqrt(b1 * b1 + 4.0 * h * dt)) / (2.0 * h))
        while k > 0 and k * a + h * k * (k - 1) > dt:
            k -= 1
        while (k + 1) * a + h * (k + 1) * k <= dt:
            k += 1
        return k

    def kv_used(self) -> int:
        return self.kv_off + len(self.dec) * self.steps + self.group_tokens


@dataclass
class PoolResult:
    name: str
    instances: int
    requests: int = 0
    rejected: int = 0
    preemptions: int = 0
    busy: float = 0.0  # mean fraction of time an instance had work
    seq_util: float = 0.0  # mean running sequences / max_num_seqs
    kv_util: float = 0.0  # mean KV tokens in use / capacity


@dataclass
class SimResult:
    """Per-request outcomes (arrays aligned with the workload) and per-pool aggregates."""

    workload: Workload
    instance_of: np.ndarray  # int, -1 when rejected before routing to an instance
    pool_of: np.ndarray  # int, index into ``pools``; -1 when rejected before routing to an instance
    status: np.ndarray  # DONE or REJECTED
    first_token: np.ndarray  # s, NaN when rejected
    finish: np.ndarray  # s, NaN when rejected
    preempted: np.ndarray  # times each request was preempted
    pools: list[PoolResult]
    little_area: float  # integral of requests in the system over time
    horizon_s: float
    wall_s: float
    warmup: int = 0  # leading requests excluded from latency statistics
    rejected_reasons: collections.Counter = field(default_factory=collections.Counter)

    @property
    def ttft(self) -> np.ndarray:
        return self.first_token - self.workload.arrival

    @property
    def tpot(self) -> np.ndarray:
        out = self.workload.output
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(out > 1, (self.finish - self.first_token) / np.maximum(out - 1, 1), np.nan)

    def measured(self) -> np.ndarray:
        """Mask of requests latency statistics count: completed, after the warm-up."""
        mask = self.status == DONE
        mask[: self.warmup] = False
        return mask

    def latency(self, qs=(50, 90, 99)) -> dict:
        m = self.measured()
        ttft, tpot = self.ttft[m], self.tpot[m]
        tpot = tpot[~np.isnan(tpot)]
        out = {}
        for name, arr in (("ttft_s", ttft), ("tpot_s", tpot)):
            for q in qs:
                out[f"{name}_p{q}"] = float(np.percentile(arr, q)) if len(arr) else float("nan")
            out[f"{name}_mean"] = float(arr.mean()) if len(arr) else float("nan")
        return out

    def summary(self) -> dict:
        n = len(self.workload)
        done = int((self.status == DONE).sum())
        return {
            "requests": n,
            "completed": done,
            "rejected": int((self.status == REJECTED).sum()),
            "rejected_reasons": dict(self.rejected_reasons),
            "preemptions": int(self.preempted.sum()),
            "horizon_s": self.horizon_s,
            **self.latency(),
            "pools": [vars(p) for p in self.pools],
            "wall_s": self.wall_s,
            "us_per_request": 1e6 * self.wall_s / max(n, 1),
        }


@dataclass(frozen=True)
class PoolSpec:
    name: str
    profile: InstanceProfile
    instances: int


def simulate(workload: Workload, pools: list[PoolSpec], router_factory, *, warmup: float = 0.1,
             progress: Callable[[int, int], None] | None = None) -> SimResult:
    """Replay ``workload`` through the fleet; every request completes or is counted as rejected.

    ``router_factory(instances, workload)`` returns a router (see ``extproc.fleet.routing``). ``warmup`` is the leading
    fraction of requests left out of latency statistics (the fleet starts empty).
    """
    started = _time.perf_counter()
    instances: list[Instance] = []
    for p_idx, spec in enumerate(pools):
        if spec.instances < 1:
            raise ValueError(f"pool {spec.name}: needs at least one instance")
        for _ in range(spec.instances):
            instances.append(Instance(len(instances), p_idx, spec.profile))
    router = router_factory(instances, workload)

    n = len(workload)
    arrival = workload.arrival.tolist()
    prompt = workload.prompt.tolist()
    output = workload.output.tolist()
    first = [math.nan] * n
    finish = [math.nan] * n
    status = [0] * n
    placed = [-1] * n
    preempted = [0] * n
    resume = [0] * n  # tokens generated before a preemption (recomputed on re-admission)
    reasons: collections.Counter = collections.Counter()

    events: list[tuple[float, int, int, int]] = []  # (time, tiebreak, instance, version)
    seqno = 0
    in_system = 0
    area = 0.0
    last_t = 0.0
    tick = max(n // 100, 1)
    done_count = 0

    def schedule(inst: Instance) -> None:
        nonlocal seqno
        inst.version += 1
        k = -1
        if inst.group:
            k = inst.group_end - inst.steps
        heap = inst.heap
        dec = inst.dec
        while heap:
            fs, s = heap[0]
            entry = dec.get(s)
            if entry is None or entry[2] != fs:
                heapq.heappop(heap)
                continue
            kk = fs - inst.steps
            if k < 0 or kk < k:
                k = kk
            break
        b = len(dec)
        if b:
            room = (inst.cap - inst.kv_used()) // b  # iterations before the cache cannot grow
            if room < 1:
                room = 1
            if k < 0 or room < k:
                k = room
        if k < 0:
            inst.event_step = -1
            inst.idle_since = inst.t
            return
        inst.event_step = inst.steps + k
        seqno += 1
        heapq.heappush(events, (inst.t + inst.span_s(k), seqno, inst.idx, inst.version))

    def advance(inst: Instance, k: int, t_new: float) -> None:
        """Move an instance's boundary forward ``k`` iterations to time ``t_new``."""
        dt = t_new - inst.t
        if dt > 0:
            b = len(inst.dec)
            running = b + len(inst.group)
            inst.busy_s += dt
            inst.seq_s += running * dt
            kv0 = inst.kv_used()
            inst.kv_s += (kv0 + 0.5 * b * k) * dt
        inst.steps += k
        inst.t = t_new

    def complete(i: int, t_done: float) -> None:
        nonlocal in_system, done_count
        finish[i] = t_done
        status[i] = DONE
        in_system -= 1
        done_count += 1
        inst = instances[placed[i]]
        inst.outstanding -= 1
        router.done(inst)
        if progress is not None and done_count % tick == 0:
            progress(done_count, n)

    def process(inst: Instance) -> None:
        """At a boundary: finish the prefill group, finish sequences, preempt, admit, reschedule."""
        t = inst.t
        steps = inst.steps
        dec = inst.dec
        if inst.group and inst.group_end <= steps:
            fresh = 0
            for s in inst.group:
                gen = resume[s] + 1
                if first[s] != first[s]:  # NaN: the first token of this request
                    first[s] = t
                    fresh += prompt[s]
                if gen >= output[s]:
                    complete(s, t)
                    continue
                fs = steps + output[s] - gen
                dec[s] = (steps, gen, fs)
                inst.kv_off += prompt[s] + gen - steps
                heapq.heappush(inst.heap, (fs, s))
            inst.group = []
            inst.group_tokens = 0
            router.prefilled(inst, fresh)
        heap = inst.heap
        while heap and heap[0][0] <= steps:
            fs, s = heapq.heappop(heap)
            entry = dec.get(s)
            if entry is None or entry[2] != fs:
                continue
            del dec[s]
            inst.kv_off -= prompt[s] + entry[1] - entry[0]
            complete(s, t)
        # The next iteration needs one KV slot per running sequence: preempt the newest until it fits.
        while dec and inst.kv_used() + len(dec) > inst.cap:
            s, (join, gen0, _fs) = dec.popitem()
            inst.kv_off -= prompt[s] + gen0 - join
            resume[s] = gen0 + steps - join
            preempted[s] += 1
            inst.preemptions += 1
            inst.waiting.appendleft(s)
        if not inst.group and inst.waiting:
            admit(inst)
        schedule(inst)

    def admit(inst: Instance) -> None:
        waiting = inst.waiting
        b = len(inst.dec)
        budget = inst.btok - b
        if budget < 1:
            budget = 1
        free = inst.cap - inst.kv_used() - b
        seats = inst.max_seqs - b
        group = inst.group
        tokens = 0
        sq = 0
        while waiting and seats > 0:
            s = waiting[0]
            need = prompt[s] + resume[s]
            if need > free or (group and tokens + need > budget):
                break
            waiting.popleft()
            group.append(s)
            tokens += need
            sq += need * need
            free -= need
            seats -= 1
        if group:
            iters = -(-tokens // budget)
            inst.group_tokens = tokens
            inst.group_end = inst.steps + iters
            inst.group_cost = (inst.pre_base + tokens / inst.pre_rate + inst.pre_quad * sq) / iters

    n_events = 0
    ai = 0
    while ai < n or events:
        if ai < n and (not events or arrival[ai] <= events[0][0]):
            now = arrival[ai]
            i = ai
            ai += 1
            area += in_system * (now - last_t)
            last_t = now
            target = router.choose(i)
            if target < 0:
                status[i] = REJECTED
                reasons["no pool holds it"] += 1
                continue
            inst = instances[target]
            if not inst.profile.fits(prompt[i], output[i]):
                status[i] = REJECTED
                placed[i] = target
                reasons[f"exceeds {inst.profile.name} context"] += 1
                continue
            placed[i] = target
            in_system += 1
            inst.outstanding += 1
            router.placed(inst, prompt[i])
            idle = not inst.dec and not inst.group
            was_empty = not inst.waiting
            inst.waiting.append(i)
            if idle:
                inst.t = now  # an idle instance starts its next iteration when work arrives
                admit(inst)
                schedule(inst)
            elif was_empty and not inst.group and len(inst.dec) < inst.max_seqs:
                # Admitted at the end of the iteration in progress, if that comes before the next event.
                k = inst.steps_within(now - inst.t) + 1
                if inst.event_step < 0 or inst.steps + k < inst.event_step:
                    inst.version += 1
                    inst.event_step = inst.steps + k
                    seqno += 1
                    heapq.heappush(events, (inst.t + inst.span_s(k), seqno, inst.idx, inst.version))
            continue
        t_ev, _, idx, version = heapq.heappop(events)
        inst = instances[idx]
        if version != inst.version:
            continue
        n_events += 1
        area += in_system * (t_ev - last_t)
        last_t = t_ev
        advance(inst, inst.event_step - inst.steps, t_ev)
        process(inst)

    pool_results = []
    horizon = last_t
    for p_idx, spec in enumerate(pools):
        members = [x for x in instances if x.pool == p_idx]
        pr = PoolResult(spec.name, len(members))
        pr.preemptions = sum(x.preemptions for x in members)
        if horizon > 0:
            pr.busy = sum(x.busy_s for x in members) / (horizon * len(members))
            pr.seq_util = sum(x.seq_s for x in members) / (horizon * len(members) * spec.profile.max_num_seqs)
            pr.kv_util = sum(x.kv_s for x in members) / (horizon * len(members) * spec.profile.kv_capacity_tokens)
        pool_results.append(pr)
    placed_arr = np.array(placed, dtype=np.int64)
    status_arr = np.array(status, dtype=np.int8)
    pool_of = np.array([x.pool for x in instances] + [-1], dtype=np.int64)[placed_arr]
    for p_idx, pr in enumerate(pool_results):
        in_pool = pool_of == p_idx
        pr.requests = int((in_pool & (status_arr == DONE)).sum())
        pr.rejected = int((in_pool & (status_arr == REJECTED)).sum())
    return SimResult(
        workload=workload, instance_of=placed_arr, pool_of=pool_of, status=status_arr,
        first_token=np.array(first), finish=np.array(finish), preempted=np.array(preempted),
        pools=pool_results, little_area=area, horizon_s=horizon,
        wall_s=_time.perf_counter() - started, warmup=int(n * warmup), rejected_reasons=reasons,
    )
