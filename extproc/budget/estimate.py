"""What every estimator is: the ``Estimator`` protocol, its ``Estimate`` and ``Learned`` results,
and the snapshot checks they share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .priors import Family
from .request import Prompt

SNAPSHOT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 (before the learning guards) is upgraded on restore


@dataclass(frozen=True, slots=True)
class Estimate:
    tokens: float        # point estimate of the prompt's tokens
    conservative: int    # what routing uses: the estimate plus the safety margin
    source: str          # "calibrated", "prior", "exact", "fixed"
    margin: float = 0.0  # relative safety margin in ``conservative`` (for explanations)
    kind: str = ""       # the kind of content whose margin applied; "" where one margin covers all


@dataclass(frozen=True, slots=True)
class Learned:
    """What one true count did to an estimator."""

    error: float          # out-of-sample relative error: true / estimate − 1
    explained: bool       # False: far outside what this kind's errors look like; no rate moved
    kind: str = ""        # the kind of content it was filed under


@runtime_checkable
class Estimator(Protocol):
    """A prompt-token estimator, learned per model key from true counts (or not at all)."""

    name: str
    learns: bool  # False: observe() never changes anything (no responses need reading for it)

    def estimate(self, key: str, family: Family, prompt: Prompt, media_tokens: int) -> Estimate: ...

    def observe(self, key: str, family: Family, prompts: list[Prompt], prompt_tokens: int, media_tokens: int,
                client: str | None = None, lower_bound: bool = False) -> Learned | None:
        """Learn one request's true count (``lower_bound``: the truth is this or more). ``client``
        names who sent it (a hash), for estimators that keep clients apart; None when unknown."""

    def keys(self) -> list[str]:
        """Every model key it holds state for (bounded)."""

    def resolve(self, key: str) -> str | None:
        """The stored key a model's estimates read: its own, the shared overflow key, or None."""

    def slot(self, key: str) -> str:
        """The stored key a model's next sample would teach."""

    def samples(self, key: str) -> int: ...

    def describe(self, key: str) -> dict | None:
        """A JSON-able summary of what a model's key has learned (no prompt text)."""

    def reset(self, key: str) -> bool:
        """Forget what a model's key learned (it reads the priors again); False if nothing was held."""

    def snapshot(self) -> dict: ...

    def restore(self, doc: dict) -> None:
        """Replace all state with a snapshot's, or raise ValueError and change nothing."""


def finite(values, what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"snapshot {what} holds a non-finite number")
    return out


def check_snapshot(doc: dict, name: str) -> int:
    """The snapshot's version, after the checks every estimator makes."""
    if not isinstance(doc, dict) or doc.get("version") not in READABLE_VERSIONS or type(doc.get("version")) is not int:
        raise ValueError("not a calibration snapshot of a supported version")
    if doc.get("estimator") != name:
        raise ValueError(f"snapshot is of estimator {doc.get('estimator')!r}, not {name!r}")
    if not isinstance(doc.get("keys"), dict):
        raise ValueError("snapshot has no keys table")
    return doc["version"]
