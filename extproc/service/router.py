"""The router's state between the protocols: pool choice with load-aware spillover (on the
pools' own metrics, service/pool_load.py), which responses to read, in-flight counts per pool,
and what a response teaches: its usage, and whether its request was misrouted
(extproc.budget.response judges; this counts and learns).

In-flight counts are this replica's own view (requests it sent that have not ended) and steer
nothing: with several replicas behind one gateway, each sees its share, and with ext_authz
Envoy's access log of ended requests reaches one replica only. They are shown (the operator
API, ``extproc_inflight_requests``) as what this replica has outstanding.

Every protocol routes through its one door, ``Router.route`` (service/check.py for ext_authz,
service/processor.py for ext_proc, ``Router.explain`` for the operator API), which owns the rules
every request meets: large bodies read off the loop, the size bound before the estimate, the
estimate for a request whose response is read. It knows no protocol. Runs on the event loop
only: nothing here is shared with worker threads (they run only the pure core).

Who sent a request (``client_of``): the configured identity header (``service.client_header``,
e.g. a hashed API key or a user id a gateway sets), else the address Envoy saw (the last
``x-forwarded-for`` entry, which Envoy appends itself with ``use_remote_address``; with
``service.client_trusted_hops`` proxies in front of Envoy, that many entries further left). The
core only ever sees a keyed hash of it, and so do the operator API and the logs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import logging
import random
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..budget import BudgetRouter, Decision, Explanation, Observation, Pool, RequestShape
from ..budget.response import ResponseFacts, judge
from ..budget.stream_usage import with_stream_usage
from ..budget.wire import Sample
from ..config import PROVENANCE, ServiceSettings
from ..exact import ExactCounts, Refined
from .metrics import Metrics
from .pool_load import LoadView, PoolReadings

log = logging.getLogger("extproc.service")


@dataclass(slots=True)
class _Awaited:
    """A decision whose response will be read."""

    decision: Decision
    observation: Observation | None
    pool: str
    client: str | None


@dataclass(slots=True)
class Routed:
    """What the routing side decided for one request."""

    decision: Decision
    pool: str
    spilled_from: str | None = None
    decision_id: str | None = None      # names the request to the usage filter and the access-log stream
    read: bool = False                  # its response is read (the usage filter runs on its route)
    new_body: bytes | None = None       # include_usage injected: the routing stream reads the response
    observation: Observation | None = None  # what learning its true count needs (estimated decisions)
    client: str | None = None           # hash of who sent it
    exact: str | None = None            # an exact count was asked: the source, its outcome and why


@dataclass(frozen=True, slots=True)
class PoolLoad:
    pool: Pool
    in_flight: int            # this replica's requests there not yet ended
    load: LoadView | None     # the pool's own load as read from its metrics (None: not read)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the router would send an explained request now (``Router.place``)."""

    explanation: Explanation
    pool: str                     # spillover and shadow mode applied
    spilled_from: str | None
    shadow: bool
    loads: tuple[PoolLoad, ...]   # every pool, smallest first, as the choice saw it


class Router:
    """Decisions, in-flight counts and the decisions awaiting their responses."""

    _removed: frozenset[str] = frozenset()  # pools a reload removed whose requests still run

    def __init__(self, budget: BudgetRouter, settings: ServiceSettings, metrics: Metrics,
                 exact: ExactCounts | None = None) -> None:
        self.budget = budget
        self.exact = exact  # exact counts for close decisions (issue 12); None: the estimate decides all
        self.s = settings
        self.metrics = metrics
        self.pools = budget.pools
        self.largest = budget.pools[-1].name
        self.inflight = {p.name: 0 for p in budget.pools}
        metrics.watch_inflight(lambda: self.inflight)
        # the pools' own load (service/pool_load.py fills it); None: spillover off
        self.readings = PoolReadings(settings.spillover) if settings.spillover.pools else None
        self._load_watched = False
        self._watch_pool_load()
        self.pending: OrderedDict[str, _Awaited] = OrderedDict()
        self.open: OrderedDict[str, tuple[str, float]] = OrderedDict()  # checked requests not yet ended
        self._ids = itertools.count(1)
        # unique per process start: a restarted router (pid 1 again in a container) or a replica
        # must not take another one's late access-log entries for its own decisions
        self._id_prefix = f"{secrets.token_hex(4)}-"
        self.pool_header = settings.pool_header
        self.h = {name: settings.provenance_header(name) for name in PROVENANCE}
        self._calibrating = True
        self._calibrating_checked = -1e9
        self._rng = random.Random()
        self._capacity = {p.name: p.max_context for p in budget.pools}
        self._sample_tokens = 1.0          # token bucket of usage reads once calibrated
        self._sample_refill = time.monotonic()
        # identities are hashed with a key: stable across restarts and replicas when configured
        self._hash_key = (settings.client_hash_key.encode() if settings.client_hash_key
                          else secrets.token_bytes(16))
        self._client_header = settings.client_header
        self.shared = None  # service/shared_state.py SharedState: samples go through the fleet's stream

    def _watch_pool_load(self) -> None:
        if self.readings is not None and not self._load_watched:  # once: a reload may turn spillover on
            self._load_watched = True
            self.metrics.watch_pool_load(lambda: [] if self.readings is None else
                                         [v for p in self.pools if (v := self.readings.view(p.name))])

    def _respill(self, spillover) -> None:
        """New spillover settings (a reload): fresh readings, keeping the last reading of each pool
        read from the same place (so spillover does not pause for a period)."""
        old = self.readings
        self.readings = PoolReadings(spillover) if spillover.pools else None
        if old is not None and self.readings is not None:
            for pool, src in self.readings.sources.items():
                was = old.sources.get(pool)
                if was is not None and (was.endpoints, was.dns) == (src.endpoints, src.dns):
                    self.readings.readings[pool] = old.readings[pool]
                    self.readings.sent_count[pool] = old.sent_count[pool]
        self._watch_pool_load()

    def reconfigure(self, settings: ServiceSettings) -> None:
        """A reloaded config (service/reload.py), from the next request on; the budget core has its
        new pools already. In-flight counts and awaited responses stay: a pool kept keeps its count,
        a new one starts at 0, a removed one is never chosen again and counts down as its requests
        end (then it goes). Capacities of removed pools stay for judging their late responses."""
        if settings.spillover != self.s.spillover:
            self._respill(settings.spillover)
        self.s = settings
        self.pools = self.budget.pools
        self.largest = self.pools[-1].name
        current = {p.name for p in self.pools}
        for name in current:
            self.inflight.setdefault(name, 0)
        for name in [n for n, count in self.inflight.items() if n not in current and count <= 0]:
            del self.inflight[name]
        self._removed = frozenset(self.inflight) - current
        old = self._capacity if len(self._capacity) < 64 else {}  # bounded over any number of reloads
        self._capacity = {**old, **{p.name: p.max_context for p in self.pools}}
        self.pool_header = settings.pool_header
        self.h = {name: settings.provenance_header(name) for name in PROVENANCE}
        self._client_header = settings.client_header

    # -- who sent it ---------------------------------------------------------------------------
    def client_of(self, header: Callable[[str], str | None]) -> str | None:
        """The hashed identity of a request's sender from its headers (``header(name)`` gives a
        header's value or None), or None when nothing names it."""
        if self._client_header:
            value = header(self._client_header)
            if value:
                return self.client_hash("id:" + value)
        forwarded = header("x-forwarded-for")
        if forwarded:
            # Envoy (use_remote_address) appends the address it saw; with trusted proxies in front
            # of it, theirs follow the client's. Entries further left are the client's own word.
            hops = [h.strip() for h in forwarded.split(",")]
            at = len(hops) - 1 - self.s.client_trusted_hops
            if at >= 0 and hops[at]:
                return self.client_hash("addr:" + hops[at])
        return None

    def client_hash(self, identity: str) -> str:
        return hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), key=self._hash_key,
                               digest_size=8).hexdigest()

    # -- request side --------------------------------------------------------------------------
    def choose(self, d: Decision) -> tuple[str, str | None]:
        """The pool to send to (spillover applied) and the preferred pool when it spilled."""
        return self._spill(d)[:2]

    def _spill(self, d: Decision) -> tuple[str, str | None, str | None]:
        """A request that fits goes to the next larger pool that also holds it when its own
        pool's fresh reading is over a threshold and that pool's fresh reading is not. A stale or
        missing reading on either side: it stays (never a guess, never to a pool too small); the
        third value then says why it was held ("stale" or "no_room")."""
        if self.s.shadow:
            return self.largest, None, None
        pool = d.pool
        readings = self.readings
        if readings is None or d.reason != "fits" or pool == self.largest:
            return pool, None, None
        now = time.monotonic()
        here = readings.view(pool, now)
        if here is None or not here.pressured:
            return pool, None, "stale" if here is not None and not here.fresh else None
        blind = False
        for name in d.fits:  # larger pools that also hold the request, smallest first
            if name == pool:
                continue
            there = readings.view(name, now)
            if there is not None and there.has_room:
                return name, pool, None
            blind = blind or there is None or not there.fresh
        return pool, None, "stale" if blind else "no_room"

    def place(self, explanation: Explanation) -> Placement:
        """A dry run of ``route`` for an explained body: the pool it would go to now, with the
        load that choice read. Counts nothing and draws no sample."""
        pool, spilled_from, _ = self._spill(explanation.decision)
        r = self.readings
        loads = tuple(PoolLoad(p, self.inflight[p.name], r.view(p.name) if r else None) for p in self.pools)
        return Placement(explanation, pool, spilled_from, self.s.shadow, loads)

    def at_risk(self, d: Decision, pool: str) -> bool:
        """Could this request not fit the pool it goes to? Only where a larger pool exists and
        nothing proved the fit: the size bound (source ``bound``) is a true upper bound, and so is
        an exact count (source ``exact``); the estimate is not. Every such
        response is read, so that every misroute is counted."""
        return pool != self.largest and d.reason == "fits" and d.source not in ("bound", "exact")

    def wants_read(self, d: Decision, pool: str) -> bool:
        """Read this response? Every one at risk of a misroute (``at_risk``), every one while the
        model calibrates; after that a share (``usage_sample_rate``) under a cap per second,
        since each read costs a gRPC stream."""
        if d.reason == "unreadable" or not d.model:
            return False
        if self.at_risk(d, pool):
            return True
        est = self.budget.estimator
        if not est.learns:
            return False
        if est.samples(d.model) < self.s.calibration_samples:
            return True
        if self._rng.random() >= self.s.usage_sample_rate:
            return False
        return self._take_sample_token()

    def _take_sample_token(self) -> bool:
        now = time.monotonic()
        rate = self.s.usage_samples_per_s
        if rate <= 0:
            return False
        self._sample_tokens = min(max(rate, 1.0), self._sample_tokens + (now - self._sample_refill) * rate)
        self._sample_refill = now
        if self._sample_tokens >= 1.0:
            self._sample_tokens -= 1.0
            return True
        return False

    def may_inject(self) -> bool:
        """At request-headers time (model unknown yet): may this request get include_usage
        injected? Always while some model is still calibrating, else at the sample rate.
        Never for an estimator that does not learn."""
        est = self.budget.estimator
        if not self.s.inject_stream_usage or not est.learns:
            return False
        now = time.monotonic()
        if now - self._calibrating_checked > 1.0:  # O(keys): at most once a second
            keys = est.keys()
            self._calibrating = not keys or any(est.samples(k) < self.s.calibration_samples for k in keys)
            self._calibrating_checked = now
        return self._calibrating or self._rng.random() < self.s.usage_sample_rate

    # -- the routing door: every protocol routes through here -------------------------------------
    def route(self, body: bytes, path: str, *, may_inject: bool = False, ended_by_log: bool = False,
              client: str | None = None) -> Routed | Awaitable[Routed]:
        """Route a body: a ``Routed`` at once for most requests, or an awaitable of one when the
        decision must wait — a body above ``offload_bytes`` is read in a worker thread, so that
        the loop stays free for other requests (if the caller is cancelled meanwhile, nothing
        was counted). Not a coroutine for the rest: the check endpoint answers on the spot,
        without a task per request. ``client``: its sender's hash.

        By its size alone when that proves it fits the smallest pool (most requests: no features
        measured), else by the estimate; a request whose response will be read is decided on the
        estimate, which is what the calibrator learns from.

        The request's end comes back one of two ways: the ext_proc routing stream ends with the
        request (the caller then calls ``finished``), or, for ext_authz checks
        (``ended_by_log``), Envoy's access-log stream names the decision id (``request_ended``)."""
        if len(body) > self.s.offload_bytes:
            return self._route_offloaded(body, path, may_inject, ended_by_log, client)
        shape = self.budget.read(body, path)
        d, observation = self.budget.decide(shape, by_size=True)
        why = self.exact.wants(self.budget, d, observation) if self.exact is not None else None
        if why is not None:  # close to a pool's capacity: counted exactly (awaited)
            return self._route_exact(d, observation, why, body, may_inject, ended_by_log, client)
        choice = self._spill(d)
        read = self.wants_read(d, choice[0])
        if read and d.source == "bound":
            d, observation = self.budget.decide(shape)
            choice = self._spill(d)
        return self._record(d, observation, choice, read, body, may_inject, ended_by_log, client)

    async def _route_offloaded(self, body: bytes, path: str, may_inject: bool, ended_by_log: bool,
                               client: str | None) -> Routed:
        """``route`` for a large body: the pure core in a worker thread, the accounting here."""
        shape, (d, observation) = await asyncio.to_thread(self._read_and_decide, body, path)
        why = self.exact.wants(self.budget, d, observation) if self.exact is not None else None
        if why is not None:
            return await self._route_exact(d, observation, why, body, may_inject, ended_by_log, client)
        choice = self._spill(d)
        read = self.wants_read(d, choice[0])
        if read and d.source == "bound":
            d, observation = await asyncio.to_thread(self.budget.decide, shape)
            choice = self._spill(d)
        return self._record(d, observation, choice, read, body, may_inject, ended_by_log, client)

    async def _route_exact(self, d: Decision, observation: Observation | None, why: str, body: bytes,
                           may_inject: bool, ended_by_log: bool, client: str | None) -> Routed:
        """``route`` for a close decision: the exact count decides where it is had, and is learned
        right after (a calibration sample that needs no response: the client guards apply). Such a
        request is not at risk: its response is read only as a proven fit's is (while the model
        calibrates, or sampled), and teaches nothing twice. On a failed count the estimate decides
        as before."""
        refined = await self.exact.refine(self.budget, d, observation, body, why)
        self._count_exact(refined)
        d = refined.decision
        if d.source == "exact":
            # learned once the answer is on its way (a learning step costs about a millisecond,
            # which the request need not wait for)
            asyncio.get_running_loop().call_soon(self._learn, observation, refined.count.total, client)
            observation = None  # learned: a read response would teach it twice
        choice = self._spill(d)
        read = self.wants_read(d, choice[0])
        out = self._record(d, observation, choice, read, body, may_inject, ended_by_log, client)
        out.exact = refined.header()
        return out

    def _count_exact(self, refined: Refined) -> None:
        if refined.count is None:
            return
        m = self.metrics
        for source, outcome, _ in refined.count.tried:  # (local, then the pool for what local passes on: two)
            m.child(m.exact_counts, source, outcome).inc()
        if refined.count.outcome == "counted":  # what the request waited, once
            m.child(m.exact_seconds, refined.count.source).observe(refined.count.seconds)

    def _read_and_decide(self, body: bytes, path: str) -> tuple[RequestShape, tuple[Decision, Observation | None]]:
        shape = self.budget.read(body, path)
        return shape, self.budget.decide(shape, by_size=True)

    async def explain(self, body: bytes, path: str) -> Placement:
        """What ``route`` would do with a body now, with every number behind it (a dry run:
        counts nothing, draws no sample); large bodies off the loop, as on the request path."""
        if len(body) > self.s.offload_bytes:
            explanation = await asyncio.to_thread(self.budget.explain, body, path)
        else:
            explanation = self.budget.explain(body, path)
        if self.exact is not None:  # counted as route() would count it (nothing learned)
            refined = await self.exact.refine(self.budget, explanation.decision, explanation.observation, body)
            explanation = dataclasses.replace(explanation, decision=refined.decision)
        return self.place(explanation)

    def _record(self, d: Decision, observation: Observation | None, choice: tuple[str, str | None, str | None],
                read: bool, body: bytes, may_inject: bool, ended_by_log: bool, client: str | None) -> Routed:
        """Reads and accounting for a decision (``choice``: what ``_spill`` chose). Runs on the
        event loop only: in-flight counts and the id tables are not shared with worker threads."""
        pool, spilled_from, held = choice
        out = Routed(d, pool, spilled_from, observation=observation, client=client)
        if read:
            if may_inject and d.api in ("chat", "completions") and b'"stream"' in body:
                out.new_body = with_stream_usage(body)
            if out.new_body is None:
                out.read = True
                out.decision_id = self._new_id()
                self.pending[out.decision_id] = _Awaited(d, observation, pool, client)
                while len(self.pending) > self.s.max_pending:
                    self.pending.popitem(last=False)
        m = self.metrics
        if ended_by_log:
            out.decision_id = out.decision_id or self._new_id()
            self.open[out.decision_id] = (pool, time.monotonic())
            self.expire_open()
        self.inflight[pool] += 1
        if self.readings is not None:
            self.readings.sent(pool)
        m.child(m.decisions, pool, d.reason, d.source).inc()
        m.child(m.budget, pool).observe(d.budget_tokens)
        if spilled_from:
            m.child(m.spillovers, spilled_from, pool).inc()
        elif held:
            m.child(m.spill_held, pool, held).inc()
        return out

    @property
    def decision_prefix(self) -> str:
        """What every decision id of this router starts with (unique per process start)."""
        return self._id_prefix

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    def request_ended(self, decision_id: str) -> None:
        """Envoy logged the end of a request decided by an ext_authz check."""
        found = self.open.pop(decision_id, None)
        if found is not None:
            self.finished(found[0])

    def expire_open(self) -> None:
        """A request whose end never came back (its check answered too late for Envoy, or access
        logs lost) stops counting once it cannot still be running, or when the table is full."""
        horizon = time.monotonic() - self.s.max_request_s
        while self.open:
            decision_id, (pool, t) = next(iter(self.open.items()))
            if t > horizon and len(self.open) <= self.s.max_pending:
                break
            del self.open[decision_id]
            self.finished(pool)
            self.metrics.ends_missed.inc()

    def decision_headers(self, routed: Routed) -> list[tuple[str, str]]:
        """The headers that carry a decision upstream (both routing filters set these)."""
        d, h = routed.decision, self.h
        values = [(self.pool_header, routed.pool), (h["budget"], str(d.budget_tokens)),
                  (h["estimate"], str(d.prompt_tokens)), (h["source"], d.source), (h["reason"], d.reason)]
        if routed.decision_id:
            values.append((h["decision"], routed.decision_id))
        if routed.read:
            values.append((h["read"], "1"))
        if self.s.shadow:
            values.append((h["shadow"], d.pool))
        if routed.spilled_from:
            values.append((h["spilled"], routed.spilled_from))
        if routed.exact:
            values.append((h["exact"], routed.exact))
        return values

    def decision_fields(self, routed: Routed) -> dict:
        """The decision as access-log metadata."""
        d = routed.decision
        fields = {"pool": routed.pool, "decided_pool": d.pool, "budget": d.budget_tokens, "estimate": d.prompt_tokens,
                  "output_reserve": d.output_tokens, "source": d.source, "reason": d.reason, "api": d.api}
        if routed.spilled_from:
            fields["spilled_from"] = routed.spilled_from
        if routed.exact:
            fields["exact"] = routed.exact
        return fields

    def finished(self, pool: str) -> None:
        count = self.inflight.get(pool)
        if count is None:  # a pool a reload removed, already counted out
            return
        self.inflight[pool] = count - 1
        if count == 1 and pool in self._removed:  # a removed pool's last request ended
            del self.inflight[pool]
            self._removed -= {pool}

    # -- response side -------------------------------------------------------------------------
    def awaits(self, decision_id: str | None) -> bool:
        """Is the response of this decision read? Ours marked for reading, or, with a shared state,
        another replica's (behind one Envoy a usage stream reaches any replica): relayed to it."""
        return decision_id in self.pending or (self.shared is not None and self.shared.foreign(decision_id))

    def response_read(self, decision_id: str | None, facts: ResponseFacts) -> None:
        """The usage filter read the response of a request marked for reading."""
        awaited = self.pending.pop(decision_id, None) if decision_id else None
        if awaited is not None:
            self.learn_from(awaited.decision, awaited.observation, awaited.pool, facts, awaited.client)
        elif self.shared is not None:
            self.shared.relay(decision_id, facts)

    def learn_from(self, d: Decision, observation: Observation | None, pool: str, facts: ResponseFacts,
                   client: str | None = None) -> None:
        """Count what a response shows (a misroute of its kind, the usage read) and learn the
        prompt's true count where the response states it (``observation``: what the decision
        measured; None when it measured nothing to learn from)."""
        m = self.metrics
        miss = judge(facts, self._capacity[pool], d.requested_output, d.prompts)
        if miss is not None and pool != self.largest:  # the largest pool is where nothing else fits
            m.child(m.misroutes, pool, miss.kind).inc()
            log.warning("misroute: kind=%s pool=%s model_key=%s budget=%d estimate=%d vllm_prompt=%s%s limit=%d",
                        miss.kind, pool, d.model[:64], d.budget_tokens, d.prompt_tokens,
                        "?" if miss.prompt_tokens is None else miss.prompt_tokens, "" if miss.exact else "+",
                        self._capacity[pool])
        if facts.status == 200:
            if facts.prompt_tokens is None:
                m.usage.labels("stream_missed" if facts.streamed else "json_missed").inc()
                return
            m.usage.labels("stream" if facts.streamed else "json").inc()
            self._learn(observation, facts.prompt_tokens, client)
            return
        if miss is None:
            m.usage.labels("other_status").inc()
            return
        m.usage.labels("context_error").inc()
        if miss.prompt_tokens is None:
            return
        if miss.exact:
            self._learn(observation, miss.prompt_tokens, client)
        elif miss.prompt_tokens > d.prompt_tokens:
            # "at least N": the truth is N or more. Learned only where it is above the estimate,
            # so it can move the estimate towards the truth and never past it.
            self._learn(observation, miss.prompt_tokens, client, lower_bound=True)

    def _learn(self, observation: Observation | None, prompt_tokens: int, client: str | None,
               lower_bound: bool = False) -> None:
        if observation is None:
            return
        if self.shared is not None:  # applied when the shared stream brings it back (never waits)
            self.shared.publish(observation, prompt_tokens, client, lower_bound)
            return
        self.apply_sample(Sample(observation, prompt_tokens, client, lower_bound))

    def apply_sample(self, sample: Sample, own: bool = True) -> None:
        """Teach the calibration one sample (``own``: learned by this replica, whose estimate
        error is exported; the shared stream also brings the other replicas')."""
        obs = sample.observation
        err = self.budget.observe(obs, sample.prompt_tokens, sample.client, sample.lower_bound)
        if err is not None and own:
            self.metrics.estimate_error.labels(obs.family.name).observe(err)
