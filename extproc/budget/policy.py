"""Pool choice: the smallest pool whose context holds the request's conservative budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    max_context: int   # tokens: the pool's vLLM --max-model-len (prompt + output must fit)


DEFAULT_POOLS = (Pool("short", 8192), Pool("long", 65536))  # the paper's two pools


def order_pools(pools: Sequence[Pool]) -> tuple[Pool, ...]:
    """Pools sorted by capacity; names and capacities must be unique and positive."""
    if not pools:
        raise ValueError("at least one pool is needed")
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ValueError("pool names must be unique")
    caps = [p.max_context for p in pools]
    if len(set(caps)) != len(caps):
        raise ValueError("pool capacities must be distinct")
    if min(caps) <= 0:
        raise ValueError("pool capacities must be positive")
    return tuple(sorted(pools, key=lambda p: p.max_context))


def choose_pool(pools: tuple[Pool, ...], budget_tokens: int) -> tuple[Pool, bool]:
    """The smallest pool that holds ``budget_tokens``; the largest (and False) when none does."""
    for pool in pools:
        if budget_tokens <= pool.max_context:
            return pool, True
    return pools[-1], False


def pools_that_fit(pools: tuple[Pool, ...], budget_tokens: int) -> tuple[Pool, ...]:
    """Every pool that can hold the budget, smallest first (for load-aware spillover)."""
    return tuple(p for p in pools if budget_tokens <= p.max_context)
