"""Prometheus text exposition of the engine's state, under vLLM's metric names and labels (vLLM 0.32
labels every engine metric ``engine="0"`` beside ``model_name``, the first served name; labels sorted
by name as prometheus_client writes them)."""

from __future__ import annotations

from extproc.engine.scheduler import EngineStats, SequenceScheduler

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(scheduler: SequenceScheduler, model: str) -> str:
    stats: EngineStats = scheduler.stats
    m = f'engine="0",model_name="{_label(model)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{{{labels}}} {float(value)!r}" for labels, value in samples)

    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
           [(m, scheduler.num_running)])
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
           [(m, scheduler.num_waiting)])
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
           [(m, scheduler.kv_cache_usage)])
    metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
           [(m, stats.prompt_tokens_total)])
    metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
           [(m, stats.generation_tokens_total)])
    metric("vllm:request_success_total", "counter", "Count of successfully processed requests.",
           [(f'engine="0",finished_reason="{r}",model_name="{_label(model)}"', stats.request_success_total[r])
            for r in _FINISH_REASONS])
    # Not a vLLM metric: requests the simulated engine refused (e.g. context_length 400s, which are
    # misroutes when a router chose this pool).
    reasons = sorted(stats.requests_rejected_total) or ["context_length"]
    metric("vllm_sim:requests_rejected_total", "counter", "Requests refused with an error response.",
           [(f'{m},reason="{_label(r)}"', stats.requests_rejected_total[r]) for r in reasons])
    return "\n".join(lines) + "\n"
