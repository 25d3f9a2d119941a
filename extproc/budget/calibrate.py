"""The estimators' names in one place, for callers written against the module they used to live
in. The code is split by what it holds:

* ``priors.py`` — ``Family``, ``load_priors`` (cold-start knowledge per tokenizer family);
* ``estimate.py`` — the ``Estimator`` protocol, ``Estimate`` and ``Learned``, snapshot checks;
* ``kalman.py`` — ``FeatureKalman`` (the default) and its group vector;
* ``margins.py`` — per-kind error windows and margins; ``robust.py`` — the statistics they use;
* ``baselines.py`` — ``PaperEMA``, ``FixedRatio``;
* ``keys.py`` — the bounded key table; ``guard.py`` — bounded influence per client;
* ``registry.py`` — ``ESTIMATORS`` and ``make_estimator``.
"""

from __future__ import annotations

from .baselines import PAPER_PRIOR_RATIO, FixedRatio, FixedSettings, PaperEMA, PaperSettings, paper_category
from .estimate import SNAPSHOT_VERSION, Estimate, Estimator, Learned
from .kalman import FEATURES_ID, GROUPS, FeatureKalman, KalmanSettings, error_bucket, group_vector
from .keys import OVERFLOW_KEY, KeyTable
from .margins import BUCKETS, KINDS
from .priors import CONTENT_GROUPS, Family, load_priors
from .registry import ESTIMATORS, EstimatorKind, make_estimator

__all__ = [
    "PAPER_PRIOR_RATIO", "FixedRatio", "FixedSettings", "PaperEMA", "PaperSettings", "paper_category",
    "SNAPSHOT_VERSION", "Estimate", "Estimator", "Learned", "FEATURES_ID", "GROUPS", "FeatureKalman",
    "KalmanSettings", "error_bucket", "group_vector", "OVERFLOW_KEY", "KeyTable", "BUCKETS", "KINDS",
    "CONTENT_GROUPS", "Family", "load_priors", "ESTIMATORS", "EstimatorKind", "make_estimator",
]
