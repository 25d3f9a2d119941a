"""Request bodies parsed the way vLLM's FastAPI server parses them, with bounded cost.

FastAPI checks the media type, reads the body with ``json.loads`` and turns a decode error into a
``json_invalid`` validation error at its character position; anything else that fails while parsing
(e.g. a ``RecursionError`` on JSON nested about a thousand levels deep under Python 3.11) becomes a 400
"There was an error parsing the body". orjson does the parsing here (linear time; depth is checked
separately); ``json`` is only consulted when orjson refuses, for the exact error or for inputs Python
accepts and orjson does not (NaN, huge integers).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from extproc.engine.errors import RequestError, http_error, validation_error

# Python 3.11's recursion limit (1,000 frames) less the frames under FastAPI's json.loads: nesting
# deeper than this is refused as an unparsable body, as vLLM does (never a 500).
MAX_JSON_DEPTH = 900


def parse(raw: bytes, content_type: str | None) -> Any:
    media = (content_type or "").lower().split(";", 1)[0].strip()
    if media != "application/json":
        raise RequestError("1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                           err_type="Bad Request", suffix=False)
    if not raw:
        raise validation_error("missing", ("body",), "Field required", None)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = _python_json(raw)
    if (raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH) and _deeper_than(body, MAX_JSON_DEPTH):
        raise http_error(400, "There was an error parsing the body")
    return body


def _python_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise validation_error("json_invalid", ("body", exc.pos), "JSON decode error", {},
                               {"error": exc.msg}) from None
    except Exception:  # RecursionError, UnicodeDecodeError...
        raise http_error(400, "There was an error parsing the body") from None


def _deeper_than(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return True
        stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise validation_error("model_attributes_type", ("body",),
                               "Input should be a valid dictionary or object to extract fields from", body)
    return body
