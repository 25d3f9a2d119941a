"""Admission and pacing of sequences on one simulated instance: vLLM's FCFS waiting queue, the
max_num_seqs and KV-cache limits, and sleeps taken from the instance model.

Simplifications (deliberate): a sequence reserves KV for its whole output at admission, so nothing is
ever preempted; prefills run one at a time (they are compute-bound) while decodes of other sequences go
on unslowed; each sequence paces its own decode steps at the batch size current when the step starts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator

from extproc.fleet.instance import InstanceProfile


@dataclass
class Sequence:
    """One prompt being served: the unit vLLM schedules (a batch /v1/completions request has several)."""

    prompt_tokens: int
    output_tokens: int
    generated: int = 0
    lag_s: float = 0.0  # simulated time owed but not yet slept (see SequenceScheduler.decode)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.generated


@dataclass
class EngineStats:
    """Counters behind /metrics, named after the vLLM metrics they feed."""

    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    request_success_total: collections.Counter = field(default_factory=collections.Counter)  # by finish reason
    requests_rejected_total: collections.Counter = field(default_factory=collections.Counter)  # by reason


@dataclass
class _Waiter:
    sequence: Sequence
    reserve: int
    admitted: asyncio.Future


_MIN_SLEEP_S = 0.002


class SequenceScheduler:
    """Runs sequences on one simulated instance, sleeping ``time_scale`` x the modelled durations."""

    def __init__(self, profile: InstanceProfile, time_scale: float = 1.0, stats: EngineStats | None = None):
        if time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        self.profile = profile
        self.time_scale = time_scale
        self.stats = stats or EngineStats()
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._running = 0
        self._kv_reserved = 0  # tokens promised to admitted sequences (prompt + full output)
        self._kv_used = 0  # tokens actually in the cache, in whole blocks
        self._prefill_lock = asyncio.Lock()

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction (0..1) of the KV cache holding tokens, as vllm:kv_cache_usage_perc reports it."""
        return self._kv_used / self.profile.kv_capacity_tokens

    @contextlib.asynccontextmanager
    async def admitted(self, seq: Sequence) -> AsyncIterator[Sequence]:
        """Wait in the FCFS queue until the sequence fits, hold its slot and KV while inside."""
        reserve = self.profile.kv_footprint_tokens(seq.prompt_tokens + seq.output_tokens)
        waiter = _Waiter(seq, reserve, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self._dispatch()
        try:
            await waiter.admitted
        except asyncio.CancelledError:
            if waiter.admitted.cancelled():
                with contextlib.suppress(ValueError):  # _dispatch may have dropped it already
                    self._queue.remove(waiter)
            else:  # admitted in the same loop turn the caller was cancelled
                self._release(waiter)
            self._dispatch()
            raise
        try:
            yield seq
        finally:
            self._release(waiter)
            self._dispatch()

    async def prefill(self, seq: Sequence) -> None:
        """Process the prompt; the first output token comes out of this step."""
        async with self._prefill_lock:
            await self._sleep(self.profile.prefill_s(seq.prompt_tokens))
        self.stats.prompt_tokens_total += seq.prompt_tokens
        self._advance(seq)

    async def decode(self, seq: Sequence) -> None:
        """One decode step: one more token for this sequence.

        Steps shorter than the event loop's timer resolution are not slept one by one (each sleep
        would cost ~1 ms whatever its length, making scaled-down runs far slower than modelled):
        the owed time accumulates and is slept once it reaches a couple of milliseconds, so the
        pace over any few tokens matches the model."""
        seq.lag_s += self.profile.decode_step_s(self._running, self._kv_used) * self.time_scale
        if seq.lag_s >= _MIN_SLEEP_S:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.sleep(seq.lag_s)
            seq.lag_s -= loop.time() - t0
        self._advance(seq)

    def _advance(self, seq: Sequence) -> None:
        before = self.profile.kv_footprint_tokens(seq.tokens)
        seq.generated += 1
        self._kv_used += self.profile.kv_footprint_tokens(seq.tokens) - before
        self.stats.generation_tokens_total += 1

    def _dispatch(self) -> None:
        # Strict FCFS like vLLM's default policy: a head that does not fit blocks those behind it.
        while self._queue and self._running < self.profile.max_num_seqs:
            head = self._queue[0]
            if head.admitted.done():  # cancelled while waiting; its owner removes it
                self._queue.popleft()
                continue
            if self._kv_reserved + head.reserve > self.profile.kv_capacity_tokens:
                break
            self._queue.popleft()
            self._running += 1
            self._kv_reserved += head.reserve
            self._kv_used += self.profile.kv_footprint_tokens(head.sequence.tokens)
            head.admitted.set_result(None)

    def _release(self, waiter: _Waiter) -> None:
        self._running -= 1
        self._kv_reserved -= waiter.reserve
        self._kv_used -= self.profile.kv_footprint_tokens(waiter.sequence.tokens)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds * self.time_scale)
