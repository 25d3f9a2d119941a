"""What a reload may change and what it keeps (service/reload.py, Service.apply_config), in process:
the field-by-field comparison and its restart-only table, and a pool change that keeps the learned
calibration, the in-flight counts of pools that stay and counts a removed pool's requests out."""

from __future__ import annotations

import asyncio

from service_harness import chat

from extproc.config import parse_config
from extproc.service.app import Service
from extproc.service.reload import RESTART_ONLY, changed_fields, restart_reason

TWO = [{"name": "short", "max_context": 8192}, {"name": "long", "max_context": 65536}]


def test_changed_fields_name_every_leaf_that_differs_and_nothing_else():
    old = parse_config({"service": {"tls": {"cert": "a.crt", "key": "a.key"}}})
    new = parse_config({"pools": [{"name": "s", "max_context": 4096}, TWO[1]],
                        "service": {"tls": {"cert": "b.crt", "key": "a.key"}, "usage_sample_rate": 0.5}})
    assert sorted(changed_fields(old, new)) == ["budget.pools", "service.tls.cert", "service.usage_sample_rate"]
    assert changed_fields(old, old) == []
    assert restart_reason("service.tls.cert") == RESTART_ONLY["service.tls"]
    assert restart_reason("service.spillover.pools") is None and restart_reason("budget.pools") is None
    plain = parse_config({})
    assert changed_fields(plain, old) == ["service.tls"]  # None against a TlsSettings: one field


def test_a_pool_change_keeps_calibration_and_counts_a_removed_pool_out():
    async def main() -> None:
        service = Service(parse_config({"pools": TWO}))
        router = service.router
        estimator = service.budget.estimator
        short = router.route(chat("hello"), "/v1/chat/completions")
        assert short.pool == "short" and router.inflight == {"short": 1, "long": 0}
        service.apply_config(parse_config({"pools": [{"name": "tiny", "max_context": 4096}, TWO[1]],
                                           "service": {"pool_header": "x-pool"}}))
        assert service.budget.estimator is estimator  # what it learned stays
        assert router.inflight == {"short": 1, "long": 0, "tiny": 0}  # short still runs one request
        again = router.route(chat("hello"), "/v1/chat/completions")
        assert again.pool == "tiny" and router.decision_headers(again)[0] == ("x-pool", "tiny")
        router.finished("short")
        assert "short" not in router.inflight  # its last request ended: gone from the table and the gauge
        router.finished("short")  # a late second end of a pool already gone: ignored
        assert router.inflight == {"tiny": 1, "long": 0}
    asyncio.run(main())
