"""The estimators the router can run, by name: what ``make_estimator`` builds and what the config
validates ``estimator.settings`` against (one table, so the two cannot disagree)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .baselines import FixedRatio, FixedSettings, PaperEMA, PaperSettings
from .estimate import Estimator
from .kalman import FeatureKalman, KalmanSettings


@dataclass(frozen=True, slots=True)
class EstimatorKind:
    name: str
    settings: type                           # a frozen dataclass: its fields are the config's settings
    build: Callable[[object], Estimator]     # settings instance -> estimator
    description: str


ESTIMATORS: dict[str, EstimatorKind] = {k.name: k for k in (
    EstimatorKind(FeatureKalman.name, KalmanSettings, FeatureKalman,
                  "feature groups over fitted priors, learned per model (robust Kalman filter)"),
    EstimatorKind(PaperEMA.name, PaperSettings, PaperEMA, "the paper's bytes-per-token EMA per category"),
    EstimatorKind(FixedRatio.name, FixedSettings, FixedRatio, "one bytes-per-token constant, never learned"),
)}


def make_estimator(name: str, **settings) -> Estimator:
    kind = ESTIMATORS.get(name)
    if kind is None:
        raise ValueError(f"unknown estimator {name!r} (known: {', '.join(ESTIMATORS)})")
    return kind.build(kind.settings(**settings))
