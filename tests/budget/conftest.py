"""Shared fixtures for the budget-core tests: the real dev texts (skipped cleanly when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DEV_TEXTS = Path(__file__).resolve().parents[2].parent / "shared/data/texts/dev_texts.jsonl"


@pytest.fixture(scope="session")
def dev_texts() -> list[dict]:
    if not DEV_TEXTS.is_file():
        pytest.skip(f"shared dev texts not found at {DEV_TEXTS} (expected ../shared/data/texts/"
                    "dev_texts.jsonl next to the project root)")
    with DEV_TEXTS.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) > 1000, f"dev_texts.jsonl looks truncated: {len(rows)} rows"
    return rows


DEV_REQUESTS = DEV_TEXTS.parent.parent / "requests" / "dev_requests.jsonl"


@pytest.fixture(scope="session")
def dev_requests() -> list[dict]:
    """Real chat bodies with the prompt counts vLLM reports for them (Llama-3 and Qwen3)."""
    if not DEV_REQUESTS.is_file():
        pytest.skip(f"shared dev requests not found at {DEV_REQUESTS} (expected ../shared/data/requests/"
                    "dev_requests.jsonl next to the project root)")
    with DEV_REQUESTS.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
