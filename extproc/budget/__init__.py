"""The budget core: body → shape → features → estimate → pool; usage → calibration. No I/O."""

from .calibrate import ESTIMATORS, Estimate, FeatureKalman, FixedRatio, PaperEMA
from .policy import DEFAULT_POOLS, Pool, choose_pool
from .request import Prompt, RequestShape, read_request
from .router import REASONS, SOURCES, BudgetRouter, BudgetSettings, Decision, Explanation

__all__ = [
    "BudgetRouter", "BudgetSettings", "Decision", "Explanation", "Pool", "DEFAULT_POOLS", "choose_pool",
    "read_request", "RequestShape", "Prompt", "Estimate", "FeatureKalman", "PaperEMA", "FixedRatio",
    "ESTIMATORS", "REASONS", "SOURCES",
]
