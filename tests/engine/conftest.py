"""Fixtures: a real simulated engine on 127.0.0.1 (ephemeral port) and a real aiohttp client."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from engine_harness import SHARED_REQUESTS, engine_config

from extproc.engine import RunningEngine, start_engine

Scenario = Callable[[aiohttp.ClientSession, RunningEngine], Awaitable[Any]]


@pytest.fixture
def serve() -> Callable[..., Any]:
    """``serve(scenario, **config)`` starts an engine, runs ``scenario(session, engine)``, stops it."""

    def run(scenario: Scenario, **config: Any) -> Any:
        async def main() -> Any:
            engine = await start_engine(engine_config(**config))
            try:
                timeout = aiohttp.ClientTimeout(total=30)
                async with aiohttp.ClientSession(base_url=engine.url, timeout=timeout) as session:
                    return await scenario(session, engine)
            finally:
                await engine.close()

        return asyncio.run(main())

    return run


@pytest.fixture(scope="session")
def shared_requests() -> list[dict]:
    if not SHARED_REQUESTS.is_file():
        pytest.skip(f"shared request bodies not found at {SHARED_REQUESTS} (expected ../shared/data "
                    "next to the repository)")
    return [json.loads(line) for line in SHARED_REQUESTS.read_text().splitlines() if line.strip()]
