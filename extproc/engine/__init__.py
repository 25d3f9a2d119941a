"""A simulated vLLM instance (OpenAI API, vLLM's limits, errors and metrics) for tests and demos."""

from extproc.engine.requests import OutputPolicy
from extproc.engine.server import EngineConfig, RunningEngine, create_app, start_engine

__all__ = ["EngineConfig", "OutputPolicy", "RunningEngine", "create_app", "start_engine"]
