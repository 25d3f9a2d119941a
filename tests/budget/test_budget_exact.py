"""The budget core's side of exact counts: when a decision is close (``close_to``, ``distrusted``)
and what deciding on an exact count gives (``BudgetRouter.decide_exact``)."""

from __future__ import annotations

import orjson
import pytest

from extproc.budget import BudgetRouter, BudgetSettings, Decision, Pool
from extproc.budget.router import CLOSE_FLOOR, CLOSE_SPAN, DISTRUST_MARGIN, close_to, distrusted

POOLS = (Pool("short", 8192), Pool("mid", 32768), Pool("long", 65536))


def decision(point: int, conservative: int, out: int = 1024, source: str = "calibrated", margin: float = 0.03,
             reason: str = "fits") -> Decision:
    return Decision("short", point, conservative + out, reason, source, output_tokens=out, margin=margin)


@pytest.mark.parametrize("point,cons,out,near", [
    (7000, 7300, 1024, "short"),     # the capacity between point+out (8024) and conservative+out (8324)
    (7168, 7300, 1024, "short"),     # point + out lands on the capacity: still close
    (6900, 7100, 1024, "short"),     # conservative + out fits (8124), two margins over the point do not (8324)
    (6400, 6750, 1024, None),        # two margins over the point still fit (8124): decided safely by the estimate
    (6800, 6900, 1024, "short"),     # a narrow margin (1.5%) spans 5% of the point above it: 6800 + 680 + 1024 > 8192
    (7300, 7500, 1024, "short"),     # point + out over the capacity, two margins under it: close (waste side)
    (7600, 7800, 1024, None),        # even the point less two margins is over: safely long
    (4000, 4200, 4096, "short"),     # the output reserve counts: 4000 + 4096 < 8192 < 4200 + 4096
    (31000, 32000, 1024, "mid"),     # any pool but the largest
    (64000, 66000, 1024, None),      # near the largest: it goes there whether it fits or not
])
def test_close_when_the_budget_range_holds_a_capacity(point, cons, out, near):
    found = close_to(decision(point, cons, out), POOLS)
    assert (found.name if found else None) == near


def test_range_edges_are_exact():
    # the range is point ± CLOSE_SPAN (2) margins, plus the output reserve; above the point each
    # margin is at least CLOSE_FLOOR (5%) of it
    assert (CLOSE_SPAN, CLOSE_FLOOR) == (2.0, 0.05)
    assert close_to(decision(6000, 6584), POOLS) is None          # 6000 + 1168 + 1024 == 8192: fits
    assert close_to(decision(6000, 6585), POOLS).name == "short"  # 7170 + 1024 > 8192
    assert close_to(decision(6500, 6510), POOLS) is None          # the floor: 6500 + 650 + 1024 = 8174
    assert close_to(decision(6520, 6530), POOLS).name == "short"  # 6520 + 652 + 1024 = 8196
    assert close_to(decision(7368, 7468), POOLS).name == "short"  # 7368 - 200 + 1024 == 8192
    assert close_to(decision(7369, 7469), POOLS) is None          # 7169 + 1024 > 8192: surely long (no floor below)


@pytest.mark.parametrize("source,reason", [("bound", "fits"), ("exact", "fits"), ("fallback", "unreadable"),
                                           ("calibrated", "unreadable")])
def test_proven_or_unreadable_decisions_are_never_close(source, reason):
    assert close_to(decision(7000, 7300, source=source, reason=reason), POOLS) is None


def test_a_distrusted_estimate_widens_the_range():
    d = decision(5000, 5200)          # far from 8192 with a trusted 4% margin
    assert close_to(d, POOLS) is None
    assert close_to(d, POOLS, distrust=True).name == "short"   # ±50%: 5000*1.5 + 1024 > 8192
    assert close_to(decision(3000, 3100), POOLS, distrust=True) is None  # 4500 + 1024 < 8192


def test_what_the_guards_distrust():
    assert distrusted(decision(100, 110, source="prior"), None)
    assert distrusted(decision(100, 110, source="fixed"), None)
    assert distrusted(decision(100, 130, margin=DISTRUST_MARGIN), None)
    assert not distrusted(decision(100, 103, margin=0.03), None)


def test_features_measured_on_a_sample_are_distrusted():
    router = BudgetRouter()
    text = "word " * 400_000  # 2 MB: the features are measured on evenly spaced blocks
    d, obs = router.route_learnable(orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}))
    assert any(p.measured_on_sample for p in obs.prompts)
    assert distrusted(d, obs)
    d2, obs2 = router.route_learnable(orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    assert not any(p.measured_on_sample for p in obs2.prompts)


def test_decide_exact_budget_is_count_plus_reserve():
    router = BudgetRouter(BudgetSettings(pools=POOLS))
    d = decision(7000, 7300)
    e = router.decide_exact(d, 7100, "exact: local, close to short (8192)")
    assert (e.pool, e.source, e.reason, e.prompt_tokens, e.budget_tokens) == ("short", "exact", "fits", 7100, 8124)
    assert e.fits == ("short", "mid", "long") and e.output_tokens == 1024 and e.margin == 0.0
    assert "close to short" in e.detail
    assert router.decide_exact(d, 7168).pool == "short"    # 7168 + 1024 = 8192: to the token
    over = router.decide_exact(d, 7169)
    assert over.pool == "mid" and over.budget_tokens == 8193
    huge = router.decide_exact(d, 70_000)
    assert (huge.pool, huge.reason) == ("long", "too_large")
    assert d.source == "calibrated" and d.budget_tokens == 8324  # the input decision is not changed

