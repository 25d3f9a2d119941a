"""End-to-end fixtures: the real stack (Envoy binary + router + simulated vLLM engines) on loopback.

One session stack (``stack``) serves most tests; tests that need another router config (shadow,
a bad estimator, an external upstream, a slow engine) get their own from ``make_stack``,
stopped at the end of their module. Helpers live in e2e_helpers.py.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest
import yaml
from e2e_helpers import ensure_router, need_envoy, start_stack

from extproc.stack import Stack


@pytest.fixture(scope="session")
def _main_stack(tmp_path_factory) -> Iterator[Stack]:
    need_envoy()
    s = start_stack(Stack(tmp_path_factory.mktemp("stack-main"), time_scale=0.0))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def _ext_proc_stack(tmp_path_factory) -> Iterator[Stack]:
    """The same stack with the ext_proc routing filter instead of the default ext_authz check."""
    need_envoy()
    workdir = tmp_path_factory.mktemp("stack-ext-proc")
    config = workdir / "input-config.yaml"
    config.write_text(yaml.safe_dump({"service": {"routing_filter": "ext_proc"}}))
    s = start_stack(Stack(workdir, config_path=str(config), time_scale=0.0))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def stack(_main_stack: Stack) -> Stack:
    """The shared stack, with its router up and healthy in Envoy (a test before may have killed it)."""
    ensure_router(_main_stack)
    return _main_stack


@pytest.fixture(params=["ext_authz", "ext_proc"])
def either_stack(request) -> Stack:
    """The shared stack with each routing filter: tests of routing and fail-open take this."""
    s = request.getfixturevalue("_main_stack" if request.param == "ext_authz" else "_ext_proc_stack")
    ensure_router(s)
    return s


@pytest.fixture(scope="module")
def make_stack(tmp_path_factory) -> Iterator[Callable[..., Stack]]:
    """``make_stack(name, config=None, **Stack kwargs)``: a started stack with its own router
    config (a dict written as the router's YAML), stopped when the module ends."""
    need_envoy()
    started: list[Stack] = []

    def make(name: str, config: dict | None = None, **kw) -> Stack:
        workdir = tmp_path_factory.mktemp(f"stack-{name}")
        config_path = None
        if config is not None:
            config_path = workdir / "input-config.yaml"
            config_path.write_text(yaml.safe_dump(config))
        kw.setdefault("time_scale", 0.0)
        s = start_stack(Stack(workdir, config_path=str(config_path) if config_path else None, **kw))
        started.append(s)
        return s

    try:
        yield make
    finally:
        for s in started:
            s.stop()
