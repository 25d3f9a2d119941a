"""The README's main job: `extproc up --demo` starts the stack, replays the demo and reports."""

from __future__ import annotations

import re
import subprocess
import sys

from e2e_helpers import need_envoy


def test_up_demo_reports_pools_misroutes_and_calibration(tmp_path):
    need_envoy()
    out = subprocess.run([sys.executable, "-m", "extproc", "up", "--demo", "--exit", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert "send OpenAI requests to" in text and "router metrics" in text
    # every address it chose, the router's gRPC port included, each with the pid behind it
    for label in ("send OpenAI requests to", "Envoy admin", "router gRPC", "router checks", "router metrics",
                  "pool short", "pool long"):
        assert re.search(rf"^{label}\s+\S*127\.0\.0\.1:\d+", text, re.M), (label, text)
    assert len(re.findall(r"pid \d+", text)) == 4, text  # Envoy, the router, two engines
    statuses = re.search(r"HTTP statuses \{([^}]*)\}", text).group(1)
    assert statuses.startswith("200:") and "," not in statuses, text  # every demo request answered 200
    short = int(re.search(r"routed to short\s+(\d+)", text).group(1))
    long_ = int(re.search(r"routed to long\s+(\d+)", text).group(1))
    assert short > 0 and long_ > 0, text  # both pools used: short prompts and the stacked long ones
    assert re.search(r"misroutes \(a pool too small for its request: vLLM refused or clamped it\): 0;", text), text
    before, after = map(int, re.search(r"samples (\d+) -> (\d+)", text).groups())
    assert after > before, text  # calibration learned from the responses
    # everything it started is gone
    assert "stopping" in text
