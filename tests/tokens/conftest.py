"""Fixtures for the token-counter tests: the real dev data (skipped cleanly when absent) and the
built-in families' counters (skipped when their tokenizer files can be neither found in the cache
nor fetched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DEV_TEXTS = SHARED / "texts" / "dev_texts.jsonl"
DEV_REQUESTS = SHARED / "requests" / "dev_requests.jsonl"


def _shared_rows(path: Path) -> list[dict]:
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data/{path.parent.name}/"
                    f"{path.name} next to the project root)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def dev_texts() -> list[dict]:
    rows = _shared_rows(DEV_TEXTS)
    assert len(rows) == 1292, f"dev_texts.jsonl has {len(rows)} rows, expected 1292"
    return rows


@pytest.fixture(scope="session")
def dev_requests() -> list[dict]:
    rows = _shared_rows(DEV_REQUESTS)
    assert len(rows) == 150, f"dev_requests.jsonl has {len(rows)} rows, expected 150"
    return rows


def _counter(family: str):
    from extproc.tokens import counter_for
    from extproc.tokens.files import have_family

    try:
        return counter_for(family)
    except (OSError, RuntimeError) as e:  # not cached and the registry unreachable
        if have_family(family):
            raise
        pytest.skip(f"tokenizer files of {family!r} not cached and not fetchable: {e}")


@pytest.fixture(scope="session", params=["llama3", "llama3_1", "qwen3"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def counter(family):
    return _counter(family)


@pytest.fixture(scope="session")
def counters():
    return {f: _counter(f) for f in ("llama3", "llama3_1", "qwen3")}
