"""``FeatureKalman``, the default estimator: tokens = θ · g, learned per model from true counts.

g holds the prompt's *group* token estimates: the cold-start prior's per-feature coefficients
(priors.json, fitted on real text per tokenizer family) summed within each group of features
(Latin words, digits, whitespace, punctuation, CJK, other scripts, JSON the template renders,
output schemas), the special-token strings typed in the text, and the chat template's overheads
(per turn, per request, per raw prompt, per tool). θ starts at the prior (1 for each content
group, the template's counts for the overheads) and is learned per model key by a random-walk
Kalman filter — recursive least squares with forgetting that cannot wind up in directions a key's
traffic never excites — in two blocks per sample: the template's overheads normalised by the
true count (a short prompt says most about them), then the content rates normalised by the count
plus ``small_tokens`` (relative error on long prompts; a short one says little about rates, so a
flood of short prompts the features misjudge cannot move them far). Because each group enters
separately, a stream of mixed requests separates their rates from single totals.

What one response may do is bounded (margins.py keeps the per-kind windows it reads):

* deviations are measured against the estimate plus ``small_tokens`` (a short prompt's few tokens
  of template overhead are not a large error) and compared with what the current scales get wrong
  on the kind's recent samples (client-balanced median and spread);
* the innovation is clipped to that centre ± ``huber`` robust spreads (a Huber M-estimate), so no
  sample pulls harder than a typical one;
* a sample further than ``reject`` spreads from it (or 0.5), is *unexplained* —
  evidence of content the features do not see, not of a new rate: it moves no scale (it still
  enters its kind's windows: when most of a kind's recent errors move together — a template
  that ignores tools, a new tokenizer behind an old name — they are learned again);
* no step is taken that would move a kind's recent samples (its own or another's, where enough
  clients stand behind them) further off than their spread allows: a sample that pulls the
  scales where the rest of the traffic disagrees is content the features do not see;
* when a kind's recent samples all disagree with the scales (a change: a new tokenizer behind an
  old name), the filter forgets faster to follow them;
* each scale moves at most a third of its prior spread per sample, and stays within a band around
  the prior (¼x–2.5x for content: real tokenizers differ from each other by less than 1.5x; one
  prior spread until enough clients stand behind the key's samples);
* a lower bound ("at least N tokens", a 0.32+ context-length 400) can only raise the estimate.

The routing margin is a high quantile of the kind's own out-of-sample errors (``KindErrors``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from .estimate import SNAPSHOT_VERSION, Estimate, Learned, check_snapshot, finite
from .features import FEATURE_NAMES, N_FEATURES
from .keys import KeyTable, TableKeys, bounded_keys
from .margins import BUCKETS, KindErrors, MarginSettings
from .priors import CONTENT_GROUPS, Family
from .request import Prompt

GROUPS = CONTENT_GROUPS + ("json", "schema", "special", "turns", "chat", "prompt", "tools")
_V1_GROUPS = CONTENT_GROUPS + ("json", "schema", "turns", "chat", "prompt", "tools")
_G = {name: i for i, name in enumerate(GROUPS)}
_N_GROUPS = len(GROUPS)
_N_CONTENT = len(CONTENT_GROUPS)
# The learned group scales multiply priors fitted on these features: a snapshot learned on other
# features (an older version) does not apply and is refused.
FEATURES_ID = f"{N_FEATURES}:{zlib.crc32(' '.join(FEATURE_NAMES).encode()):08x}"
# what a chat template adds per request, turn and tool, and special-token strings: learned from
# every sample relative to its count; the content rates, relative to the count plus small_tokens
_OVERHEAD = tuple(_G[k] for k in ("special", "turns", "chat", "prompt", "tools"))
_CONTENT = tuple(i for i in range(_N_GROUPS) if i not in _OVERHEAD)
_MAX_DEVIATION = 0.5  # a sample further than this (relative) from its kind's recent errors is never a rate


@dataclass(frozen=True, slots=True)
class KalmanSettings:
    process_noise: float = 1e-3      # per observation, as a fraction of the prior variance
    observation_noise: float = 0.1   # relative misfit of one request's total
    content_sd: float = 0.15         # prior spread of a content group's scale
    margin_quantile: float = 0.97    # of out-of-sample relative errors (held-out check: attacks.py --half)
    margin_window: int = 256         # samples near a limit kept per kind of content
    margin_min_tokens: int = 1024    # smaller requests teach the scales, not the margin (the router
                                     # sets a quarter of its smallest pool's context)
    margin_prior_weight: float = 10.0
    margin_floor: float = 0.005
    margin_step: float = 0.04        # most one sample moves a margin
    recent_window: int = 48          # samples per kind that say what its errors look like now
    huber: float = 2.5               # innovations clipped at this many robust spreads
    reject: float = 5.0              # beyond this many, a sample is unexplained: no rate moves
    step_sd: float = 0.34            # most one sample moves a scale, in prior spreads
    change_noise: float = 0.1        # extra drift while a kind's recent samples all disagree with the scales
    small_tokens: float = 1024.0     # errors are judged relative to estimate + this: a short prompt's
                                     # few tokens of template overhead are not a large error
    client_share: float = 0.2        # most weight one client holds in a kind's windows
    calibrated_after: int = 20       # samples before a key's estimates count as "calibrated"
    max_keys: int = 64


def group_vector(prompt: Prompt, family: Family) -> list[float]:
    """The prompt's prior token estimate per group, plus its template overhead counts."""
    if prompt.text_features is not None:
        g = (prompt.text_features @ family.by_group).tolist() + [0.0] * (_N_GROUPS - _N_CONTENT)
    else:
        g = [0.0] * _N_GROUPS
    if prompt.json_features is not None:
        g[_G["json"]] = float(prompt.json_features @ family.coef)
    if prompt.schema_features is not None:
        g[_G["schema"]] = float(prompt.schema_features @ family.coef)
    g[_G["special"]] = prompt.special
    g[_G["turns"]] = prompt.messages
    g[_G["chat"]] = prompt.chat
    g[_G["prompt"]] = 1 - prompt.chat
    g[_G["tools"]] = prompt.tools
    return g


def error_bucket(g: list[float]) -> str:
    """Which kind of content dominates a request's estimate: errors are tracked per kind, so a
    kind that estimates badly (rare scripts) widens its own margin and not everyone's. A
    conversation of three or more messages mixes texts whose errors partly cancel: its own bucket."""
    content = [abs(v) for v in g[: _N_CONTENT + 2]]
    total = sum(content) or 1.0
    # requests whose template renders JSON (tool definitions, schemas, call arguments) are a kind of
    # their own even when text dominates: templates differ most in how they render it
    if g[_G["tools"]] or g[_G["schema"]] or (content[_G["json"]] + content[_G["schema"]]) > 0.2 * total:
        kind = "json"
    elif content[_G["cjk"]] > 0.2 * total:
        kind = "cjk"
    elif content[_G["script"]] > 0.03 * total:
        kind = "script"
    elif content[_G["punct"]] > 0.2 * total:
        kind = "code"
    elif content[_G["digits"]] > 0.2 * total:
        kind = "digits"
    else:
        kind = "prose"
    return kind + "/turns" if g[_G["turns"]] >= 3 else kind


def _window_entry(key: str, error: float, client: str | None, entry: list) -> tuple:
    """A window entry of a snapshot: tail (error, client, explained); recent (deviation, client)
    or, saved since, (deviation, client, group vector, count)."""
    if len(entry) == 3:
        return error, client, bool(entry[2])
    if len(entry) == 2:
        return error, client, None, 0.0
    if not isinstance(entry[2], list) or len(entry[2]) != _N_GROUPS:
        raise ValueError(f"snapshot key {key!r} has a malformed window entry")
    (y,) = finite(entry[3:], "counts")
    return error, client, tuple(finite(entry[2], "group vectors")), y


class _KeyState:
    __slots__ = ("theta", "P", "errors", "n", "unexplained")

    def __init__(self, theta: list[float], P: list[list[float]], errors: KindErrors, n: int = 0,
                 unexplained: int = 0) -> None:
        self.theta = theta
        self.P = P
        self.errors = errors
        self.n = n                   # samples learned from (explained or not)
        self.unexplained = unexplained


class FeatureKalman(TableKeys):
    """The default estimator: per-group scales over prior feature coefficients (see module doc)."""

    name = "feature-kalman"
    learns = True

    def __init__(self, settings: KalmanSettings | None = None) -> None:
        self.s = s = settings or KalmanSettings()
        self.table: KeyTable[_KeyState] = KeyTable(s.max_keys)
        self._margins = MarginSettings(quantile=s.margin_quantile, tail_window=s.margin_window,
                                       recent_window=s.recent_window, prior_weight=s.margin_prior_weight,
                                       step=s.margin_step, client_share=s.client_share)

    # -- priors --------------------------------------------------------------------------------
    def _prior(self, family: Family) -> tuple[list[float], list[float]]:
        theta = [1.0] * _N_CONTENT + [family.json_scale, 0.0, 1.0, family.turn, family.chat, family.prompt,
                                      family.per_tool]
        # (how a template renders tool JSON differs most between models: some ignore tools entirely)
        # (and what a template adds once: Llama-3.1's dated system block is +25 tokens over Llama-3)
        sd = [self.s.content_sd] * _N_CONTENT + [0.5, 0.5, 0.3, 3.0, 20.0, 2.0, 20.0]
        return theta, [v * v for v in sd]

    def _bounds(self, family: Family) -> list[tuple[float, float]]:
        theta, var = self._prior(family)
        out = []
        for i, (t, v) in enumerate(zip(theta, var)):
            if i < _N_CONTENT:
                out.append((0.25 * t, 2.5 * t))
            elif GROUPS[i] in ("json", "schema"):  # a template may ignore tools, or render them verbosely
                out.append((0.0, max(3.0, 2.5 * t)))
            elif GROUPS[i] == "special":  # one token each, or split into pieces by a tokenizer we have no list for
                out.append((0.0, 8.0))
            else:
                out.append((0.0, t + 10.0 * math.sqrt(v)))
        return out

    def _new_state(self, family: Family) -> _KeyState:
        theta, var = self._prior(family)
        P = [[var[i] if i == j else 0.0 for j in range(_N_GROUPS)] for i in range(_N_GROUPS)]
        return _KeyState(theta, P, KindErrors(family.margin, self._margins))

    # -- the request path ------------------------------------------------------------------------
    def estimate(self, key: str, family: Family, prompt: Prompt, media_tokens: int) -> Estimate:
        extra = prompt.media * media_tokens
        if prompt.exact_tokens is not None:
            return Estimate(prompt.exact_tokens + extra, prompt.exact_tokens + extra, "exact")
        st = self.table.get(key)
        g = group_vector(prompt, family)
        if st is None:
            theta, _ = self._prior(family)
            margin, source, kind = family.margin, "prior", ""
        else:
            theta = st.theta
            kind = error_bucket(g)
            margin = max(self.s.margin_floor, st.errors.margin(kind))
            source = "calibrated" if st.n >= self.s.calibrated_after else "prior"
        point = max(0.0, sum(t * x for t, x in zip(theta, g)))
        return Estimate(point + extra, math.ceil(point * (1.0 + margin)) + extra, source, margin, kind)

    # -- learning ------------------------------------------------------------------------------
    def observe(self, key: str, family: Family, prompts: list[Prompt], prompt_tokens: int, media_tokens: int,
                client: str | None = None, lower_bound: bool = False) -> Learned | None:
        """Learn from one true count; returns the out-of-sample relative error and whether the
        features explained it, or None when the count teaches nothing."""
        y = float(prompt_tokens)
        g = [0.0] * _N_GROUPS
        sampled = False
        for p in prompts:
            y -= p.media * media_tokens
            if p.exact_tokens is not None:
                y -= p.exact_tokens
                continue
            sampled |= p.measured_on_sample
            for i, v in enumerate(group_vector(p, family)):
                g[i] += v
        if y < 1.0 or not any(g):
            return None
        slot = self.table.slot(key)
        st = self.table.states.get(slot)
        if st is None:
            st = self.table.states[slot] = self._new_state(family)
        est = sum(t * x for t, x in zip(st.theta, g))
        rel = (y / est - 1.0) if est > 0 else 1.0
        if lower_bound and rel <= 0:
            return None  # "at least N" below the estimate says nothing
        kind = error_bucket(g)
        # the deviation relative to the estimate plus about a thousand tokens: on a long prompt its
        # relative error, on a short one its error in tokens (a template's overhead, not a rate)
        size = max(est, 0.0) + self.s.small_tokens
        dev = (y - est) / size
        center, scale, trusted = st.errors.center_scale(kind, st.theta, self.s.small_tokens)
        # (until enough clients stand behind a kind's samples, only what the priors expect is learned)
        reject = self.s.reject if trusted else self.s.huber
        explained = est > 0 and abs(dev - center) <= min(reject * scale, _MAX_DEVIATION)
        if explained:
            lo, hi = center - self.s.huber * scale, center + self.s.huber * scale
            if lower_bound:
                lo = max(lo, 0.0)
            y_used = est + min(hi, max(lo, dev)) * size  # the count the clipped innovation stands for
            if y_used >= 1.0:
                # a kind whose recent samples the current scales all get wrong the same way has
                # changed (a new tokenizer, a real shift in traffic): forget faster to follow it
                changed = trusted and abs(center) > self.s.huber * scale
                noise = self.s.change_noise if changed else 0.0
                diverse = st.errors.diverse()
                # what the template adds (and special tokens) first, relative to the count: a short
                # prompt says most about it; then the content rates, relative to the count plus a
                # thousand tokens: a short prompt says little about rates, so many short prompts
                # the features misjudge cannot move them far
                theta, P = self._kalman_step(st.theta, st.P, family, g, y_used, y_used, _OVERHEAD, diverse, noise)
                theta, P = self._kalman_step(theta, P, family, g, y_used, y_used + self.s.small_tokens, _CONTENT,
                                             diverse, noise)
                # no step that would push some kind's recent samples further off than their spread:
                # where the rest of the traffic disagrees, this is content the features do not see
                # (a step under a quarter of the largest allowed cannot push any kind far: not checked)
                _, var0 = self._prior(family)
                big = any(abs(a - b) > 0.25 * self.s.step_sd * math.sqrt(v) for a, b, v in zip(theta, st.theta, var0))
                if big and st.errors.disagrees(st.theta, theta, self.s.small_tokens, self.s.huber):
                    explained = False
                else:
                    st.theta, st.P = theta, P
        if not explained:
            st.unexplained += 1
        near_limit = y >= self.s.margin_min_tokens and not sampled
        # (errors of approximate measurements on a sample of the text say nothing about requests near a limit)
        st.errors.add(kind, dev, rel, client, explained, near_limit, family.margin, tuple(g), y)
        st.n += 1
        return Learned(rel, explained, kind)

    def _kalman_step(self, theta: list[float], P: list[list[float]], family: Family, g: list[float], y: float,
                     norm: float, block: tuple[int, ...], diverse: bool,
                     change_noise: float = 0.0) -> tuple[list[float], list[list[float]]]:
        """One filter step towards θ·g = y, normalised by ``norm``, moving only the groups in
        ``block`` (new scales and covariance; nothing changed in place). ``diverse``: enough clients
        stand behind the key's recent samples for its scales to leave the band of one prior spread
        around the priors; ``change_noise``: extra drift (a fraction of the prior variance) in the
        directions this sample excites."""
        P = [row[:] for row in P]
        new = theta[:]
        theta0, var0 = self._prior(family)
        q = self.s.process_noise
        x = [v / norm for v in g]
        live = [i for i in block if x[i]]
        for i in block:  # random-walk drift: the forgetting
            P[i][i] += (q + (change_noise if x[i] else 0.0)) * var0[i]
        Px = {i: sum(P[i][j] * x[j] for j in live) for i in block}
        S = sum(x[i] * Px[i] for i in live) + self.s.observation_noise ** 2
        err = y / norm - sum(t * v for t, v in zip(new, x))
        bounds = self._bounds(family)
        for i in block:
            k = Px[i] / S
            sd = math.sqrt(var0[i])
            step = self.s.step_sd * sd  # no sample moves a scale far
            lo, hi = bounds[i]
            if not diverse:  # one client (or a few) cannot take the scales far from the priors
                lo, hi = max(lo, theta0[i] - sd), min(hi, theta0[i] + sd)
            new[i] = min(hi, max(lo, new[i] + max(-step, min(step, k * err))))
            row = P[i]
            for j in block:
                row[j] -= k * Px[j]
        for i in block:  # no wind-up: a direction never excited stays at its prior spread
            if P[i][i] > var0[i]:
                f = math.sqrt(var0[i] / P[i][i])
                for j in block:
                    P[i][j] *= f
                    P[j][i] *= f
        return new, P

    # -- keys ----------------------------------------------------------------------------------
    def samples(self, key: str) -> int:
        st = self.table.get(key)
        return st.n if st else 0

    def describe(self, key: str) -> dict | None:
        st = self.table.get(key)
        if st is None:
            return None
        return {"samples": st.n, "unexplained": st.unexplained,
                "margins": {b: round(m, 4) for b, m in st.errors.margins.items()},
                "scales": {g: round(t, 4) for g, t in zip(GROUPS, st.theta)}}

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        keys = {}
        for key, st in self.table.states.items():
            clients: dict[str, int] = {}

            def ref(c: str | None) -> int:
                return -1 if c is None else clients.setdefault(c, len(clients))

            e = st.errors
            keys[key] = {"theta": st.theta, "P": st.P, "n": st.n, "unexplained": st.unexplained,
                         "margins": e.margins, "margin_n": e.n,
                         # (with each sample's group vector and count: a restored state then learns
                         # exactly as the one saved would, which replicas sharing a calibration need)
                         "recent": {b: [[v, ref(c)] if g is None else [v, ref(c), list(g), y]
                                        for v, c, g, y in w] for b, w in e.recent.items() if w},
                         "tail": {b: [[v, ref(c), int(ok)] for v, c, ok in w] for b, w in e.tail.items() if w},
                         "clients": list(clients)}
        return {"version": SNAPSHOT_VERSION, "estimator": self.name, "groups": list(GROUPS),
                "features": FEATURES_ID, "keys": keys}

    def restore(self, doc: dict) -> None:
        version = check_snapshot(doc, self.name)
        groups = list(GROUPS if version >= 2 else _V1_GROUPS)
        if doc.get("groups") != groups:
            raise ValueError("snapshot groups differ from this version's")
        if doc.get("features") != FEATURES_ID:
            raise ValueError("snapshot was learned on other content features (another version): not restored")
        states = {}
        for key, v in bounded_keys(doc["keys"], self.s.max_keys):
            states[str(key)] = self._restore_key(key, v, version)
        self.table.states = states

    def _restore_key(self, key: str, v: object, version: int) -> _KeyState:
        if not isinstance(v, dict) or not isinstance(v.get("margins"), dict):
            raise ValueError(f"snapshot key {key!r} is malformed")
        theta = finite(v["theta"], "theta")
        P = [finite(row, "covariance") for row in v["P"]]
        n_stored = _N_GROUPS if version >= 2 else len(_V1_GROUPS)
        if len(theta) != n_stored or len(P) != n_stored or any(len(r) != n_stored for r in P):
            raise ValueError(f"snapshot key {key!r} has the wrong dimensions")
        if version < 2:  # no special-token group yet: it starts at its prior (one token each)
            at = _G["special"]
            theta.insert(at, 1.0)
            P = [row[:at] + [0.0] + row[at:] for row in P]
            P.insert(at, [0.0] * at + [0.3 ** 2] + [0.0] * (_N_GROUPS - at - 1))
        errors = KindErrors(0.0, self._margins)
        stored = v["margins"]
        for b in BUCKETS:  # a bucket an older version did not have starts at the widest margin
            (margin,) = finite([stored[b] if b in stored else max(stored.values(), default=0.0)], "margin")
            if not 0.0 <= margin <= 10.0:
                raise ValueError(f"snapshot margin {margin} out of range")
            errors.margins[b] = margin
        if version < 2:
            if not isinstance(v.get("errors"), dict):
                raise ValueError(f"snapshot key {key!r} is malformed")
            for b, w in v["errors"].items():
                if b in errors.tail:
                    errors.tail[b].extend((e, None, True) for e in finite(w, "errors")[-self.s.margin_window:])
        else:
            clients = v.get("clients")
            if not isinstance(clients, list) or not all(isinstance(c, str) for c in clients):
                raise ValueError(f"snapshot key {key!r} is malformed")
            for name, widths in (("recent", (2, 4)), ("tail", (3,))):
                windows = v.get(name)
                if not isinstance(windows, dict):
                    raise ValueError(f"snapshot key {key!r} is malformed")
                for b, entries in windows.items():
                    if b not in BUCKETS:
                        continue
                    target = getattr(errors, name)[b]
                    if not isinstance(entries, list):
                        raise ValueError(f"snapshot key {key!r} has a malformed window")
                    for entry in entries[-target.maxlen:]:
                        if not isinstance(entry, list) or len(entry) not in widths:
                            raise ValueError(f"snapshot key {key!r} has a malformed window entry")
                        (e,) = finite(entry[:1], "errors")
                        c = entry[1]
                        if type(c) is not int or not -1 <= c < len(clients):
                            raise ValueError(f"snapshot key {key!r} names an unknown client")
                        who = clients[c] if c >= 0 else None
                        target.append(_window_entry(key, e, who, entry))
        errors.n = int(v.get("margin_n", 0))
        return _KeyState(theta, P, errors, int(v["n"]), int(v.get("unexplained", 0)))

