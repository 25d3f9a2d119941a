"""Bounded influence per client: no client's samples make up more than ``client_share`` of a model
key's recent learning (its last ``window`` learned samples).

The router names who sent each sample by an opaque hash (the service hashes a configured
identity header, else the client address Envoy reports); samples of no known client (``None``:
offline replays, a deployment that forwards no identity) are not bounded. A sample over its
client's share is refused before the estimator sees it. Counts of what was refused, and of what
the estimator could not explain, are kept per client hash in a small table per key (the clients
with the most recent samples, and the most refused, are the ones kept).

Everything is bounded: one ring of ``window`` hashes per key, ``MAX_CLIENTS`` counters per key,
and keys only where the estimator holds state (its own bounded table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .estimate import Learned, finite
from .robust import ClientRing

MAX_CLIENTS = 32  # per-client counters kept per key (beyond them: only the totals)


@dataclass(frozen=True, slots=True)
class GuardSettings:
    client_share: float = 0.2   # most of a key's recent learning one client may make up (1.0: no bound)
    window: int = 256           # recent learning: this many samples per key


@dataclass(slots=True)
class ClientCounts:
    refused: int = 0        # samples over the client's share, not learned
    unexplained: int = 0    # learned samples the features could not explain (no rate moved)


class _KeyGuard:
    __slots__ = ("ring", "clients", "refused", "unexplained")

    def __init__(self, window: int) -> None:
        self.ring = ClientRing(window)
        self.clients: dict[str, ClientCounts] = {}
        self.refused = 0
        self.unexplained = 0

    def counts(self, client: str) -> ClientCounts:
        c = self.clients.get(client)
        if c is None:
            if len(self.clients) >= MAX_CLIENTS:
                # evict the client with the least to show: fewest recent samples, then fewest refused
                gone = min(self.clients, key=lambda k: (self.ring.count(k), self.clients[k].refused))
                del self.clients[gone]
            c = self.clients[client] = ClientCounts()
        return c


class LearningGuard:
    def __init__(self, settings: GuardSettings | None = None) -> None:
        self.s = settings or GuardSettings()
        self.cap = max(1, math.floor(self.s.client_share * self.s.window))
        self.keys: dict[str, _KeyGuard] = {}

    def admits(self, key: str, client: str | None) -> bool:
        """May a sample of this client teach this key now?"""
        if client is None or self.s.client_share >= 1.0:
            return True
        kg = self.keys.get(key)
        return kg is None or kg.ring.count(client) < self.cap

    def refused(self, key: str, client: str | None) -> None:
        kg = self.keys.get(key)
        if kg is None:
            return  # (only a key that has learned can refuse: it exists)
        kg.refused += 1
        if client is not None:
            kg.counts(client).refused += 1

    def learned(self, key: str, client: str | None, outcome: Learned) -> None:
        kg = self.keys.get(key)
        if kg is None:
            kg = self.keys[key] = _KeyGuard(self.s.window)
        kg.ring.add(client)
        if not outcome.explained:
            kg.unexplained += 1
            if client is not None:
                kg.counts(client).unexplained += 1

    def keep_only(self, keys: set[str]) -> None:
        """Drop the state of keys the estimator no longer holds (after a reset or a restore)."""
        for key in [k for k in self.keys if k not in keys]:
            del self.keys[key]

    def describe(self, key: str) -> dict | None:
        kg = self.keys.get(key)
        if kg is None:
            return None
        recent = len(kg.ring)
        clients = sorted(set(kg.ring.counts) | set(kg.clients),
                         key=lambda c: (-kg.ring.count(c), -kg.clients.get(c, ClientCounts()).refused, c))
        rows = []
        for c in clients[:MAX_CLIENTS]:
            counts = kg.clients.get(c, ClientCounts())
            rows.append({"client": c, "recent": kg.ring.count(c),
                         "share": round(kg.ring.count(c) / recent, 4) if recent else 0.0,
                         "refused": counts.refused, "unexplained": counts.unexplained})
        return {"window": self.s.window, "client_share": self.s.client_share, "recent": recent,
                "unidentified": recent - sum(kg.ring.counts.values()), "refused": kg.refused,
                "unexplained": kg.unexplained, "clients": rows}

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        keys = {}
        for key, kg in self.keys.items():
            names: dict[str, int] = {}
            ring = [-1 if c is None else names.setdefault(c, len(names)) for c in kg.ring.ring]
            for c in kg.clients:
                names.setdefault(c, len(names))
            keys[key] = {"clients": list(names), "ring": ring, "refused": kg.refused,
                         "unexplained": kg.unexplained,
                         "counts": {str(names[c]): [v.refused, v.unexplained] for c, v in kg.clients.items()}}
        return {"window": self.s.window, "client_share": self.s.client_share, "keys": keys}

    def parse(self, doc: object) -> dict[str, _KeyGuard]:
        """The key states a snapshot's ``guard`` section holds, validated (ValueError), without
        applying them. Rings longer than this guard's window keep their newest samples."""
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
            raise ValueError("snapshot guard section is malformed")
        out = {}
        for key, v in doc["keys"].items():
            if not isinstance(v, dict) or not isinstance(v.get("clients"), list) or \
                    not all(isinstance(c, str) for c in v["clients"]) or not isinstance(v.get("ring"), list):
                raise ValueError(f"snapshot guard of key {key!r} is malformed")
            names = v["clients"]
            kg = _KeyGuard(self.s.window)
            for i in v["ring"][-self.s.window:]:
                if type(i) is not int or not -1 <= i < len(names):
                    raise ValueError(f"snapshot guard of key {key!r} names an unknown client")
                kg.ring.add(names[i] if i >= 0 else None)
            counts = v.get("counts", {})
            if not isinstance(counts, dict):
                raise ValueError(f"snapshot guard of key {key!r} is malformed")
            for i, pair in list(counts.items())[:MAX_CLIENTS]:
                if not str(i).isdigit() or int(i) >= len(names) or not isinstance(pair, list) or len(pair) != 2:
                    raise ValueError(f"snapshot guard of key {key!r} is malformed")
                refused, unexplained = (int(x) for x in finite(pair, "guard counts"))
                kg.clients[names[int(i)]] = ClientCounts(refused, unexplained)
            kg.refused, kg.unexplained = (int(x) for x in finite([v.get("refused", 0), v.get("unexplained", 0)],
                                                                   "guard counts"))
            out[str(key)] = kg
        return out
