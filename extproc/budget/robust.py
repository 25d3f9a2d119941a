"""Statistics that no single response and no single client can steer far.

* ``balanced_weights`` — per-sample weights under which no client holds more than a given share
  of a window's weight (every client capped at one level; a lone client, or too few to balance,
  keeps full weight); samples of no known client (``None``) count as clients of their own.
* ``weighted_quantile`` — a high quantile that at least one full sample's weight always lies
  above, so one outlier alone never sets it.
* ``ClientRing`` — the clients of a fixed number of recent samples, with counts.
* ``ClientWindow`` — a window of recent samples in which no client holds more than its share of
  the places: past it, a client's new sample replaces its own oldest, so a burst from one client
  cannot flush what everyone else's samples showed.

Pure functions over small windows (a few hundred entries): they run on the learning path only,
never on the request path.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Hashable, Iterable, Sequence


def balanced_weights(clients: Sequence[Hashable | None], share: float) -> list[float]:
    """Per-sample weights (1 or less) under which no client holds more than ``share`` of the total.

    Every client's weight is capped at one level L (a client with fewer samples than L keeps them
    all), the highest level at which the largest holds at most ``share``. Where no level can do
    that — fewer than 1/share clients — nothing is capped: with two clients, capping the larger
    would hand the smaller one (perhaps the attacker) the majority."""
    counts = Counter(c for c in clients if c is not None)
    if not counts or share >= 1.0:
        return [1.0] * len(clients)
    sizes = sorted(list(counts.values()) + [1] * (len(clients) - sum(counts.values())))
    k = len(sizes)
    if k * share < 1.0 or sizes[-1] <= share * len(clients):
        return [1.0] * len(clients)
    # f(L) = L - share * sum(min(n, L)) is convex with f(0) = 0: find its positive root, one
    # segment [n_j, n_j+1] at a time (sizes below L are whole, k - j clients sit at L)
    level, below = float(sizes[-1]), 0.0
    for j in range(k):
        lo = sizes[j - 1] if j else 0
        denom = 1.0 - share * (k - j)
        if denom > 0:
            root = share * below / denom
            if root <= sizes[j]:
                level = max(float(lo), root)
                break
        below += sizes[j]
    return [min(1.0, level / counts[c]) if c is not None else 1.0 for c in clients]


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float,
                      at_least_one: bool = True) -> float:
    """The smallest value with at most (1 − q) of the weight above it — and, with
    ``at_least_one``, at least one full sample's weight (1.0) allowed above it."""
    if not values:
        return 0.0
    total = sum(weights)
    allowed = (1.0 - q) * total
    if at_least_one:
        allowed = max(allowed, 1.0)
    above = 0.0
    for v, w in sorted(zip(values, weights), reverse=True):
        above += w
        if above > allowed + 1e-12:
            return v
    return min(values)


def weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    if not values:
        return 0.0
    half = sum(weights) / 2.0
    acc = 0.0
    for v, w in sorted(zip(values, weights)):
        acc += w
        if acc >= half:
            return v
    return max(values)


def robust_center_scale(values: Sequence[float], weights: Sequence[float]) -> tuple[float, float]:
    """Weighted median and the weighted median absolute deviation around it (×1.4826: the
    standard deviation for normal errors)."""
    center = weighted_median(values, weights)
    return center, 1.4826 * weighted_median([abs(v - center) for v in values], weights)


class ClientRing:
    """The clients of the last ``size`` samples (``None`` for a sample of no known client)."""

    __slots__ = ("size", "ring", "counts")

    def __init__(self, size: int, clients: Iterable[str | None] = ()) -> None:
        self.size = size
        self.ring: deque[str | None] = deque(maxlen=size)
        self.counts: Counter[str] = Counter()
        for c in clients:
            self.add(c)

    def __len__(self) -> int:
        return len(self.ring)

    def count(self, client: str | None) -> int:
        return self.counts.get(client, 0) if client is not None else 0

    def add(self, client: str | None) -> None:
        if len(self.ring) == self.size:
            old = self.ring[0]
            if old is not None:
                self.counts[old] -= 1
                if not self.counts[old]:
                    del self.counts[old]
        self.ring.append(client)
        if client is not None:
            self.counts[client] += 1


class ClientWindow:
    """The last ``maxlen`` entries (tuples whose second item is the client, None for unknown).
    Once the window is full, a client holding ``cap`` entries replaces its own oldest, so no
    client holds more than ``cap`` places that others' samples had (alone, it is a plain window)."""

    __slots__ = ("maxlen", "cap", "items", "counts")

    def __init__(self, maxlen: int, share: float) -> None:
        self.maxlen = maxlen
        self.cap = max(2, int(share * maxlen)) if share < 1.0 else maxlen
        self.items: deque[tuple] = deque()
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def distinct(self) -> int:
        """Clients with an entry here, each entry of no known client counting as one."""
        return len(self.counts) + sum(1 for e in self.items if e[1] is None)

    def append(self, entry: tuple) -> None:
        client = entry[1]
        if len(self.items) < self.maxlen:
            pass  # room for everyone
        elif client is not None and self.counts[client] >= self.cap:
            for i, old in enumerate(self.items):  # its own oldest entry makes room
                if old[1] == client:
                    del self.items[i]
                    break
            self.counts[client] -= 1
        else:
            old = self.items.popleft()
            if old[1] is not None:
                self.counts[old[1]] -= 1
                if not self.counts[old[1]]:
                    del self.counts[old[1]]
        self.items.append(entry)
        if client is not None:
            self.counts[client] += 1

    def extend(self, entries) -> None:
        for e in entries:
            self.append(e)
