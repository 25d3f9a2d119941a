"""OpenAI/vLLM response shapes: chat and text completions, stream chunks, usage, errors, SSE framing."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import orjson

SSE_DONE = b"data: [DONE]\n\n"

_FILLER = ("The", "simulated", "engine", "writes", "filler", "words", "one", "token", "at", "a",
           "time", "so", "that", "usage", "counts", "match", "what", "was", "streamed.")


def sse(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def token_text(i: int) -> str:
    """Text of the i-th (0-based) generated token: one filler word."""
    word = _FILLER[i % len(_FILLER)]
    return word if i == 0 else " " + word


def full_text(n: int) -> str:
    return "".join(token_text(i) for i in range(n))


def request_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict:
    return {"object": "error", "message": message, "type": err_type, "param": param, "code": code}


def _object(endpoint: str, stream: bool) -> str:
    if endpoint == "chat":
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def chunk(endpoint: str, rid: str, created: int, model: str, index: int, text: str | None,
          finish_reason: str | None, *, role: bool = False) -> dict:
    """One stream chunk carrying a token (or, for chat, the opening role delta)."""
    if endpoint == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = None
    return {"id": rid, "object": _object(endpoint, True), "created": created, "model": model,
            "choices": [choice]}


def usage_chunk(endpoint: str, rid: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The final chunk sent only with stream_options.include_usage: no choices, just usage."""
    return {"id": rid, "object": _object(endpoint, True), "created": created, "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def completion(endpoint: str, rid: str, created: int, model: str,
               choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole non-streamed response; ``choices`` holds (text, finish_reason) per sequence."""
    out = []
    for index, (text, finish_reason) in enumerate(choices):
        if endpoint == "chat":
            out.append({"index": index,
                        "message": {"role": "assistant", "content": text, "tool_calls": []},
                        "logprobs": None, "finish_reason": finish_reason, "stop_reason": None})
        else:
            out.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                        "stop_reason": None, "prompt_logprobs": None})
    return {"id": rid, "object": _object(endpoint, False), "created": created, "model": model,
            "choices": out, "usage": usage(prompt_tokens, completion_tokens), "prompt_logprobs": None}


def model_list(model: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{
        "id": model, "object": "model", "created": created, "owned_by": "vllm", "root": model,
        "parent": None, "max_model_len": max_model_len,
        "permission": [{"id": f"modelperm-{next(_perm_ids)}", "object": "model_permission",
                        "created": created, "allow_create_engine": False, "allow_sampling": True,
                        "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                        "allow_fine_tuning": False, "organization": "*", "group": None,
                        "is_blocking": False}],
    }]}


_perm_ids = itertools.count()
