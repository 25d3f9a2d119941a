"""Exact prompt counts for the few requests whose decision is close (issue 12).

Only a request whose budget range contains a pool's capacity (``BudgetRouter.close``) is
counted; the size bound and the estimate decide the rest as before. ``ExactCounts.count`` asks
the source the config names for the model (settings.py): the router's own tokenizer (local.py) or
a pool's vLLM /tokenize (pool.py). It never raises: every failure is an outcome (``OUTCOMES``) and
the estimate decides.

    exact = ExactCounts(ExactSettings())
    found = await exact.count(model, api, body)     # None: no source for this model
    if found.outcome == "counted":
        d = budget.decide_exact(d, found.tokens, why=...)
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

import orjson

from ..budget import BudgetRouter, Decision, Observation
from ..budget.router import close_to, distrusted
from .local import LocalCounters, count_local
from .pool import PoolCounter, PoolError
from .precise import Capped
from .settings import DEFAULT_RULES, OUTCOMES, SOURCES, ExactRule, ExactSettings, LocalSettings, PoolSettings

__all__ = ["DEFAULT_RULES", "OUTCOMES", "SOURCES", "ExactCount", "ExactCounts", "ExactRule", "ExactSettings",
           "LocalSettings", "PoolSettings", "Refined"]


SLOWER = 30  # Hugging Face tokenizers against quicktok: a body this much smaller goes to a thread


@dataclass(slots=True)
class ExactCount:
    source: str                 # "local" or "pool": who was asked (last)
    outcome: str                # one of OUTCOMES
    tokens: int = 0             # the longest prompt's count (what routing needs)
    total: int = 0              # every prompt's together (what learning takes)
    seconds: float = 0.0        # time the count took (waiting on a pool included)
    tried: tuple[tuple[str, str, float], ...] = ()  # (source, outcome, seconds) of each source asked


@dataclass(slots=True)
class Refined:
    """An estimated decision after the exact-count step."""

    decision: Decision              # decided on the exact count (source "exact") when one was had
    count: ExactCount | None = None  # what was asked and how it went; None: not close, or no source
    why: str = ""                    # "close to short (8192)", "distrusted estimate near short (8192)"

    def header(self) -> str | None:
        """The provenance header's value: the source, its outcome and why it was asked."""
        if self.count is None:
            return None
        return f"{self.count.source} {self.count.outcome}; {self.why}"


class ExactCounts:
    def __init__(self, settings: ExactSettings | None = None, local: LocalCounters | None = None) -> None:
        self.s = s = settings or ExactSettings()
        self.local = local or LocalCounters()  # (a reloaded config keeps the tokenizers loaded)
        p = s.pool
        self.pool = PoolCounter(p.timeout_s, p.max_concurrent, p.max_per_s, p.max_bytes, p.max_response_bytes)

    def rule_for(self, model: str) -> ExactRule | None:
        return self.s.rule_for(model)

    def warm(self, model: str) -> None:
        """Load the local counter for a model now, its template compiled (raises what loading raises)."""
        rule = self.rule_for(model)
        if rule is not None and rule.source == "local":
            count_local(self.local.load(rule, model), "chat", {"model": model, "messages": [{"role": "user", "content": "hi"}]})

    def wants(self, budget: BudgetRouter, d: Decision, observation: Observation | None) -> str | None:
        """Why an estimated decision should be counted ("close to short (8192)"), or None: not
        close, or no source counts its model. Pure and cheap (no body is read)."""
        if not self.s.enabled or not d.model or d.source in ("bound", "exact", "fallback"):
            return None
        distrust = distrusted(d, observation)
        near = close_to(d, budget.pools, distrust)
        if near is None or self.rule_for(d.model) is None:
            return None
        return f"{'distrusted estimate near' if distrust else 'close to'} {near.name} ({near.max_context})"

    async def refine(self, budget: BudgetRouter, d: Decision, observation: Observation | None,
                     body: bytes, why: str | None = None) -> Refined:
        """Decide again on an exact count where ``d`` is close to a pool's capacity and a source
        counts its model; else ``d`` as it is (its detail says what was tried). ``why``: what
        ``wants`` said, when the caller asked already. Never raises."""
        why = why or self.wants(budget, d, observation)
        if why is None:
            return Refined(d)
        found = await self.count(d.model, d.api, body)
        if found is None:
            return Refined(d)
        if found.outcome != "counted":
            note = f"exact: {found.source} {found.outcome}, {why}"
            return Refined(dataclasses.replace(d, detail=f"{d.detail}; {note}" if d.detail else note), found, why)
        return Refined(budget.decide_exact(d, found.tokens, f"exact: {found.source}, {why}"), found, why)

    async def count(self, model: str, api: str, body: bytes) -> ExactCount | None:
        """The exact count of a body's prompts, or None where no rule names the model. Never raises.

        A local rule counts in the router (local.py); a body over ``local.max_bytes``, a
        tokenizer not loaded yet, or a count capped (too many new pairs to check: precise.py)
        goes to the rule's pool, if it names one."""
        rule = self.rule_for(model)
        if rule is None:
            return None
        t0 = time.perf_counter()
        if len(body) > self._max_bytes(rule):  # no source would take it: not even parsed again
            return ExactCount(rule.source, "too_large", tried=((rule.source, "too_large", 0.0),))
        try:
            doc = orjson.loads(body)
        except (orjson.JSONDecodeError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            return ExactCount(rule.source, "unsupported", tried=((rule.source, "unsupported", 0.0),))
        tried: list[tuple[str, str, float]] = []
        found = None
        if rule.source == "local":
            found = await self._local(rule, model, api, doc, len(body))
            tried.append((found.source, found.outcome, found.seconds))
        if found is None or (found.outcome in ("too_large", "unavailable", "capped") and rule.pool_url):
            found = await self._pool(rule, api, doc, len(body))
            tried.append((found.source, found.outcome, found.seconds))
        found.seconds = time.perf_counter() - t0
        found.tried = tuple(tried)
        return found

    def _max_bytes(self, rule: ExactRule) -> int:
        local = self.s.local.max_bytes if rule.source == "local" else 0
        return max(local, self.s.pool.max_bytes if rule.pool_url else 0)

    async def _local(self, rule: ExactRule, model: str, api: str, doc: dict, size: int) -> ExactCount:
        t0 = time.perf_counter()
        ls = self.s.local
        if size > ls.max_bytes:
            return ExactCount("local", "too_large")
        local = self.local.get(rule, model)
        if local is None:
            return ExactCount("local", "unavailable")
        slow = not local.quick  # Hugging Face tokenizers alone: 30x the time of quicktok
        try:
            if size > (ls.inline_bytes // SLOWER if slow else ls.inline_bytes):
                counts = await asyncio.to_thread(count_local, local, api, doc)
            else:
                counts = count_local(local, api, doc)
        except Capped:  # too many of its pairs new at once (precise.py): the estimate decides
            return ExactCount("local", "capped", seconds=time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - vLLM would refuse it (a TemplateError), or a bug: the estimate decides
            return ExactCount("local", "error", seconds=time.perf_counter() - t0)
        if not counts:
            return ExactCount("local", "error", seconds=time.perf_counter() - t0)
        return ExactCount("local", "counted", max(counts), sum(counts), time.perf_counter() - t0)

    async def _pool(self, rule: ExactRule, api: str, doc: dict, size: int) -> ExactCount:
        t0 = time.perf_counter()
        if not rule.pool_url:
            return ExactCount("pool", "unavailable")
        try:
            n = await self.pool.count(rule.pool_url, api, doc, size)
        except PoolError as exc:
            return ExactCount("pool", exc.outcome, seconds=time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - a bug must cost exactness, never the request
            return ExactCount("pool", "error", seconds=time.perf_counter() - t0)
        return ExactCount("pool", "counted", n, n, time.perf_counter() - t0)

    async def close(self) -> None:
        await self.pool.close()
