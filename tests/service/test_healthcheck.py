"""``python -m extproc.service.healthcheck``, the image's health check: healthy only when the
router's gRPC health service says SERVING."""

from __future__ import annotations

import subprocess
import sys

from extproc.service.healthcheck import default_address
from extproc.stack import free_port


def test_address_is_loopback_on_the_configured_grpc_port():
    assert default_address({"EXTPROC_SERVICE__GRPC_ADDRESS": "0.0.0.0:6001"}) == "127.0.0.1:6001"
    assert default_address({}) == "127.0.0.1:50051"


def test_nothing_listening_is_unhealthy_with_exit_code_1():
    out = subprocess.run([sys.executable, "-m", "extproc.service.healthcheck", "--address", f"127.0.0.1:{free_port()}",
                          "--timeout", "1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "not serving" in out.stdout, out.stdout + out.stderr
