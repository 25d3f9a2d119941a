"""What the estimator's errors say, per kind of content: how far off a new sample may be before
it counts as unexplained, and the routing margin.

Each kind of content (prose, code, digits, CJK, other scripts, JSON; and each again for
conversations of three or more turns, whose errors partly cancel) keeps two windows of its own
out-of-sample relative errors (true/estimate − 1, taken *before* the sample is learned), each
entry tagged with the client that sent it (no client holds more than its share of a window's
places: past it, its new sample replaces its own oldest):

* ``recent`` — the last few dozen samples of any size (their deviation: relative to the
  estimate plus a few hundred tokens, so a short prompt's template overhead is not a large
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

from .robust import ClientWindow, balanced_weights, robust_center_scale, weighted_quantile

KINDS = ("prose", "code", "digits", "cjk", "script", "json")
BUCKETS = KINDS + tuple(k + "/turns" for k in KINDS)


@dataclass(frozen=True, slots=True)
class MarginSettings:
    quantile: float = 0.96        # of out-of-sample relative errors
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

    def center_scale(self, bucket: str) -> tuple[float, float]:
        """Where this kind's recent deviations sit and how far they spread (client-balanced)."""
        s = self.s
        window = self.recent[bucket]
        if len(window) < s.min_recent:
            return 0.0, s.cold_scale
        values = [e for e, _ in window]
        center, scale = robust_center_scale(values, balanced_weights([c for _, c in window], s.client_share))
        return center, max(s.scale_floor, scale)

    def add(self, bucket: str, deviation: float, rel_error: float, client: str | None, explained: bool,
            near_limit: bool, prior: float) -> None:
        """File one sample: its ``deviation`` (what ``center_scale`` describes) in the recent window,
        its relative error, if it is near a limit, in the tail."""
        s = self.s
        self.recent[bucket].append((deviation, client))
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
