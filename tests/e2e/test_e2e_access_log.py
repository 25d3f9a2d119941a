"""The access log as an operator reads it (``extproc up``): lines should appear promptly."""

from __future__ import annotations

import time

import pytest
from e2e_helpers import access_line, chat_body, post, rid

PROMPT_S = 3.0


def test_access_log_line_appears_within_seconds_without_a_forced_flush(stack):
    # sync with Envoy's flush timer: wait (unforced) until a line is written out, twice (the very
    # first write to the file is flushed at once, later ones only on the timer) …
    for i in range(2):
        r0 = rid(f"flush-sync{i}")
        assert post(stack, chat_body("hi", max_tokens=2), r0).status == 200
        access_line(stack, r0, wait=15, flush=False)
    # … then a second request must appear within a few seconds, not at the next 10 s tick
    r1 = rid("flush")
    assert post(stack, chat_body("hi", max_tokens=2), r1).status == 200
    t0 = time.monotonic()
    access_line(stack, r1, wait=PROMPT_S, flush=False)
    assert time.monotonic() - t0 <= PROMPT_S
