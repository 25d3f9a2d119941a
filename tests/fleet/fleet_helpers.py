"""Shared by the fleet tests: the real traces, or a skip that says why."""

from __future__ import annotations

import pytest

from extproc.fleet import workload


def trace_or_skip(name: str) -> workload.Trace:
    try:
        return workload.load_trace(name)
    except workload.TraceUnavailable as exc:
        pytest.skip(f"shared traces absent: {exc}")
