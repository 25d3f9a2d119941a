"""Sample request bodies for ``explain`` and the demo: the shared dev requests when present
(``../shared/data``), else the bundled ``requests.jsonl``; plus long conversations stacked from them."""

from __future__ import annotations

import json
import pathlib
from importlib import resources

SHARED_REQUESTS = pathlib.Path("../shared/data/requests/dev_requests.jsonl")


def request_rows(paths: list[str]) -> tuple[list[dict], str]:
    """Rows of {path, body, prompt_tokens?} from JSONL files; shared samples, else bundled ones."""
    if paths:
        files = [pathlib.Path(p) for p in paths]
        label = ", ".join(paths)
    elif SHARED_REQUESTS.exists():
        files, label = [SHARED_REQUESTS], str(SHARED_REQUESTS)
    else:
        files, label = [], "bundled sample (../shared/data absent)"
    rows = []
    texts = [f.read_text() for f in files] if files else \
        [resources.files(__package__).joinpath("requests.jsonl").read_text()]
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append(row if "body" in row else {"body": row})
    return rows, label


def long_requests(rows: list[dict], count: int = 4) -> list[dict]:
    """Long conversations built by stacking the sample prompts, so both pools show up."""
    texts = [m["content"] for r in rows for m in r["body"].get("messages", [])
             if isinstance(m.get("content"), str)]
    if not texts:
        return []
    out = []
    for i in range(count):
        target = 30_000 * (i + 1)  # ~7K, 15K, 22K, 30K tokens of English text
        content, k = [], i
        while sum(map(len, content)) < target:
            content.append(texts[k % len(texts)])
            k += 1
        body = {"model": rows[0]["body"].get("model", "meta-llama/Meta-Llama-3-8B-Instruct"),
                "messages": [{"role": "user", "content": "\n\n".join(content)}], "max_tokens": 1024}
        out.append({"body": body})
    return out
