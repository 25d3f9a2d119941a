"""What the estimator's errors say, per kind of content: how far off a new sample may be before
it counts as unexplained, and the routing margin.

Each kind of content (prose, code, digits, CJK, other scripts, JSON; and each again for
conversations of three or more turns, whose errors partly cancel) keeps two windows of its own
out-of-sample relative errors (true/estimate − 1, taken *before* the sample is learned), each
entry tagged with the client that sent it (no client holds more than its share of a window's
places: past it, its new sample replaces its own oldest):

* ``recent`` — the last few dozen samples of any size (their deviation: relative to the
  estimate plus about a thousand tokens, so a short prompt's template overhead is not a large
  error): their client-balanced median and median absolute deviation say what this kind's
  errors look like now. A sample far outside them is one
  the features cannot explain (content they do not see): it is not learned as a new rate. When
  most recent samples of a kind move together — a new model behind an old name, a real shift in
  traffic — the median moves with them and they are learned again, so genuine change is learned
  within about half a window.
* ``tail`` — the last few hundred samples large enough to sit near a pool's limit: the kind's
  margin is a high quantile of them, blended, while the kind has few samples, with the same
  quantile over every kind's *explained* samples (itself blended with the family's cold-start
  margin): an unexplained sample — an outlier — widens its own kind's margin only. In each
  quantile no client holds more than its share of the weight, each client's unexplained samples
  weigh one sample together, and at least one sample's weight always lies above the margin, so
  a single response never sets it. Margins then move towards their targets by at most a fixed
  step per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from .robust import ClientWindow, balanced_weights, robust_center_scale, weighted_median, weighted_quantile

KINDS = ("prose", "code", "digits", "cjk", "script", "json")
BUCKETS = KINDS + tuple(k + "/turns" for k in KINDS)


@dataclass(frozen=True, slots=True)
class MarginSettings:
    quantile: float = 0.97        # of out-of-sample relative errors
    tail_window: int = 256        # samples near a limit kept per kind
    recent_window: int = 48       # samples of any size kept per kind (what "normal" looks like now)
    prior_weight: float = 10.0    # samples' worth of the family's cold-start margin in the blend
    step: float = 0.04            # most a margin moves per sample
    client_share: float = 0.2     # most weight one client holds in a window
    min_recent: int = 8           # samples before a kind's own spread replaces the cold one
    cold_scale: float = 0.05      # the spread assumed before that
    scale_floor: float = 0.02     # no kind is assumed to estimate better than this


class KindErrors:
    """The windows and margins of one model key (see the module doc)."""

    __slots__ = ("s", "recent", "tail", "margins", "n")

    def __init__(self, prior: float, settings: MarginSettings) -> None:
        self.s = settings
        # entries: (relative error, client) and (relative error, client, explained); no client holds
        # more than its share of a window's places, so a burst cannot flush the others' samples
        self.recent: dict[str, ClientWindow] = {b: ClientWindow(settings.recent_window, settings.client_share)
                                                for b in BUCKETS}
        self.tail: dict[str, ClientWindow] = {b: ClientWindow(settings.tail_window, settings.client_share)
                                              for b in BUCKETS}
        self.margins: dict[str, float] = {b: prior for b in BUCKETS}
        self.n = 0  # samples that reached a tail window

    def margin(self, bucket: str) -> float:
        return self.margins[bucket]

    def center_scale(self, bucket: str, theta: list[float], small_tokens: float) -> tuple[float, float, bool]:
        """Where this kind's recent samples' deviations from the *current* scales sit and how far
        they spread (client-balanced), and whether enough clients stand behind them to outvote
        the priors (at least 1/client_share; else the priors' view: centred on them, cold spread)."""
        s = self.s
        window = self.recent[bucket]
        if window.distinct() * s.client_share < 1.0:
            return 0.0, s.cold_scale, False
        if len(window) < s.min_recent:
            return 0.0, s.cold_scale, True
        values = []
        for dev, _, g, y in window:
            if g is not None:  # what the scales as they are now get wrong on it
                est = sum(t * x for t, x in zip(theta, g))
                dev = (y - est) / (max(est, 0.0) + small_tokens)
            values.append(dev)
        center, scale = robust_center_scale(values, balanced_weights([c for _, c, _, _ in window], s.client_share))
        return center, max(s.scale_floor, scale), True

    def disagrees(self, theta: list[float], new_theta: list[float], small_tokens: float, tolerance: float) -> bool:
        """Would ``new_theta`` move some kind's recent samples (where enough clients stand behind
        them) further off than ``tolerance`` of their spread, and further than they are now?"""
        s = self.s
        for window in self.recent.values():
            if len(window) < s.min_recent or window.distinct() * s.client_share < 1.0:
                continue
            old, new, clients = [], [], []
            for dev, c, g, y in window:
                if g is None:
                    continue
                e0 = sum(t * x for t, x in zip(theta, g))
                e1 = sum(t * x for t, x in zip(new_theta, g))
                old.append((y - e0) / (max(e0, 0.0) + small_tokens))
                new.append((y - e1) / (max(e1, 0.0) + small_tokens))
                clients.append(c)
            if len(old) < s.min_recent:
                continue
            weights = balanced_weights(clients, s.client_share)
            c0, spread = robust_center_scale(old, weights)
            c1 = weighted_median(new, weights)
            if abs(c1) > tolerance * max(s.scale_floor, spread) and abs(c1) > abs(c0):
                return True
        return False

    def diverse(self) -> bool:
        """Do enough clients stand behind this key's recent samples to outvote its priors?"""
        clients: set = set()
        unknown = 0
        for w in self.recent.values():
            clients.update(w.counts)
            unknown += sum(1 for e in w if e[1] is None)
        return (len(clients) + unknown) * self.s.client_share >= 1.0

    def add(self, bucket: str, deviation: float, rel_error: float, client: str | None, explained: bool,
            near_limit: bool, prior: float, g: tuple[float, ...] | None = None, y: float = 0.0) -> None:
        """File one sample: its ``deviation`` (and its group vector and count, from which
        ``center_scale`` recomputes it) in the recent window, its relative error, if it is near
        a limit, in the tail."""
        s = self.s
        self.recent[bucket].append((deviation, client, g, y))
        if not near_limit:
            return
        self.tail[bucket].append((rel_error, client, explained))
        self.n += 1
        pooled = [entry for w in self.tail.values() for entry in w if entry[2]]
        pooled_target = _blend(prior, self._quantile(pooled), len(pooled), s.prior_weight)
        for b, tail in self.tail.items():
            target = _blend(pooled_target, self._quantile(tail), len(tail), s.prior_weight)
            old = self.margins[b]
            self.margins[b] = min(old + s.step, max(old - s.step, target))

    def _quantile(self, tail) -> float | None:
        if len(tail) < 5:
            return None
        weights = balanced_weights([c for _, c, _ in tail], self.s.client_share)
        unexplained: dict[str | None, int] = {}
        for _, c, ok in tail:
            if not ok and c is not None:
                unexplained[c] = unexplained.get(c, 0) + 1
        values = []
        for i, (e, c, ok) in enumerate(tail):
            values.append(e)
            if not ok and c is not None:
                weights[i] /= unexplained[c]  # a client's unexplained samples weigh one together
        return max(0.0, weighted_quantile(values, weights, self.s.quantile))


def _blend(prior: float, empirical: float | None, n: int, prior_weight: float) -> float:
    if empirical is None:
        return prior
    return (prior_weight * prior + n * empirical) / (prior_weight + n)
