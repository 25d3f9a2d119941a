"""One calibration for every router replica, shared through Redis (or Valkey):
``service.shared_state: redis://host:port/db`` (``rediss://`` for TLS).

The calibration is a deterministic state machine: the same samples applied in the same order to
the same start give the very same state (budget/wire.py sends a sample's exact numbers, and a
snapshot restores exactly). So:

* every learned sample (its feature counts, true count, lower-bound flag, model, family and
  client hash: never text) is appended to one bounded Redis stream (``XADD MAXLEN ~``), and every
  replica applies the stream's entries in stream order, its own included. While Redis is up a
  replica does *not* apply its own sample when it learns it: it applies it when the stream brings
  it back, in the stream's order, so it is applied once and in the same place everywhere;
* the stream is cut short, so a snapshot of the state lives in Redis too, with the id of the last
  entry it covers: any replica in sync writes one now and then (one at a time, under a lock; an
  older one never replaces a newer one). A new replica restores it and applies the entries after
  it before it reports itself serving (a bounded wait: Redis down at start, it starts from its
  local snapshot or the priors and says so);
* Redis down or slow: nothing on the request path waits for it. Publishing is an append to a
  bounded outbox that a background task drains; while Redis is unreachable a replica applies its
  samples locally at once (routing keeps learning) and keeps them in the outbox. When Redis
  returns it publishes them and then *resyncs*: restores the shared snapshot and applies the
  stream after it, so its samples count once (they are in the stream now) and it agrees with
  every other replica again. A Redis that came back empty (restarted without persistence) has no
  snapshot: the first replica back seeds it with its own state (its samples of the outage are in
  it, and leave its outbox) and a new epoch; the others see the epoch change and resync to it.

Entries read from Redis are not trusted: one that is not a valid sample document is skipped and
counted, and every applied sample goes through the same guard admission (``BudgetRouter.observe``)
as a local one. Whoever can write to this Redis can still teach the calibration: keep it private
(a password in the URL, TLS with ``rediss://``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import orjson
from prometheus_client import Counter, Gauge

from ..budget import BudgetRouter
from ..budget.response import ResponseFacts
from ..budget.wire import Sample, facts_from_doc, facts_to_doc, sample_from_doc, sample_to_doc

log = logging.getLogger("extproc.service")

STREAM = "extproc:calibration:samples"
SNAPSHOT = "extproc:calibration:snapshot"        # hash: id (last entry covered), epoch, doc
LOCK = "extproc:calibration:snapshot-lock"
STREAM_LEN = 100_000        # entries kept (about: MAXLEN ~); snapshots come far more often
OUTBOX = 10_000             # samples waiting to be published (beyond: the oldest are dropped)
BATCH = 500                 # entries per read or publish round trip
SNAPSHOT_EVERY_S = 10.0
START_WAIT_S = 10.0         # a new replica waits this long for the fleet's state, then starts without it
MAX_ENTRY_BYTES = 256 << 10
MAX_SNAPSHOT_BYTES = 64 << 20
TIMEOUT_S = 2.0             # no Redis call waits longer (XREAD blocks for half of it)
COALESCE_S = 0.01           # publish and read at most every this long: round trips (router CPU) stay
                            # bounded at any sample rate, and a sample is learned fleet-wide within ~20 ms
BACKOFF_S = (0.1, 5.0)
OUTCOMES = ("published", "applied", "local", "dropped", "rejected")
RELAY = "extproc:relay:"    # + a replica's decision-id prefix: the responses others read for it
RELAY_LEN = 1_000           # entries kept per replica's relay stream
RELAY_TTL_S = 120           # a dead replica's relay stream goes away
RELAY_OUTCOMES = ("sent", "received", "rejected", "dropped")

# Write the snapshot only if there is none, or this one covers a later stream entry.
_WRITE_SNAPSHOT = """
local cur = redis.call('HGET', KEYS[1], 'id')
if cur then
  local a, b = string.match(cur, '^(%d+)-(%d+)$')
  local c, d = string.match(ARGV[1], '^(%d+)-(%d+)$')
  if a and (tonumber(c) < tonumber(a) or (tonumber(c) == tonumber(a) and tonumber(d) <= tonumber(b))) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'epoch', ARGV[2], 'doc', ARGV[3])
return 1
"""
# Seed: only where there is no snapshot at all.
_SEED_SNAPSHOT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', '0-0', 'epoch', ARGV[1], 'doc', ARGV[2])
return 1
"""


def redacted(url: str) -> str:
    """The URL without its credentials (for logs)."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}:{u.port or 6379}{u.path or '/0'}"


def _newer(a: str, b: str) -> bool:
    """Is stream id ``a`` after ``b``?"""
    x, _, y = a.partition("-")
    p, _, q = b.partition("-")
    return (int(x), int(y or 0)) > (int(p), int(q or 0))


@dataclass(slots=True)
class _Pending:
    seq: int
    data: bytes
    applied: bool   # applied locally already (learned while Redis was unreachable)


class _Lost(Exception):
    """The shared state cannot be followed from where this replica is: resync."""


class _Replaced(Exception):
    """An operator replaced this replica's calibration: it becomes the fleet's."""


class SharedState:
    """Follows and feeds the shared calibration (see the module doc). ``apply(sample, own)``
    teaches the local calibration one sample (``own``: this replica learned it)."""

    def __init__(self, url: str, budget: BudgetRouter, apply: Callable[[Sample, bool], None], registry,
                 decision_prefix: str = "", on_relayed: Callable[[str, ResponseFacts], None] | None = None) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = redacted(url)
        self.budget = budget
        self._apply_sample = apply
        # no silent retries: a lost connection must be seen, since Redis may have come back empty
        self.redis = aioredis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                                       retry=Retry(NoBackoff(), 0))
        self.replica = secrets.token_hex(6)
        self.up = False           # the last round trip to Redis worked
        self.in_sync = False      # the local state is the shared one up to ``last_id``
        self.last_id = "0-0"
        self.epoch: str | None = None
        self.outbox: deque[_Pending] = deque()
        self._seq = 0
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._tried = asyncio.Event()  # the first attempt is over (synced or failed)
        self._error = ""
        self._generation = 0  # of ``_follow``: a reader of an ended one must not apply what it reads
        self._replace = asyncio.Event()  # set by ``replaced``: publish the local state as the fleet's
        self._task: asyncio.Task | None = None
        # Responses read here for another replica's decisions go to that replica (behind one Envoy
        # the usage stream of a response reaches any replica, not the one that decided it).
        self.prefix = decision_prefix.rstrip("-")
        self.relay_key = RELAY + self.prefix
        self._relay_last = "0-0"
        self._on_relayed = on_relayed
        self.relays: deque[tuple[bytes, bytes]] = deque()
        relayed = Counter("extproc_shared_state_relayed_reads", "Responses read for another replica's decision: sent "
                          "to it, received from others, rejected (invalid), dropped (Redis away or queue full)",
                          ["outcome"], registry=registry)
        self._relayed = {o: relayed.labels(o) for o in RELAY_OUTCOMES}
        self.samples = Counter("extproc_shared_state_samples", "Calibration samples through the shared state, by "
                               "outcome: published, applied (from the stream), local (applied here while Redis "
                               "was unreachable), dropped (outbox full), rejected (invalid entries)",
                               ["outcome"], registry=registry)
        self._counts = {o: self.samples.labels(o) for o in OUTCOMES}
        self.up_gauge = Gauge("extproc_shared_state_up", "1 while the shared calibration is reachable and followed",
                              registry=registry)
        self.resyncs = Counter("extproc_shared_state_resyncs", "Restores of the shared snapshot (start, reconnects)",
                               registry=registry)
        self.snapshots = Counter("extproc_shared_state_snapshots_written", "Shared snapshots this replica wrote",
                                 registry=registry)
        Gauge("extproc_shared_state_outbox", "Samples waiting to be published", registry=registry).set_function(
            lambda: len(self.outbox))

    # -- life ----------------------------------------------------------------------------------
    async def start(self, wait_s: float = START_WAIT_S) -> bool:
        """Start following; wait (at most ``wait_s``) until this replica holds the fleet's state.
        False when it could not in time: it serves from its local state and catches up later."""
        self._task = asyncio.create_task(self._run(), name="shared-state")
        try:
            await asyncio.wait_for(self._tried.wait(), wait_s)
        except asyncio.TimeoutError:
            pass
        if not self._synced.is_set():
            log.warning("shared state %s unreachable at start (%s): serving from the local snapshot or the "
                        "priors; will catch up when it returns", self.url, self._error or "no answer in time")
        return self._synced.is_set()

    async def stop(self, flush_s: float = 0.5) -> None:
        """Stop following, publish what is waiting (briefly), close."""
        if self._task is not None:  # first: no other flush runs beside the last one
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.up and self.outbox:
            try:
                await asyncio.wait_for(self._flush(), flush_s)
            except Exception:  # noqa: BLE001 - stopping: what is not out is lost
                pass
        try:
            await self.redis.aclose()
        except Exception:  # noqa: BLE001
            pass

    # -- the request side: never waits ---------------------------------------------------------
    def publish(self, observation, prompt_tokens: int, client: str | None, lower_bound: bool) -> None:
        """Queue one learned sample for the fleet (applied here now only while Redis is away)."""
        doc = sample_to_doc(observation, prompt_tokens, client, lower_bound)
        doc["r"] = self.replica
        local = not self.up
        if local:
            self._apply(Sample(observation, prompt_tokens, client, lower_bound), own=True)
            self._counts["local"].inc()
        if len(self.outbox) >= OUTBOX:
            self.outbox.popleft()
            self._counts["dropped"].inc()
        self._seq += 1
        self.outbox.append(_Pending(self._seq, orjson.dumps(doc), local))
        self._wake.set()

    def foreign(self, decision_id: str | None) -> bool:
        """A decision id of another replica (its read is relayed to it)?"""
        prefix, sep, n = (decision_id or "").partition("-")
        return bool(sep and self.prefix and prefix != self.prefix and len(prefix) == 8 and _hex(prefix)
                    and 0 < len(n) <= 16 and _hex(n))

    def relay(self, decision_id: str | None, facts: ResponseFacts) -> None:
        """Send what a response told to the replica that decided it (never waits)."""
        if not self.foreign(decision_id):
            return
        if not self.up or len(self.relays) >= OUTBOX:
            self._relayed["dropped"].inc()
            return
        doc = facts_to_doc(facts)
        doc["d"] = decision_id
        self.relays.append(((RELAY + decision_id.partition("-")[0]).encode(), orjson.dumps(doc)))
        self._wake.set()

    def _relayed_in(self, entries) -> None:
        for entry_id, fields in entries:
            self._relay_last = entry_id.decode()
            try:
                doc = orjson.loads(fields.get(b"f", b""))
                decision_id = doc.get("d") if isinstance(doc, dict) else None
                if not isinstance(decision_id, str) or decision_id.partition("-")[0] != self.prefix:
                    raise ValueError("not a decision of this replica")
                facts = facts_from_doc(doc)
            except (ValueError, RecursionError, TypeError):
                self._relayed["rejected"].inc()
                continue
            self._relayed["received"].inc()
            if self._on_relayed is not None:
                try:
                    self._on_relayed(decision_id, facts)
                except Exception as exc:  # noqa: BLE001 - a relayed read must never stop the follower
                    log.warning("relayed read not applied: %s", type(exc).__name__)

    def replaced(self) -> None:
        """The local calibration was replaced on purpose (the operator API's Restore or Reset): it
        becomes the fleet's, under a new epoch; the other replicas resync to it within a snapshot
        period."""
        self._replace.set()

    def _apply(self, sample: Sample, own: bool) -> None:
        try:
            self._apply_sample(sample, own)
        except Exception as exc:  # noqa: BLE001 - a sample must never stop the follower
            self._counts["rejected"].inc()
            log.warning("shared sample not applied: %s", type(exc).__name__)

    # -- following -------------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = BACKOFF_S[0]
        while True:
            try:
                try:
                    await self._sync()
                finally:
                    self._tried.set()
                backoff = BACKOFF_S[0]
                await self._follow()
            except asyncio.CancelledError:
                raise
            except _Replaced:
                self._down()
                continue
            except Exception as exc:  # noqa: BLE001 - Redis errors, timeouts, a reset stream
                self._error = f"{type(exc).__name__}: {str(exc)[:200]}"
                if self.up:  # (once per outage: the retries are quiet)
                    log.warning("shared state %s lost (%s: %s): routing on with local state, retrying",
                                self.url, type(exc).__name__, str(exc)[:200])
                self._down()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(BACKOFF_S[1], backoff * 2)

    def _down(self) -> None:
        self.up = self.in_sync = False
        self.up_gauge.set(0)
        for p in self.outbox:  # queued while up, not out yet: learned here now
            if not p.applied:
                self._apply_entry(p.data, own=True)
                p.applied = True
                self._counts["local"].inc()

    async def _sync(self) -> None:
        """Connect, make sure a snapshot exists, publish the outbox, restore the snapshot and apply
        the stream after it. From the first step on, new samples are only queued (not applied):
        the stream will bring them back."""
        r = self.redis
        await r.ping()
        self.up = True
        if self._replace.is_set():
            await self._publish_state()
            return
        if not await r.exists(SNAPSHOT):
            epoch = secrets.token_hex(8)
            doc = orjson.dumps(self.budget.snapshot())
            if await r.eval(_SEED_SNAPSHOT, 1, SNAPSHOT, epoch, doc):
                log.info("shared state %s was empty: seeded with this replica's calibration", self.url)
                self.outbox = deque(p for p in self.outbox if not p.applied)  # in the seed now
        await self._flush()
        try:
            covered, epoch = self._restore(await r.hgetall(SNAPSHOT))
        except ValueError as exc:  # corrupt, another version: this replica's state replaces it
            log.warning("shared snapshot unusable (%s): replaced by this replica's calibration", str(exc)[:200])
            await self._publish_state()
            return
        self.resyncs.inc()
        self.last_id, self.epoch = covered, epoch
        await self._catch_up(covered)
        self.in_sync = True
        self.up_gauge.set(1)
        self._synced.set()
        log.info("shared state %s followed: snapshot at %s, stream applied to %s (replica %s)",
                 self.url, covered, self.last_id, self.replica)

    async def _publish_state(self) -> None:
        """This replica's state as the fleet's (a new epoch), covering the stream as it is now:
        its own samples of an outage are in that state, so they leave the outbox."""
        self._replace.clear()
        self.outbox = deque(p for p in self.outbox if not p.applied)
        last = await self.redis.xrevrange(STREAM, count=1)
        covered, epoch = (last[0][0].decode() if last else "0-0"), secrets.token_hex(8)
        await self.redis.hset(SNAPSHOT, mapping={"id": covered, "epoch": epoch,
                                                 "doc": orjson.dumps(self.budget.snapshot())})
        log.info("shared state %s replaced by this replica's calibration (epoch %s)", self.url, epoch)
        self.last_id, self.epoch = covered, epoch
        await self._flush()
        await self._catch_up(covered)
        self.in_sync = True
        self.up_gauge.set(1)
        self._synced.set()

    def _restore(self, snap: dict) -> tuple[str, str]:
        """Apply the shared snapshot; (the stream id it covers, its epoch). ValueError when unusable."""
        covered = snap.get(b"id", b"").decode("ascii", "replace")
        epoch = snap.get(b"epoch", b"").decode("ascii", "replace")
        doc = snap.get(b"doc", b"")
        if len(doc) > MAX_SNAPSHOT_BYTES:
            raise ValueError(f"snapshot of {len(doc)} bytes is over {MAX_SNAPSHOT_BYTES}")
        _newer(covered, "0-0")  # a stream id, or ValueError
        if not epoch:
            raise ValueError("snapshot has no epoch")
        self.budget.restore_json(doc)  # (all or nothing)
        return covered, epoch

    async def _catch_up(self, after: str) -> None:
        info = await self.redis.xinfo_stream(STREAM) if await self.redis.exists(STREAM) else {}
        first = (info.get("first-entry") or (None,))[0] if isinstance(info, dict) else None
        if first and info.get("entries-added", 0) > info.get("length", 0) and _newer(first.decode(), after):
            # (the stream was trimmed, and its oldest entry is past the snapshot: entries in between
            # may be gone; snapshots come far more often than the stream's length is reached)
            log.warning("shared stream may have been cut past the snapshot (first entry %s, snapshot at %s): "
                        "samples in between are missed here", first.decode(), after)
        start = f"({after}"
        while True:
            entries = await self.redis.xrange(STREAM, min=start, count=BATCH)
            self._apply_entries(entries)
            if len(entries) < BATCH:
                return
            start = f"({self.last_id}"
            await asyncio.sleep(0)  # a long replay leaves the request path its turns

    def _apply_entries(self, entries) -> None:
        for entry_id, fields in entries:
            self.last_id = entry_id.decode()
            data = fields.get(b"s")
            if not isinstance(data, bytes) or len(data) > MAX_ENTRY_BYTES:
                self._counts["rejected"].inc()
                continue
            self._apply_entry(data)

    def _apply_entry(self, data: bytes, own: bool | None = None) -> None:
        try:
            doc = orjson.loads(data)
            sample = sample_from_doc(doc, self.budget.families)
        except (ValueError, RecursionError):  # (orjson.JSONDecodeError is a ValueError)
            self._counts["rejected"].inc()
            return
        self._apply(sample, doc.get("r") == self.replica if own is None else own)
        if own is None:
            self._counts["applied"].inc()

    async def _follow(self) -> None:
        """Read, publish and snapshot until something fails (then ``_run`` resyncs)."""
        self._generation += 1
        gen = self._generation
        tasks = [asyncio.create_task(c) for c in (self._read_loop(gen), self._publish_loop(), self._snapshot_loop(),
                                                  self._watch_replace())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            self._generation += 1  # a reader that outlives this (below) applies nothing more
            for t in tasks:
                t.cancel()
            # (redis-py may not let a blocked XREAD be cancelled: wait for it a bounded time only)
            await asyncio.wait(tasks, timeout=TIMEOUT_S)

    async def _watch_replace(self) -> None:
        await self._replace.wait()
        raise _Replaced()

    async def _read_loop(self, gen: int) -> None:
        block_ms = int(TIMEOUT_S * 500)
        while gen == self._generation:
            streams = {STREAM: self.last_id}
            if self.prefix:
                streams[self.relay_key] = self._relay_last
            reply = await self.redis.xread(streams, count=BATCH, block=block_ms)
            if gen != self._generation:
                return  # this follow has ended (resync): what it read is read again from the new place
            for name, entries in _stream_entries(reply):
                if name in (self.relay_key, self.relay_key.encode()):
                    self._relayed_in(entries)
                else:
                    self._apply_entries(entries)
            if reply:
                await asyncio.sleep(COALESCE_S)  # let the next entries gather: one read for several

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(COALESCE_S)  # one round trip for the samples of the next few ms
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        if self.relays:
            pipe = self.redis.pipeline(transaction=False)
            batch = [self.relays.popleft() for _ in range(min(BATCH, len(self.relays)))]
            for key, data in batch:  # (lost if this fails: a read is worth less than a wait)
                pipe.xadd(key, {"f": data}, maxlen=RELAY_LEN, approximate=True)
                pipe.expire(key, RELAY_TTL_S)
            await pipe.execute()
            self._relayed["sent"].inc(len(batch))
        while self.outbox:
            batch = [self.outbox[i] for i in range(min(BATCH, len(self.outbox)))]
            pipe = self.redis.pipeline(transaction=False)
            for p in batch:
                pipe.xadd(STREAM, {"s": p.data}, maxlen=STREAM_LEN, approximate=True)
            await pipe.execute()
            last = batch[-1].seq
            while self.outbox and self.outbox[0].seq <= last:  # (the oldest may have been dropped meanwhile)
                self.outbox.popleft()
            self._counts["published"].inc(len(batch))

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_EVERY_S * (0.75 + 0.5 * random.random()))
            epoch = await self.redis.hget(SNAPSHOT, "epoch")
            if epoch is None or epoch.decode("ascii", "replace") != self.epoch:
                raise _Lost("the shared snapshot was replaced or lost (Redis restarted?)")
            if not self.in_sync or not await self.redis.set(LOCK, self.replica, nx=True,
                                                            px=int(SNAPSHOT_EVERY_S * 1000)):
                continue
            covered = self.last_id
            t0 = time.monotonic()
            doc = orjson.dumps(self.budget.snapshot())  # on the loop: the calibration lives there
            if await self.redis.eval(_WRITE_SNAPSHOT, 1, SNAPSHOT, covered, self.epoch, doc):
                self.snapshots.inc()
                log.debug("shared snapshot at %s written (%d bytes, %.1f ms)", covered, len(doc),
                          1e3 * (time.monotonic() - t0))


def _hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _stream_entries(reply) -> list:
    """XREAD's reply as [(stream, entries)] (RESP2 gives a list, RESP3 a mapping)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(name, entries) for name, entries in reply]
