"""Prompt text never reaches a log or a metric, whatever happens to the request."""

from __future__ import annotations

import json
import urllib.request
import uuid

from e2e_helpers import access_line, chat_body, post, rid


def test_prompt_text_is_in_no_log_and_no_metric(stack):
    marker = f"zebra{uuid.uuid4().hex}quokka"
    bodies = [
        json.dumps(chat_body(f"Please repeat {marker} back to me.", max_tokens=4)).encode(),  # routed, its response read
        json.dumps(chat_body(f"{marker} " * 20000, max_tokens=4)).encode(),                  # long pool
        ('{"model": "' + marker + '", "messages": [{"role": "user", "content": "' + marker).encode(),  # malformed
    ]
    ids = []
    for body in bodies:
        r = rid("privacy")
        post(stack, body, r, timeout=60)
        ids.append(r)
    for r in ids:
        access_line(stack, r)  # flushed and written
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as resp:
        exported = resp.read().decode()
    assert marker not in exported
    for name in ("router.log", "access.log", "envoy.log"):
        text = (stack.workdir / name).read_text(errors="replace")
        assert marker not in text, f"prompt text leaked into {name}"
