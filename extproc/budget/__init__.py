"""The budget core: body → shape → features → estimate → pool; usage → calibration. No I/O."""

from .baselines import FixedRatio, PaperEMA
from .estimate import Estimate, Estimator, Learned
from .kalman import FeatureKalman
from .policy import DEFAULT_POOLS, Pool, choose_pool
from .registry import ESTIMATORS, make_estimator
from .request import Prompt, RequestShape, read_request
from .router import REASONS, SOURCES, BudgetRouter, BudgetSettings, Decision, Explanation, Observation

__all__ = [
    "BudgetRouter", "BudgetSettings", "Decision", "Observation", "Explanation", "Pool", "DEFAULT_POOLS",
    "choose_pool", "read_request", "RequestShape", "Prompt", "Estimate", "Estimator", "Learned", "FeatureKalman",
    "PaperEMA", "FixedRatio", "ESTIMATORS", "make_estimator", "REASONS", "SOURCES",
]
