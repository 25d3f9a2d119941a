"""Helpers shared by the engine tests: starting a real engine, reading SSE and /metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from extproc.engine import EngineConfig, OutputPolicy
from extproc.engine.versions import VllmVersion
from extproc.fleet.instance import profile_named

SHARED_REQUESTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "requests" / "dev_requests.jsonl"


def engine_config(*, profile: str = "short", model: str | None = None, time_scale: float = 0.0,
                  output_tokens: int | None = 256, served_names: tuple[str, ...] = (),
                  vllm_version: str = "0.32", tokenizer: str | None = None, max_body_bytes: int | None = None,
                  **overrides: int) -> EngineConfig:
    p = profile_named(profile)
    if overrides:
        p = p.with_overrides(**overrides)
    extra = {"max_body_bytes": max_body_bytes} if max_body_bytes else {}
    return EngineConfig(profile=p, model=model, time_scale=time_scale, output_policy=OutputPolicy(output_tokens),
                        served_names=served_names, vllm_version=VllmVersion.parse(vllm_version), tokenizer=tokenizer,
                        **extra)


async def read_sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """Events of an SSE stream: parsed JSON objects, and the string "[DONE]"."""
    events: list[Any] = []
    buffer = b""
    async for data in resp.content.iter_any():
        buffer += data
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            assert frame.startswith(b"data: "), frame
            payload = frame[len(b"data: "):]
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    assert buffer == b"", f"trailing bytes after the last event: {buffer!r}"
    return events


async def metric_values(session: aiohttp.ClientSession) -> dict[str, float]:
    """Samples of /metrics keyed by name plus labels, e.g. 'vllm:num_requests_waiting{engine="0",model_name="m"}'."""
    async with session.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def metric(values: dict[str, float], name: str) -> float:
    """The value of a metric with one sample (any labels)."""
    hits = [v for k, v in values.items() if k.split("{", 1)[0] == name]
    assert len(hits) == 1, f"{name}: {hits}"
    return hits[0]
