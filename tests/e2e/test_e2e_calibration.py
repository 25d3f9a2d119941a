"""Calibration through the stack: every response of a not-yet-calibrated model is read for usage
(``calibration_samples``, default 50), and after ``calibrated_after`` (20) samples the estimate's
source moves from ``prior`` to ``calibrated``. A fresh stack, so the counts start at zero."""

from __future__ import annotations

import json

import pytest
from e2e_helpers import TEXTS, MODEL, access_line, chat_body, metric, post, rid, wait_metric

N = 20  # KalmanSettings.calibrated_after


def _prompts(n: int) -> list[str]:
    """n varied real prompts of 60..2,000 bytes (English-like filler if the data set is absent)."""
    out = []
    if TEXTS.is_file():
        with TEXTS.open() as f:
            for line in f:
                text = json.loads(line)["text"]
                if 60 <= len(text.encode()) <= 2000:
                    out.append(text)
                if len(out) == n:
                    return out
    while len(out) < n:
        i = len(out)
        out.append(f"Request {i}: please summarise the attached note about harbour schedules. " * (1 + i % 7))
    return out


@pytest.fixture(scope="module")
def fresh(make_stack):
    return make_stack("calibration")


def test_calibration_grows_with_responses_and_source_turns_calibrated(fresh):
    stack = fresh
    assert metric(stack, "extproc_calibration_samples", model=MODEL) == 0
    ids = []
    for i, prompt in enumerate(_prompts(N)):
        r = rid(f"cal{i}")
        reply = post(stack, chat_body(prompt, max_tokens=8), r)
        assert reply.status == 200, reply.body[:300]
        ids.append(r)
    first = access_line(stack, ids[0])
    assert first.served_by == "short"
    assert first.fields["source"] == "prior", first.raw

    samples = wait_metric(stack, "extproc_calibration_samples", N, model=MODEL)
    assert samples == N  # one sample per response: every response read, none twice
    assert metric(stack, "extproc_usage_reads_total", outcome="json") == N
    assert metric(stack, "extproc_decisions_total", source="prior") == N

    r = rid("cal-after")
    assert post(stack, chat_body("One more question about the harbour schedules, please.", max_tokens=8), r).status == 200
    line = access_line(stack, r)
    assert line.fields["source"] == "calibrated", line.raw
    assert line.decision["source"] == "calibrated"
    assert wait_metric(stack, "extproc_calibration_samples", N + 1, model=MODEL) == N + 1
