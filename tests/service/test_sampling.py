"""Which responses the router reads: every one that could show a misroute (sent to a smaller pool
on an estimate, not proven by the size bound), all while a model calibrates, then a share under a
cap per second."""

from __future__ import annotations

import time

from service_harness import chat, long_text

from extproc.budget import BudgetRouter
from extproc.config import parse_config
from extproc.service.metrics import Metrics
from extproc.service.router import Router


def _router(**service) -> Router:
    cfg = parse_config({"service": service})
    return Router(BudgetRouter(cfg.budget), cfg.service, Metrics())


def _read(r: Router, body: bytes, n: int) -> int:
    return sum(r.route(body, "/v1/chat/completions", ended_by_log=True).read for _ in range(n))


def test_every_response_is_read_while_calibrating():
    r = _router(calibration_samples=50, usage_sample_rate=0.0, usage_samples_per_s=0.0)
    assert _read(r, chat("hi"), 200) == 200  # nothing learned yet: the model has no samples


def test_after_calibration_reads_are_capped_per_second():
    r = _router(calibration_samples=0, usage_sample_rate=1.0, usage_samples_per_s=5.0)
    t0 = time.monotonic()
    got = _read(r, chat("hi"), 2000)
    elapsed = time.monotonic() - t0
    assert 0 < got <= 5.0 * elapsed + 1, (got, elapsed)


def test_every_request_at_risk_of_a_misroute_is_read_whatever_the_share_and_cap():
    r = _router(calibration_samples=0, usage_sample_rate=0.0, usage_samples_per_s=0.0)
    near = chat(long_text(6400), max_tokens=1024)  # the size bound cannot prove it fits the short pool
    d = r.budget.route(near, "/v1/chat/completions", by_size=True)
    assert d.pool == "short" and d.source != "bound", d
    assert _read(r, near, 50) == 50
    assert _read(r, chat("hi"), 200) == 0  # proven to fit by its size: never misrouted, not read
    far = chat(long_text(40_000), max_tokens=64)  # the largest pool: nothing larger to send it to
    assert r.route(far, "/v1/chat/completions").pool == "long"
    assert _read(r, far, 20) == 0


def test_unread_short_requests_are_decided_by_size_and_read_ones_are_estimated():
    calibrated = _router(calibration_samples=0, usage_sample_rate=0.0, usage_samples_per_s=0.0)
    routed = calibrated.route(chat("hi"), "/v1/chat/completions", ended_by_log=True)
    assert routed.decision.source == "bound" and not routed.read and routed.pool == "short"
    calibrating = _router()  # every response read until 50 samples: each needs the real estimate
    routed = calibrating.route(chat("hi"), "/v1/chat/completions", ended_by_log=True)
    assert routed.read and routed.decision.source == "prior"
    assert calibrating.budget.observe(routed.observation, 20) is not None  # learnable, from the same parse


def test_a_cap_of_zero_reads_nothing_after_calibration():
    r = _router(calibration_samples=0, usage_sample_rate=1.0, usage_samples_per_s=0.0)
    assert _read(r, chat("hi"), 100) == 0


def test_decision_ids_differ_between_router_starts():
    a, b = _router(), _router()
    ida = a.route(chat("hi"), "/v1/chat/completions", ended_by_log=True).decision_id
    idb = b.route(chat("hi"), "/v1/chat/completions", ended_by_log=True).decision_id
    assert ida != idb  # a restarted router must not end requests by an old process's ids
