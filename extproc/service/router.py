"""The router's state between the protocols: pool choice with load-aware spillover, which
responses to read, in-flight counts per pool, and what a response teaches: its usage, and
whether its request was misrouted (extproc.budget.response judges; this counts and learns).

Both routing filters call it (service/check.py for ext_authz, service/processor.py for ext_proc);
it knows no protocol. Runs on the event loop only: nothing here is shared with worker threads.

Who sent a request (``client_of``): the configured identity header (``service.client_header``,
e.g. a hashed API key or a user id a gateway sets), else the address Envoy saw (the last
``x-forwarded-for`` entry, which Envoy appends itself with ``use_remote_address``; with
``service.client_trusted_hops`` proxies in front of Envoy, that many entries further left). The
core only ever sees a keyed hash of it, and so do the operator API and the logs.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..budget import BudgetRouter, Decision, Explanation, Observation, Pool, RequestShape
from ..budget.response import ResponseFacts, judge
from ..budget.stream_usage import with_stream_usage
from ..budget.wire import Sample
from ..config import PROVENANCE, ServiceSettings
from .metrics import Metrics

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


@dataclass(frozen=True, slots=True)
class PoolLoad:
    pool: Pool
    in_flight: int
    spillover_limit: int | None


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

    def __init__(self, budget: BudgetRouter, settings: ServiceSettings, metrics: Metrics) -> None:
        self.budget = budget
        self.s = settings
        self.metrics = metrics
        self.pools = budget.pools
        self.largest = budget.pools[-1].name
        self.inflight = {p.name: 0 for p in budget.pools}
        metrics.watch_inflight(lambda: self.inflight)
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
        if self.s.shadow:
            return self.largest, None
        pool = d.pool
        limit = self.s.spillover_limit(pool)
        if limit is None or self.inflight[pool] < limit or d.reason != "fits":
            return pool, None
        for name in d.fits:  # larger pools that also hold the request, smallest first
            if name == pool:
                continue
            other = self.s.spillover_limit(name)
            if other is None or self.inflight[name] < other:
                return name, pool
        return pool, None  # every pool that holds it is at its limit: stay (never to one too small)

    def place(self, explanation: Explanation) -> Placement:
        """A dry run of ``decide`` for an explained body: the pool it would go to now, with the
        load that choice read. Counts nothing and draws no sample."""
        pool, spilled_from = self.choose(explanation.decision)
        loads = tuple(PoolLoad(p, self.inflight[p.name], self.s.spillover_limit(p.name)) for p in self.pools)
        return Placement(explanation, pool, spilled_from, self.s.shadow, loads)

    def at_risk(self, d: Decision, pool: str) -> bool:
        """Could this request not fit the pool it goes to? Only where a larger pool exists and
        nothing proved the fit: the size bound (source ``bound``) is a true upper bound, the
        estimate is not. Every such response is read, so that every misroute is counted."""
        return pool != self.largest and d.reason == "fits" and d.source != "bound"

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

    def decide(self, body: bytes, path: str, may_inject: bool = False, ended_by_log: bool = False,
               client: str | None = None) -> Routed:
        """Route a body: by its size alone when that proves it fits the smallest pool (most
        requests: no features measured), else by the estimate. ``client``: its sender's hash."""
        shape = self.budget.read(body, path)
        d, observation = self.budget.decide(shape, by_size=True)
        return self.record(d, observation, body, may_inject, ended_by_log, client, shape)

    def record(self, d: Decision, observation: Observation | None, body: bytes, may_inject: bool = False,
               ended_by_log: bool = False, client: str | None = None, shape: RequestShape | None = None) -> Routed:
        """Pool choice, sampling and accounting for a decision. Runs on the event loop only:
        in-flight counts and the id tables are not shared with worker threads. ``shape``: the
        parsed body, when the decision may still need the full estimate (one decided by size).

        The request's end comes back one of two ways: the ext_proc routing stream ends with the
        request (the caller then calls ``finished``), or, for ext_authz checks
        (``ended_by_log``), Envoy's access-log stream names the decision id (``request_ended``)."""
        pool, spilled_from = self.choose(d)
        read = self.wants_read(d, pool)
        if read and observation is None and shape is not None and d.source == "bound":
            # its usage will be learned, and the calibrator learns from the estimate: the same
            # parse, now with its features measured
            d, observation = self.budget.decide(shape)
            pool, spilled_from = self.choose(d)
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
        m.child(m.decisions, pool, d.reason, d.source).inc()
        m.child(m.budget, pool).observe(d.budget_tokens)
        if spilled_from:
            m.spillovers.labels(spilled_from, pool).inc()
        return out

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
        return values

    def decision_fields(self, routed: Routed) -> dict:
        """The decision as access-log metadata."""
        d = routed.decision
        fields = {"pool": routed.pool, "decided_pool": d.pool, "budget": d.budget_tokens, "estimate": d.prompt_tokens,
                  "output_reserve": d.output_tokens, "source": d.source, "reason": d.reason, "api": d.api}
        if routed.spilled_from:
            fields["spilled_from"] = routed.spilled_from
        return fields

    def finished(self, pool: str) -> None:
        self.inflight[pool] -= 1

    # -- response side -------------------------------------------------------------------------
    def response_read(self, decision_id: str | None, facts: ResponseFacts) -> None:
        """The usage filter read the response of a request marked for reading."""
        awaited = self.pending.pop(decision_id, None) if decision_id else None
        if awaited is not None:
            self.learn_from(awaited.decision, awaited.observation, awaited.pool, facts, awaited.client)

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
