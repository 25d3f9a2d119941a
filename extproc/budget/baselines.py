"""The baselines kept selectable beside the default estimator.

``PaperEMA`` — the paper's estimator: per (model, category) bytes-per-token EMA
ĉ ← βĉ + (1−β)·obs, σ̂ an EMA of |obs − ĉ|, routing on c* = ĉ − γσ̂.
``FixedRatio`` — one bytes-per-token constant (4.0 in the paper's baseline), never learned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .estimate import SNAPSHOT_VERSION, Estimate, Learned, check_snapshot, finite
from .features import FEATURE_NAMES
from .keys import KeyTable, TableKeys, bounded_keys
from .priors import Family
from .request import Prompt

PAPER_PRIOR_RATIO = {"prose": 4.48, "code": 3.52, "cjk": 2.01}  # 2604.08075 calibration table
_F = {name: i for i, name in enumerate(FEATURE_NAMES)}
_CJK = tuple(_F[f"n:{c}"] for c in "hkf")


def paper_category(prompt: Prompt) -> str:
    """The paper's three categories from the text features (CJK share, code-like punctuation)."""
    f = prompt.text_features if prompt.text_features is not None else prompt.json_features
    if f is None:
        return "prose"
    cjk = sum(f[i] for i in _CJK)
    letters = f[_F["n:l"]] + f[_F["n:U"]]
    if cjk and cjk * 3 >= max(1.0, prompt.text_bytes) * 0.3:
        return "cjk"
    punct = f[_F["n:p"]] + f[_F["n:q"]]
    indent = f[_F["r:s/4"]]
    if prompt.json_features is not None or punct > 0.25 * max(1.0, letters) or indent > 0.02 * max(1.0, letters):
        return "code"
    return "prose"


@dataclass(frozen=True, slots=True)
class PaperSettings:
    beta: float = 0.9
    gamma: float = 2.0
    prior_sigma: float = 0.1   # relative; σ̂ starts at this fraction of the prior ratio
    calibrated_after: int = 20
    max_keys: int = 64


class PaperEMA(TableKeys):
    name = "paper-ema"
    learns = True

    def __init__(self, settings: PaperSettings | None = None) -> None:
        self.s = settings or PaperSettings()
        self.table: KeyTable[dict] = KeyTable(self.s.max_keys)

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

    def observe(self, key: str, family: Family, prompts: list[Prompt], prompt_tokens: int, media_tokens: int,
                client: str | None = None, lower_bound: bool = False) -> Learned | None:
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
        slot = self.table.slot(key)
        self.table.states.setdefault(slot, {})[cat] = (new_c, new_sigma, n + 1)
        return Learned(rel_error, True, cat)

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
        check_snapshot(doc, self.name)
        states = {}
        for key, cats in bounded_keys(doc["keys"], self.s.max_keys):
            if not isinstance(cats, dict):
                raise ValueError(f"snapshot key {key!r} is malformed")
            state = {}
            for cat, v in cats.items():
                if cat in PAPER_PRIOR_RATIO:
                    c, sigma = finite(v[:2], "ratio")
                    if c <= 0 or sigma < 0:
                        raise ValueError(f"snapshot ratio {c} / spread {sigma} out of range")
                    state[cat] = (c, sigma, int(v[2]))
            states[str(key)] = state
        self.table.states = states


@dataclass(frozen=True, slots=True)
class FixedSettings:
    ratio: float = 4.0  # bytes per token


class FixedRatio:
    """One bytes-per-token constant, never learned (the paper's uncalibrated baseline)."""

    name = "fixed-ratio"
    learns = False

    def __init__(self, settings: FixedSettings | None = None) -> None:
        self.s = settings or FixedSettings()
        self.ratio = self.s.ratio

    def estimate(self, key: str, family: Family, prompt: Prompt, media_tokens: int) -> Estimate:
        extra = prompt.media * media_tokens
        if prompt.exact_tokens is not None:
            return Estimate(prompt.exact_tokens + extra, prompt.exact_tokens + extra, "exact")
        t = prompt.text_bytes / self.ratio
        return Estimate(t + extra, math.ceil(t) + extra, "fixed")

    def observe(self, key: str, family: Family, prompts: list[Prompt], prompt_tokens: int, media_tokens: int,
                client: str | None = None, lower_bound: bool = False) -> Learned | None:
        return None

    def keys(self) -> list[str]:
        return []

    def resolve(self, key: str) -> str | None:
        return None

    def slot(self, key: str) -> str:
        return key

    def samples(self, key: str) -> int:
        return 0

    def reset(self, key: str) -> bool:
        return False

    def describe(self, key: str) -> dict | None:
        return None

    def snapshot(self) -> dict:
        return {"version": SNAPSHOT_VERSION, "estimator": self.name, "keys": {}}

    def restore(self, doc: dict) -> None:
        check_snapshot(doc, self.name)
