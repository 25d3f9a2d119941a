"""Shared fixtures for the budget-core tests: the real dev texts (skipped cleanly when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DEV_TEXTS = Path(__file__).resolve().parents[2].parent / "shared/data/texts/dev_texts.jsonl"


def _shared_rows(path: Path) -> list[dict]:
    """The rows of a shared data file; the test is skipped, saying where it looked, when absent."""
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data/{path.parent.name}/"
                    f"{path.name} next to the project root)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def dev_texts() -> list[dict]:
    rows = _shared_rows(DEV_TEXTS)
    assert len(rows) > 1000, f"dev_texts.jsonl looks truncated: {len(rows)} rows"
    return rows


DEV_REQUESTS = DEV_TEXTS.parent.parent / "requests" / "dev_requests.jsonl"


@pytest.fixture(scope="session")
def dev_requests() -> list[dict]:
    """Real chat bodies with the prompt counts vLLM reports for them (Llama-3 and Qwen3)."""
    return _shared_rows(DEV_REQUESTS)


@pytest.fixture(scope="session")
def count():
    """Exact Llama-3 chat prompt counts (what vLLM counts), from the real tokenizer files."""
    from extproc.tokens import counter_for

    try:
        counter = counter_for("llama3")
    except Exception as exc:  # noqa: BLE001 - offline without a cached tokenizer
        pytest.skip(f"the Llama-3 tokenizer files are not available: {exc}")
    return counter.count_chat
