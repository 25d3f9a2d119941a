"""Suite-wide: no test writes into the user's home. A bare ``extproc serve`` keeps its calibration
under ``$XDG_STATE_HOME/extproc/`` (config.default_snapshot_path); every router process a test
starts inherits this session's own state directory instead."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_state_home(tmp_path_factory):
    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("XDG_STATE_HOME", None)
        else:
            os.environ["XDG_STATE_HOME"] = previous
