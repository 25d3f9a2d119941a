"""Prompt-token estimators learned online from ``usage.prompt_tokens``.

``FeatureKalman`` (the default) — tokens = θ · g, where g holds the prompt's *group* token
estimates: the cold-start prior's per-feature coefficients (priors.json, fitted on real text
per tokenizer family) summed within each group of features (Latin words, digits, whitespace,
punctuation, CJK, other scripts, JSON the template renders, output schemas) plus the chat
template's overheads (per turn, per request, per raw prompt). θ starts at the prior (1 for
each content group, the template's counts for the overheads) and is learned per model key by a
random-walk Kalman filter — recursive least squares with forgetting that cannot wind up in
directions a key's traffic never excites. Each observation is normalised by its true count, so
the filter minimises relative error. One response gives one total for a request that mixes
kinds of text; because each group enters separately, a stream of mixed requests separates
their rates.

The routing margin comes from the observed errors (``ErrorModel``): each request's error
*before* its own count was learned, per key and per kind of content, so that a kind that
estimates badly (rare scripts) widens the margin of requests made of it and not of the others.
Requests below a quarter of the smallest pool tell little about errors near its limit and are left out.

``PaperEMA`` — the paper's estimator, kept as a selectable baseline: per (model, category)
bytes-per-token EMA ĉ ← βĉ + (1−β)·obs, σ̂ an EMA of |obs − ĉ|, routing on c* = ĉ − γσ̂.
``FixedRatio`` — one bytes-per-token constant (4.0 in the paper's baseline).

All state is bounded: at most ``max_keys`` model keys (new names beyond that share one overflow
key), and a fixed-size error window per key. State saves to and restores from a
JSON-able snapshot.
"""

from __future__ import annotations

import bisect
import json
import math
import zlib
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Protocol

import numpy as np

from .features import FEATURE_GROUP, FEATURE_NAMES, N_FEATURES
from .request import Prompt

CONTENT_GROUPS = ("latin", "digits", "space", "punct", "cjk", "script", "lex")
GROUPS = CONTENT_GROUPS + ("json", "schema", "turns", "chat", "prompt", "tools")
_G = {name: i for i, name in enumerate(GROUPS)}
_N_GROUPS = len(GROUPS)
# feature -> content group one-hot (features x content groups)
_ONE_HOT = np.zeros((N_FEATURES, len(CONTENT_GROUPS)))
for _i, _g in enumerate(FEATURE_GROUP):
    _ONE_HOT[_i, CONTENT_GROUPS.index(_g)] = 1.0
SNAPSHOT_VERSION = 1
# The learned group scales multiply priors fitted on these features: a snapshot learned on other
# features (an older version) does not apply and is refused.
FEATURES_ID = f"{N_FEATURES}:{zlib.crc32(' '.join(FEATURE_NAMES).encode()):08x}"
OVERFLOW_KEY = "__other__"


@dataclass(frozen=True, slots=True)
class Family:
    """Cold-start knowledge of one tokenizer family."""

    name: str
    coef: np.ndarray   # prior tokens per unit of each feature
    turn: float        # tokens the chat template adds per message
    chat: float        # tokens it adds once per request (BOS, generation prompt)
    prompt: float      # tokens added to a raw /v1/completions prompt (BOS)
    margin: float      # cross-validated cold-start margin (relative)
    json_scale: float  # template's rendering of tool JSON (indented, spaced) vs compact JSON
    per_tool: float    # tokens the template adds per tool definition (and its preamble, amortised)
    by_group: np.ndarray  # features x content groups: the prior coefficients split by group


def load_priors(path: str | None = None) -> dict[str, Family]:
    if path is None:
        text = resources.files("extproc.budget").joinpath("priors.json").read_text()
    else:
        with open(path) as f:
            text = f.read()
    doc = json.loads(text)
    if tuple(doc["features"]) != FEATURE_NAMES:
        raise ValueError("priors were fitted on other features than the code measures: refit them "
                         "(benchmarks/fit_priors.py)")
    out = {}
    for name, fam in doc["families"].items():
        o = fam["overhead"]
        coef = np.array(fam["coef"], float)
        tools = fam.get("tools", {})
        out[name] = Family(name, coef, float(o["message"]), float(o["chat"]), float(o["prompt"]),
                           float(fam["margin"]), float(tools.get("json_scale", 1.0)),
                           float(tools.get("per_tool", 0.0)), coef[:, None] * _ONE_HOT)
    return out


@dataclass(frozen=True, slots=True)
class Estimate:
    tokens: float        # point estimate of the prompt's tokens
    conservative: int    # what routing uses: the estimate plus the safety margin
    source: str          # "calibrated", "prior", "exact"
    margin: float = 0.0  # relative safety margin in ``conservative`` (for explanations)
    kind: str = ""       # the kind of content whose margin applied; "" where one margin covers all


class Estimator(Protocol):
    name: str

    def estimate(self, key: str, family: Family, prompt: Prompt, media_tokens: int) -> Estimate: ...

    def observe(self, key: str, family: Family, prompts: list[Prompt], prompt_tokens: int,
                media_tokens: int) -> float | None: ...

    def samples(self, key: str) -> int: ...

    def snapshot(self) -> dict: ...

    def restore(self, doc: dict) -> None: ...


class KeyTable:
    """Per-model state with a hard bound on the number of keys."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.states: dict[str, object] = {}

    def get(self, key: str):
        """State of a key; a name that found no room reads the shared overflow state."""
        st = self.states.get(key)
        if st is None and len(self.states) >= self.max_keys - 1:
            st = self.states.get(OVERFLOW_KEY)
        return st

    def resolve(self, key: str) -> str | None:
        """Which stored key ``get`` reads for a name: its own, the overflow key, or None (priors)."""
        if key in self.states:
            return key
        if len(self.states) >= self.max_keys - 1 and OVERFLOW_KEY in self.states:
            return OVERFLOW_KEY
        return None

    def slot(self, key: str, family: str) -> str:
        """The key a new observation is stored under: its own while there is room (one slot
        stays for the overflow key, so the table never exceeds ``max_keys``)."""
        if key in self.states or len(self.states) < self.max_keys - 1:
            return key
        return OVERFLOW_KEY


def _quantile(sorted_values: list[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


KINDS = ("prose", "code", "digits", "cjk", "script", "json")
BUCKETS = KINDS + tuple(k + "/turns" for k in KINDS)


def error_bucket(g: list[float]) -> str:
    """Which kind of content dominates a request's estimate: errors are tracked per kind, so a
    kind that estimates badly (rare scripts) widens its own margin and not everyone's. A
    conversation of three or more messages mixes texts whose errors partly cancel: its own bucket."""
    content = [abs(v) for v in g[: len(CONTENT_GROUPS) + 2]]
    total = sum(content) or 1.0
    if (content[_G["json"]] + content[_G["schema"]]) > 0.5 * total:
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


class ErrorModel:
    """Out-of-sample relative errors per content bucket; the margin is a high quantile of the
    bucket's errors, blended with the prior margin (and then with all buckets' errors) while
    the bucket has few samples."""

    __slots__ = ("windows", "margins", "n")

    def __init__(self, prior: float, window: int) -> None:
        self.windows: dict[str, deque[float]] = {b: deque(maxlen=window) for b in BUCKETS}
        self.margins: dict[str, float] = {b: prior for b in BUCKETS}
        self.n = 0

    def margin(self, bucket: str) -> float:
        return self.margins[bucket]

    def add(self, bucket: str, rel_error: float, prior: float, quantile: float, prior_weight: float) -> None:
        self.windows[bucket].append(rel_error)
        self.n += 1
        pooled = sorted(e for w in self.windows.values() for e in w)
        pooled_q = _blend(prior, pooled, quantile, prior_weight)
        for b, w in self.windows.items():
            self.margins[b] = _blend(pooled_q, sorted(w), quantile, prior_weight)


def _blend(prior: float, sorted_errors: list[float], quantile: float, prior_weight: float) -> float:
    n = len(sorted_errors)
    if n < 5:
        return prior
    emp = max(0.0, _quantile(sorted_errors, quantile))
    return (prior_weight * prior + n * emp) / (prior_weight + n)


_PLAUSIBLE = (-0.5, 1.0)  # true/estimate within [0.5, 2]
_MAX_STEP = 0.3           # largest relative innovation one observation may apply


class _KalmanState:
    __slots__ = ("theta", "P", "errors", "n", "implausible")

    def __init__(self, theta: list[float], P: list[list[float]], errors: ErrorModel, n: int = 0):
        self.theta = theta
        self.P = P
        self.errors = errors
        self.n = n      # observations learned
        self.implausible = 0


@dataclass(frozen=True, slots=True)
class KalmanSettings:
    process_noise: float = 1e-3      # per observation, as a fraction of the prior variance
    observation_noise: float = 0.1   # relative misfit of one request's total
    content_sd: float = 0.15         # prior spread of a content group's scale
    margin_quantile: float = 0.96    # of out-of-sample relative errors
    margin_window: int = 512
    margin_min_tokens: int = 1024    # smaller requests teach the scales, not the margin (the router
                                     # sets a quarter of its smallest pool's context)
    margin_prior_weight: float = 10.0
    margin_floor: float = 0.005
    calibrated_after: int = 20       # samples before a key's estimates count as "calibrated"
    max_keys: int = 64


def group_vector(prompt: Prompt, family: Family) -> list[float]:
    """The prompt's prior token estimate per group, plus its template overhead counts."""
    if prompt.text is not None:
        g = (prompt.text @ family.by_group).tolist() + [0.0] * (_N_GROUPS - len(CONTENT_GROUPS))
    else:
        g = [0.0] * _N_GROUPS
    if prompt.json is not None:
        g[_G["json"]] = float(prompt.json @ family.coef)
    if prompt.schema is not None:
        g[_G["schema"]] = float(prompt.schema @ family.coef)
    g[_G["turns"]] = prompt.messages
    g[_G["chat"]] = prompt.chat
    g[_G["prompt"]] = 1 - prompt.chat
    g[_G["tools"]] = prompt.tools
    return g


class FeatureKalman:
    """The default estimator: per-group scales over prior feature coefficients (see module doc)."""

    name = "feature-kalman"

    def __init__(self, settings: KalmanSettings | None = None) -> None:
        self.s = settings or KalmanSettings()
        self.table = KeyTable(self.s.max_keys)

    def _prior(self, family: Family) -> tuple[list[float], list[float]]:
        theta = [1.0] * len(CONTENT_GROUPS) + [family.json_scale, 0.0, family.turn, family.chat, family.prompt,
                                               family.per_tool]
        sd = [self.s.content_sd] * len(CONTENT_GROUPS) + [self.s.content_sd, 0.5, 2.0, 3.0, 2.0, 20.0]
        return theta, [v * v for v in sd]

    def _new_state(self, family: Family) -> _KalmanState:
        theta, var = self._prior(family)
        P = [[var[i] if i == j else 0.0 for j in range(_N_GROUPS)] for i in range(_N_GROUPS)]
        return _KalmanState(theta, P, ErrorModel(family.margin, self.s.margin_window))

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

    def observe(self, key: str, family: Family, prompts: list[Prompt], prompt_tokens: int,
                media_tokens: int) -> float | None:
        """Learn from one true count; returns the out-of-sample relative error, if learnable."""
        y = float(prompt_tokens)
        g = [0.0] * _N_GROUPS
        for p in prompts:
            y -= p.media * media_tokens
            if p.exact_tokens is not None:
                y -= p.exact_tokens
                continue
            for i, v in enumerate(group_vector(p, family)):
                g[i] += v
        if y < 1.0 or not any(g):
            return None
        slot = self.table.slot(key, family.name)
        st = self.table.states.get(slot)
        if st is None:
            st = self.table.states[slot] = self._new_state(family)
        est = sum(t * x for t, x in zip(st.theta, g))
        rel_error = (y / est - 1.0) if est > 0 else 1.0
        if not _PLAUSIBLE[0] <= rel_error <= _PLAUSIBLE[1]:
            # A count off by more than 2x is far more likely a broken usage report than text: it
            # neither moves the margin (one such sample would switch the short pool off) nor,
            # beyond the clipped step below, the scales.
            st.implausible += 1
        elif y >= self.s.margin_min_tokens and not any(p.measured_on_sample for p in prompts):
            # (errors of approximate measurements on a sample of the text say nothing about requests near a limit)
            st.errors.add(error_bucket(g), rel_error, family.margin, self.s.margin_quantile,
                          self.s.margin_prior_weight)
        self._kalman_update(st, family, [v / y for v in g])
        st.n += 1
        return rel_error

    def _kalman_update(self, st: _KalmanState, family: Family, x: list[float]) -> None:
        n = _N_GROUPS
        P = st.P
        _, var0 = self._prior(family)
        q = self.s.process_noise
        for i in range(n):  # random-walk drift: the forgetting
            P[i][i] += q * var0[i]
        Px = [sum(P[i][j] * x[j] for j in range(n) if x[j]) for i in range(n)]
        S = sum(x[i] * Px[i] for i in range(n)) + self.s.observation_noise ** 2
        err = 1.0 - sum(t * v for t, v in zip(st.theta, x))
        err = max(-_MAX_STEP, min(_MAX_STEP, err))  # one sample moves the estimate by at most this share
        for i in range(n):
            k = Px[i] / S
            st.theta[i] += k * err
            row = P[i]
            for j in range(n):
                row[j] -= k * Px[j]
        for i in range(n):  # no wind-up: a direction never excited stays at its prior spread
            if P[i][i] > var0[i]:
                f = math.sqrt(var0[i] / P[i][i])
                for j in range(n):
                    P[i][j] *= f
                    P[j][i] *= f

    def samples(self, key: str) -> int:
        st = self.table.get(key)
        return st.n if st else 0

    def describe(self, key: str) -> dict | None:
        st = self.table.get(key)
        if st is None:
            return None
        return {"samples": st.n, "implausible": st.implausible, "margins": {b: round(m, 4) for b, m in st.errors.margins.items()},
                "scales": {g: round(t, 4) for g, t in zip(GROUPS, st.theta)}}

    def snapshot(self) -> dict:
        keys = {}
        for key, st in self.table.states.items():
            keys[key] = {"theta": st.theta, "P": st.P, "n": st.n, "margins": st.errors.margins,
                         "errors": {b: list(w) for b, w in st.errors.windows.items()}, "margin_n": st.errors.n}
        return {"version": SNAPSHOT_VERSION, "estimator": self.name, "groups": list(GROUPS),
                "features": FEATURES_ID, "keys": keys}

    def restore(self, doc: dict) -> None:
        _check_snapshot(doc, self.name)
        if doc.get("groups") != list(GROUPS):
            raise ValueError("snapshot groups differ from this version's")
        if doc.get("features") != FEATURES_ID:
            raise ValueError("snapshot was learned on other content features (another version): not restored")
        states = {}
        for key, v in _bounded_keys(doc["keys"], self.s.max_keys):
            if not isinstance(v, dict) or not isinstance(v.get("margins"), dict) or not isinstance(v.get("errors"), dict):
                raise ValueError(f"snapshot key {key!r} is malformed")
            theta = _finite(v["theta"], "theta")
            P = [_finite(row, "covariance") for row in v["P"]]
            if len(theta) != _N_GROUPS or len(P) != _N_GROUPS or any(len(r) != _N_GROUPS for r in P):
                raise ValueError(f"snapshot key {key!r} has the wrong dimensions")
            errors = ErrorModel(0.0, self.s.margin_window)
            stored = v["margins"]
            for b in BUCKETS:  # a bucket an older version did not have starts at the widest margin
                (margin,) = _finite([stored[b] if b in stored else max(stored.values(), default=0.0)], "margin")
                if not 0.0 <= margin <= 10.0:
                    raise ValueError(f"snapshot margin {margin} out of range")
                errors.margins[b] = margin
                errors.windows[b].extend(_finite(v["errors"].get(b, []), "errors")[-self.s.margin_window:])
            errors.n = int(v.get("margin_n", 0))
            states[str(key)] = _KalmanState(theta, P, errors, int(v["n"]))
        self.table.states = states


def _finite(values, what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"snapshot {what} holds a non-finite number")
    return out


def _bounded_keys(keys: dict, max_keys: int) -> list[tuple[str, object]]:
    """At most ``max_keys`` entries, the shared overflow key kept when present (restoring into a
    smaller table must not exceed its bound once the overflow key is needed)."""
    items = [(str(k), v) for k, v in keys.items() if k != OVERFLOW_KEY][: max_keys - 1]
    if OVERFLOW_KEY in keys:
        items.append((OVERFLOW_KEY, keys[OVERFLOW_KEY]))
    return items


def _check_snapshot(doc: dict, name: str) -> None:
    if not isinstance(doc, dict) or doc.get("version") != SNAPSHOT_VERSION:
        raise ValueError("not a calibration snapshot of a supported version")
    if doc.get("estimator") != name:
        raise ValueError(f"snapshot is of estimator {doc.get('estimator')!r}, not {name!r}")
    if not isinstance(doc.get("keys"), dict):
        raise ValueError("snapshot has no keys table")


# --- the paper's estimator and the fixed-ratio baseline -------------------------------------

PAPER_PRIOR_RATIO = {"prose": 4.48, "code": 3.52, "cjk": 2.01}  # 2604.08075 calibration table
_F = {name: i for i, name in enumerate(FEATURE_NAMES)}
_CJK = tuple(_F[f"n:{c}"] for c in "hkf")


def paper_category(prompt: Prompt) -> str:
    """The paper's three categories from the text features (CJK share, code-like punctuation)."""
    f = prompt.text if prompt.text is not None else prompt.json
    if f is None:
        return "prose"
    cjk = sum(f[i] for i in _CJK)
    letters = f[_F["n:l"]] + f[_F["n:U"]]
    if cjk and cjk * 3 >= max(1.0, prompt.text_bytes) * 0.3:
        return "cjk"
    punct = f[_F["n:p"]] + f[_F["n:q"]]
    indent = f[_F["r:s/4"]]
    if prompt.json is not None or punct > 0.25 * max(1.0, letters) or indent > 0.02 * max(1.0, letters):
        return "code"
    return "prose"


@dataclass(frozen=True, slots=True)
class PaperSettings:
    beta: float = 0.9
    gamma: float = 2.0
    prior_sigma: float = 0.1   # relative; σ̂ starts at this fraction of the prior ratio
    calibrated_after: int = 20
    max_keys: int = 64


class PaperEMA:
    name = "paper-ema"

    def __init__(self, settings: PaperSettings | None = None) -> None:
        self.s = settings or PaperSettings()
        self.table = KeyTable(self.s.max_keys)

    def _ratio(self, key: str, cat: str) -> tuple[float, float, int]:
        st = self.table.get(key)
        if st is None or cat not in st:
            c = PAPER_PRIOR_RATIO[cat]
            return c, c * self.s.prior_sigma, 0
        return st[cat]

    def estimate(self, key: str, family: Family, prompt: Prompt, media_tokens: int) -> Estimate:
        extra = prompt.media * media_tokens
        if prompt.exact_tokens is not None:
            return Estimate(prompt.exact_tokens + extra, prompt.exact_tokens + extra, "exact")
        category = paper_category(prompt)
        c, sigma, n = self._ratio(key, category)
        c_star = max(0.5, c - self.s.gamma * sigma)
        return Estimate(prompt.text_bytes / c + extra, math.ceil(prompt.text_bytes / c_star) + extra,
                        "calibrated" if n >= self.s.calibrated_after else "prior", c / c_star - 1.0, category)

    def observe(self, key, family, prompts, prompt_tokens, media_tokens):
        text = [p for p in prompts if p.exact_tokens is None]
        y = prompt_tokens - sum(p.exact_tokens or 0 for p in prompts) - sum(p.media for p in prompts) * media_tokens
        nbytes = sum(p.text_bytes for p in text)
        if y < 1 or not text or nbytes <= 0:
            return None
        cat = paper_category(text[0])
        c, sigma, n = self._ratio(key, cat)
        obs = nbytes / y
        rel_error = c / obs - 1.0  # true tokens / estimated tokens − 1
        b = self.s.beta
        new_c = b * c + (1 - b) * obs
        new_sigma = b * sigma + (1 - b) * abs(obs - new_c)
        slot = self.table.slot(key, family.name)
        self.table.states.setdefault(slot, {})[cat] = (new_c, new_sigma, n + 1)
        return rel_error

    def samples(self, key: str) -> int:
        st = self.table.get(key)
        return sum(v[2] for v in st.values()) if st else 0

    def describe(self, key: str) -> dict | None:
        st = self.table.get(key)
        return None if st is None else {cat: {"ratio": round(c, 3), "sigma": round(s, 3), "samples": n}
                                        for cat, (c, s, n) in st.items()}

    def snapshot(self) -> dict:
        return {"version": SNAPSHOT_VERSION, "estimator": self.name,
                "keys": {k: {cat: list(v) for cat, v in st.items()} for k, st in self.table.states.items()}}

    def restore(self, doc: dict) -> None:
        _check_snapshot(doc, self.name)
        states = {}
        for key, cats in _bounded_keys(doc["keys"], self.s.max_keys):
            if not isinstance(cats, dict):
                raise ValueError(f"snapshot key {key!r} is malformed")
            state = {}
            for cat, v in cats.items():
                if cat in PAPER_PRIOR_RATIO:
                    c, sigma = _finite(v[:2], "ratio")
                    if c <= 0 or sigma < 0:
                        raise ValueError(f"snapshot ratio {c} / spread {sigma} out of range")
                    state[cat] = (c, sigma, int(v[2]))
            states[str(key)] = state
        self.table.states = states


class FixedRatio:
    """One bytes-per-token constant, never learned (the paper's uncalibrated baseline)."""

    name = "fixed-ratio"

    def __init__(self, ratio: float = 4.0) -> None:
        self.ratio = ratio

    def estimate(self, key, family, prompt, media_tokens):
        extra = prompt.media * media_tokens
        if prompt.exact_tokens is not None:
            return Estimate(prompt.exact_tokens + extra, prompt.exact_tokens + extra, "exact")
        t = prompt.text_bytes / self.ratio
        return Estimate(t + extra, math.ceil(t) + extra, "fixed")

    def observe(self, key, family, prompts, prompt_tokens, media_tokens):
        return None

    def samples(self, key: str) -> int:
        return 0

    def describe(self, key: str) -> dict | None:
        return None

    def snapshot(self) -> dict:
        return {"version": SNAPSHOT_VERSION, "estimator": self.name, "keys": {}}

    def restore(self, doc: dict) -> None:
        _check_snapshot(doc, self.name)


def make_estimator(name: str, **settings) -> Estimator:
    if name == FeatureKalman.name:
        return FeatureKalman(KalmanSettings(**settings))
    if name == PaperEMA.name:
        return PaperEMA(PaperSettings(**settings))
    if name == FixedRatio.name:
        return FixedRatio(**settings)
    raise ValueError(f"unknown estimator {name!r}")


ESTIMATORS: Iterable[str] = (FeatureKalman.name, PaperEMA.name, FixedRatio.name)
