"""The pools' own load, read from their vLLM ``/metrics`` pages: what spillover decides on.

Every replica reads every pool's engines itself (as llm-d's endpoint picker scrapes each vLLM
pod), so replicas agree without talking to each other and traffic that bypasses the router
counts too. Per pool and period: the endpoints (a fixed list, or a DNS name re-resolved each
time: a headless Service's A records are the pods), one bounded GET of each page, and from the
pages the waiting queue per engine and the mean KV-cache use (``PoolReadings``).

Nothing on the request path awaits a read: ``Router.choose`` looks at the last reading and at
how many requests this replica has sent the pool since that read began (counted as queued: an
upper bound, since some start at once). A reading older than ``stale_s`` is no reading, and no
reading means no spill (never a guess).

Pages are untrusted: at most ``max_page_bytes``, only three gauges looked at, at most
``MAX_ENGINES`` samples of each, values checked; a bad page is a failed read, never a crash.
The worst a lying page can do is turn spillover on or off within the fit rule: a request only
ever goes to a pool that holds it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import socket
import time
from dataclasses import dataclass

from ..config import PoolMetrics, SpilloverSettings

log = logging.getLogger("extproc.service")

MAX_ENGINES = 64            # samples of one gauge on one page (vLLM: one per data-parallel engine)
MAX_LINE = 4096
MAX_CONCURRENT_READS = 16   # pages being read at once: bounds memory at 16 x max_page_bytes
MAX_QUEUE = 1e6
OFFLOAD_PAGE_BYTES = 256 << 10
OUTCOMES = ("ok", "timeout", "error", "too_large", "bad_page", "no_endpoints")

WAITING = b"vllm:num_requests_waiting"
RUNNING = b"vllm:num_requests_running"
KV_CACHE = (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")  # the second: vLLM before 0.10

# After the metric name: optional labels (quoted values may hold braces, escaped quotes), the
# value, an optional timestamp. Alternatives start with distinct characters: no backtracking.
_SAMPLE = re.compile(rb'(?:\{(?:[^"}\n]|"(?:[^"\\\n]|\\.)*")*\})?[ \t]+([^ \t\r\n]+)(?:[ \t]+-?[0-9]+)?[ \t]*\r?')


class BadPage(ValueError):
    """A page that does not give the load: ``outcome`` is one of OUTCOMES."""

    def __init__(self, outcome: str, why: str) -> None:
        super().__init__(why)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Page:
    """What one engine's page says. ``engines``: its waiting-queue samples (a data-parallel
    vLLM has one per engine)."""
    engines: int
    waiting: float
    running: float
    kv: tuple[float, ...]


def _samples(data: bytes, name: bytes, lo: float, hi: float) -> list[float]:
    """The values of every sample of ``name`` (any labels) in a page that starts with a newline."""
    out: list[float] = []
    needle = b"\n" + name
    at = data.find(needle)
    while at >= 0:
        start = at + len(needle)
        end = data.find(b"\n", start, start + MAX_LINE)
        end = len(data) if end < 0 and len(data) - start < MAX_LINE else end
        if end < 0:
            raise BadPage("bad_page", f"a {name.decode()} line longer than {MAX_LINE} bytes")
        if data[start:start + 1] in (b"{", b" ", b"\t"):  # else another metric sharing the prefix
            m = _SAMPLE.fullmatch(data, start, end)
            try:
                value = float(m[1]) if m else math.nan
            except ValueError:
                value = math.nan
            if not lo <= value <= hi:  # NaN fails too
                raise BadPage("bad_page", f"{name.decode()} sample is not a value in [{lo:g}, {hi:g}]")
            out.append(value)
            if len(out) > MAX_ENGINES:
                raise BadPage("bad_page", f"more than {MAX_ENGINES} {name.decode()} samples")
        at = data.find(needle, end)
    return out


def parse_page(data: bytes) -> Page:
    """The load on one vLLM ``/metrics`` page (Prometheus text). BadPage if it has none."""
    data = b"\n" + data
    waiting = _samples(data, WAITING, 0.0, MAX_QUEUE)
    if not waiting:
        raise BadPage("bad_page", f"no {WAITING.decode()} gauge")
    running = _samples(data, RUNNING, 0.0, MAX_QUEUE)
    kv: list[float] = []
    for name in KV_CACHE:
        kv = kv or _samples(data, name, 0.0, 1.0)
    return Page(len(waiting), sum(waiting), sum(running), tuple(kv))


@dataclass(frozen=True, slots=True)
class Reading:
    """One pool, one read: the pages that answered."""
    at: float               # monotonic time the read began (its age counts from there)
    sent_mark: int          # requests this replica had sent the pool when the read began
    endpoints: int          # endpoints asked
    instances: int          # engines on the pages that answered
    waiting: float
    running: float
    kv_mean: float | None   # None: no page had a KV-cache gauge

    @classmethod
    def of(cls, pages: list[Page], at: float, sent_mark: int, endpoints: int) -> "Reading":
        kv = [v for p in pages for v in p.kv]
        return cls(at, sent_mark, endpoints, sum(p.engines for p in pages), sum(p.waiting for p in pages),
                   sum(p.running for p in pages), sum(kv) / len(kv) if kv else None)


@dataclass(frozen=True, slots=True)
class LoadView:
    """A pool's load as a decision sees it now (also what Explain shows)."""
    pool: str
    fresh: bool                 # a reading no older than stale_s
    pressured: bool             # fresh and over a threshold
    age_s: float | None         # None: never read
    instances: int
    queue_per_instance: float   # waiting plus this replica's sends since the read, per engine
    kv_cache: float | None
    queue_threshold: float
    kv_threshold: float

    @property
    def has_room(self) -> bool:
        return self.fresh and not self.pressured


class PoolReadings:
    """The last reading of each pool and this replica's sends since; runs on the event loop."""

    def __init__(self, settings: SpilloverSettings) -> None:
        self.s = settings
        self.sources = {m.pool: m for m in settings.pools}
        self.readings: dict[str, Reading | None] = {m.pool: None for m in settings.pools}
        self.sent_count = {m.pool: 0 for m in settings.pools}

    def sent(self, pool: str) -> None:
        if pool in self.sent_count:
            self.sent_count[pool] += 1

    def view(self, pool: str, now: float | None = None) -> LoadView | None:
        """None for a pool whose load is not read."""
        src = self.sources.get(pool)
        if src is None:
            return None
        r = self.readings[pool]
        if r is None or r.instances == 0:
            return LoadView(pool, False, False, None, 0, 0.0, None, src.queue_per_instance, src.kv_cache)
        age = (time.monotonic() if now is None else now) - r.at
        queue = (r.waiting + self.sent_count[pool] - r.sent_mark) / r.instances
        fresh = age <= self.s.stale_s
        pressured = fresh and (queue > src.queue_per_instance or (r.kv_mean is not None and r.kv_mean > src.kv_cache))
        return LoadView(pool, fresh, pressured, age, r.instances, queue, r.kv_mean, src.queue_per_instance,
                        src.kv_cache)


class PoolLoadReader:
    """Reads every pool each ``period_s`` into ``readings``, as an asyncio task (``start``/``stop``).
    ``count(pool, outcome)`` is told the outcome of every page read."""

    def __init__(self, readings: PoolReadings, count=lambda pool, outcome: None) -> None:
        self.readings = readings
        self.s = readings.s
        self.count = count
        self._task: asyncio.Task | None = None
        self._session = None
        self._gate = asyncio.Semaphore(MAX_CONCURRENT_READS)
        self._resolving: dict[str, asyncio.Task] = {}
        self._resolved: dict[str, list[str]] = {}
        self._failing: set[str] = set()   # pools whose last read failed: logged once per failure spell

    def start(self) -> None:
        import aiohttp  # here: only a router that reads pools pays for the import

        timeout = aiohttp.ClientTimeout(total=self.s.timeout_s)
        connector = aiohttp.TCPConnector(limit=MAX_CONCURRENT_READS, ttl_dns_cache=None, use_dns_cache=False)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                                              headers={"Accept": "text/plain", "Accept-Encoding": "identity"})
        self._task = asyncio.create_task(self._run(), name="pool-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in self._resolving.values():
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.read_once()
            except Exception:  # noqa: BLE001 - a bug here costs spillover (readings go stale), never the service
                log.exception("pool load read failed")
            await asyncio.sleep(max(0.0, self.s.period_s - (time.monotonic() - t0)))

    async def read_once(self) -> None:
        await asyncio.gather(*(self._read_pool(m) for m in self.s.pools))

    async def _read_pool(self, src: PoolMetrics) -> None:
        at, mark = time.monotonic(), self.readings.sent_count[src.pool]
        urls = await self._urls(src)
        if not urls:
            self.count(src.pool, "no_endpoints")
            self._failed(src.pool, "no endpoints (DNS gave no address)")
            return
        pages = await asyncio.gather(*(self._page(src.pool, u) for u in urls))
        good = [p for p in pages if p is not None]
        if not good:
            self._failed(src.pool, f"none of its {len(urls)} metrics pages read")
            return
        if src.pool in self._failing:
            self._failing.discard(src.pool)
            log.info("pool load of %s read again", src.pool)
        self.readings.readings[src.pool] = Reading.of(good, at, mark, len(urls))

    def _failed(self, pool: str, why: str) -> None:
        if pool not in self._failing:
            self._failing.add(pool)
            log.warning("pool load of %s not read: %s; no spillover from or to it once its last reading "
                        "is %.1fs old", pool, why, self.s.stale_s)

    async def _urls(self, src: PoolMetrics) -> list[str]:
        if src.dns is None:
            return [f"http://{e}/metrics" for e in src.endpoints]
        host, _, port = src.dns.rpartition(":")
        task = self._resolving.get(src.dns)
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: one that failed after a timed-out wait is not "never retrieved"
        if task is None or task.done():  # one resolution at a time per name: a hung resolver cannot pile up
            task = self._resolving[src.dns] = asyncio.create_task(self._resolve(host.strip("[]"), int(port)))
        try:
            self._resolved[src.dns] = await asyncio.wait_for(asyncio.shield(task), self.s.timeout_s)
        except (asyncio.TimeoutError, OSError):
            self._resolved.pop(src.dns, None)  # the pods are whatever DNS says now; it says nothing
        return [f"http://{a}:{port}/metrics" for a in self._resolved.get(src.dns, [])]

    @staticmethod
    async def _resolve(host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs = sorted({info[4][0] for info in infos})[:256]
        return [f"[{a}]" if ":" in a else a for a in addrs]

    async def _page(self, pool: str, url: str) -> Page | None:
        async with self._gate:
            try:
                body = await self._fetch(url)
                # ~0.15 ms for a real 66 KB page; a large one is parsed off the loop
                page = parse_page(body) if len(body) <= OFFLOAD_PAGE_BYTES else await asyncio.to_thread(parse_page, body)
            except BadPage as exc:
                self.count(pool, exc.outcome)
                log.debug("metrics page %s: %s", url, exc)
                return None
            except asyncio.TimeoutError:
                self.count(pool, "timeout")
                return None
            except Exception as exc:  # noqa: BLE001 - refused, reset, bad HTTP: a failed read
                self.count(pool, "error")
                log.debug("metrics page %s: %s", url, exc)
                return None
        self.count(pool, "ok")
        return page

    async def _fetch(self, url: str) -> bytes:
        limit = self.s.max_page_bytes
        async with asyncio.timeout(self.s.timeout_s):
            async with self._session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise BadPage("error", f"HTTP {resp.status}")
                if (resp.content_length or 0) > limit:
                    raise BadPage("too_large", f"Content-Length {resp.content_length} > {limit}")
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        raise BadPage("too_large", f"more than {limit} bytes")
                return bytes(body)
