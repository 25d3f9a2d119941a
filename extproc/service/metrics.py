"""Prometheus metrics of the router, on their own registry and port.

Every label set is bounded: pools come from the config, reasons, sources and misroute kinds are
fixed sets, model labels only name keys the calibrator holds (at most ``max_keys``).
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

PHASES = ("request_headers", "request_body", "response")
USAGE_OUTCOMES = ("json", "stream", "stream_missed", "json_missed", "context_error", "other_status")

_TOKEN_BUCKETS = (256, 512, 1024, 2048, 4096, 6144, 8192, 12288, 16384, 32768, 65536, 131072, float("inf"))
_ERROR_BUCKETS = (-0.2, -0.1, -0.05, -0.02, -0.01, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, float("inf"))
_SECONDS_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, float("inf"))


class Metrics:
    def __init__(self, calibration: Callable[[], Iterable[tuple[str, dict]]] | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.decisions = Counter("extproc_decisions", "Routing decisions by pool, reason and estimate source",
                                 ["pool", "reason", "source"], registry=r)
        self.budget = Histogram("extproc_budget_tokens", "Conservative token budget of routed requests",
                                ["pool"], buckets=_TOKEN_BUCKETS, registry=r)
        self.estimate_error = Histogram(
            "extproc_estimate_error_ratio", "Prompt estimate error, true/estimate - 1 (before learning)",
            ["family"], buckets=_ERROR_BUCKETS, registry=r)
        self.spillovers = Counter("extproc_spillovers", "Requests sent to a larger pool because the preferred "
                                  "one was under pressure (its own metrics)", ["from_pool", "to_pool"], registry=r)
        self.spill_held = Counter("extproc_spillover_held", "Requests kept in their pool by spillover: no fresh "
                                  "reading to decide on (stale), or no larger pool with room (no_room)",
                                  ["pool", "why"], registry=r)
        self.pool_reads = Counter("extproc_pool_metrics_reads", "Reads of the pools' vLLM metrics pages by "
                                  "outcome (service/pool_load.py OUTCOMES)", ["pool", "outcome"], registry=r)
        self.misroutes = Counter("extproc_misroutes", "Requests sent to a pool that could not hold them, by what "
                                 "vLLM showed (its kind: prompt_over_window, prompt_fills_window, "
                                 "output_over_window, output_clamped)", ["pool", "kind"], registry=r)
        self.usage = Counter("extproc_usage_reads", "Responses read, by what they told", ["outcome"], registry=r)
        self.phase_seconds = Histogram("extproc_processing_seconds", "Router time per ext_proc phase",
                                       ["phase"], buckets=_SECONDS_BUCKETS, registry=r)
        self.usage_streams = Counter("extproc_usage_streams", "Response streams the usage filter opened to the "
                                     "router (should track the sample rate)", registry=r)
        self.ends_missed = Counter("extproc_request_ends_missed", "Checked requests whose end Envoy never logged "
                                   "(counted out of in-flight after service.max_request_s)", registry=r)
        self.stream_errors = Counter("extproc_stream_errors", "ext_proc streams that ended with an error",
                                     registry=r)
        self.config_reloads = Counter("extproc_config_reloads", "Config reloads by outcome (applied, unchanged, "
                                      "invalid, restart_required)", ["outcome"], registry=r)
        self.tls_reloads = Counter("extproc_tls_reloads", "TLS certificate file changes by outcome (reloaded, "
                                   "invalid: the last good certificate stays)", ["outcome"], registry=r)
        # exact counts of close decisions (issue 12): sources and outcomes are fixed sets (extproc.exact)
        self.exact_counts = Counter("extproc_exact_counts", "Exact prompt counts asked for decisions close to a "
                                    "pool's capacity, by source (local, pool) and outcome (counted, timeout, "
                                    "error, capped, too_large, unsupported, unavailable)", ["source", "outcome"],
                                    registry=r)
        self.exact_seconds = Histogram("extproc_exact_count_seconds", "Time an exact count added to a counted "
                                       "request", ["source"], buckets=_SECONDS_BUCKETS, registry=r)
        if calibration is not None:
            r.register(_CalibrationCollector(calibration))
        self.phase = {p: self.phase_seconds.labels(p) for p in PHASES}
        self._children: dict[tuple, object] = {}

    def watch_inflight(self, counts: Callable[[], dict[str, int]]) -> None:
        """In-flight requests per pool, read at scrape time (the request path only bumps an int)."""
        self.registry.register(_InflightCollector(counts))

    def watch_pool_load(self, views: Callable[[], Iterable]) -> None:
        """The pools' load as spillover sees it (pool_load.LoadView per read pool), at scrape time."""
        self.registry.register(_PoolLoadCollector(views))

    def child(self, metric, *values: str):
        """``metric.labels(*values)``, memoised: the request path calls this several times per
        request and label sets are bounded, so the cache is too."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found


class _InflightCollector:
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self):
        family = GaugeMetricFamily("extproc_inflight_requests", "Requests routed and not yet finished",
                                   labels=["pool"])
        for pool, n in self.counts().items():
            family.add_metric([pool], n)
        yield family


class _PoolLoadCollector:
    def __init__(self, views: Callable[[], Iterable]) -> None:
        self.views = views

    def collect(self):
        queue = GaugeMetricFamily("extproc_pool_queue_per_instance", "Waiting requests per vLLM engine, with "
                                  "this replica's sends since the last read", labels=["pool"])
        kv = GaugeMetricFamily("extproc_pool_kv_cache_usage", "Mean KV-cache use of the pool's engines (0..1)",
                               labels=["pool"])
        instances = GaugeMetricFamily("extproc_pool_instances", "vLLM engines on the last read", labels=["pool"])
        age = GaugeMetricFamily("extproc_pool_load_age_seconds", "Age of the pool's last load reading",
                                labels=["pool"])
        pressured = GaugeMetricFamily("extproc_pool_under_pressure", "1 when the pool's fresh reading is over "
                                      "a threshold", labels=["pool"])
        for v in self.views():
            instances.add_metric([v.pool], v.instances)
            pressured.add_metric([v.pool], int(v.pressured))
            if v.age_s is not None:
                queue.add_metric([v.pool], v.queue_per_instance)
                age.add_metric([v.pool], v.age_s)
            if v.kv_cache is not None:
                kv.add_metric([v.pool], v.kv_cache)
        yield from (queue, kv, instances, age, pressured)


class _CalibrationCollector:
    """Calibration state per model key, read at scrape time (bounded by the key table)."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, dict]]]) -> None:
        self.source = source

    def collect(self):
        samples = GaugeMetricFamily("extproc_calibration_samples", "Usage samples learned per model", labels=["model"])
        margin = GaugeMetricFamily("extproc_calibration_margin_ratio", "Routing safety margin per model and kind",
                                   labels=["model", "kind"])
        scale = GaugeMetricFamily("extproc_calibration_scale", "Learned scale of each feature group per model",
                                  labels=["model", "group"])
        unexplained = GaugeMetricFamily("extproc_calibration_unexplained", "Samples per model the features could "
                                        "not explain (learned as content unseen, not as a rate)", labels=["model"])
        for model, state in self.source():
            samples.add_metric([model], state.get("samples", 0))
            if "unexplained" in state:
                unexplained.add_metric([model], state["unexplained"])
            for kind, m in (state.get("margins") or {}).items():
                margin.add_metric([model, kind], m)
            for group, s in (state.get("scales") or {}).items():
                scale.add_metric([model, group], s)
        yield samples
        yield margin
        yield scale
        yield unexplained
