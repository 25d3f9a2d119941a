"""OpenAI answer shapes as vLLM 0.32 serialises them: chat and text completions (whole and streamed),
usage, errors, /v1/models, /version. Field order and nulls follow the captured real responses
(``shared/data/vllm/responses_8k``). Each ``Shaper`` turns one request's generated tokens into its
answer; the HTTP layer only writes what it returns.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from extproc.engine.errors import RequestError

SSE_DONE = b"data: [DONE]\n\n"

_FILLER = ("The", "simulated", "engine", "writes", "filler", "words", "one", "token", "at", "a",
           "time", "so", "that", "usage", "counts", "match", "what", "was", "streamed.")


def token_text(i: int) -> str:
    """Text of the i-th (0-based) generated token: one filler word."""
    word = _FILLER[i % len(_FILLER)]
    return word if i == 0 else " " + word


def full_text(n: int) -> str:
    return "".join(token_text(i) for i in range(n))


def hex_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


def sse(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_body(err: RequestError) -> dict:
    return {"error": {"message": err.message, "type": err.err_type, "param": err.param, "code": err.status}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None,
            "completion_tokens_details": None}


class Shaper:
    """One request's answer: ``full`` for a JSON body, ``start``/``token``/``end`` for its SSE frames.

    ``choices`` are (text, finish_reason) per sequence; ``token(index, i, text, finish)`` is called for
    the i-th (0-based) token of sequence ``index``, ``finish`` set on its last."""

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, gen: Any, created: int, fingerprint: str) -> None:
        self.gen = gen
        self.created = created
        self.fingerprint = fingerprint
        self.id = hex_id(self.id_prefix)

    id_prefix = "chatcmpl-"

    def full(self, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict:
        raise NotImplementedError

    def start(self) -> list[bytes]:
        return []

    def token(self, index: int, i: int, text: str, finish: str | None) -> list[bytes]:
        raise NotImplementedError

    def end(self, prompt_tokens: int, completion_tokens: int) -> list[bytes]:
        raise NotImplementedError


class ChatShaper(Shaper):
    def _head(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.gen.model}

    def full(self, choices, prompt_tokens, completion_tokens):
        out = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                                        "audio": None, "function_call": None, "reasoning": None},
                "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None,
                "routed_experts": None} for i, (text, finish) in enumerate(choices)]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.gen.model,
                "choices": out, "service_tier": None, "system_fingerprint": self.fingerprint,
                "usage": usage(prompt_tokens, completion_tokens), "prompt_logprobs": None,
                "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
                "ec_transfer_params": None, "metrics": None}

    def _running_usage(self, completion: int) -> dict:
        prompt = self.gen.prompt_tokens[0]
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
                "completion_tokens_details": None}

    def start(self):
        frames = []
        for i in range(self.gen.n):
            chunk = self._head() | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}
            if self.gen.continuous_usage:
                chunk["usage"] = self._running_usage(0)
            frames.append(sse(chunk | {"prompt_token_ids": None, "prompt_text": None}))
        return frames

    def token(self, index, i, text, finish):
        choice: dict[str, Any] = {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        choice["token_ids"] = None
        chunk = self._head() | {"choices": [choice]}
        if finish is not None and not self.gen.include_usage:
            chunk["system_fingerprint"] = self.fingerprint
        if self.gen.continuous_usage:
            chunk["usage"] = self._running_usage(i + 1)
        return [sse(chunk)]

    def end(self, prompt_tokens, completion_tokens):
        frames = []
        if self.gen.include_usage:
            frames.append(sse(self._head() | {"choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens}, "system_fingerprint": self.fingerprint}))
        return frames + [SSE_DONE]


class CompletionShaper(ChatShaper):
    id_prefix = "cmpl-"

    def _head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.gen.model}

    def full(self, choices, prompt_tokens, completion_tokens):
        out = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
               for i, (text, finish) in enumerate(choices)]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.gen.model,
                "choices": out, "service_tier": None, "system_fingerprint": self.fingerprint,
                "usage": usage(prompt_tokens, completion_tokens), "kv_transfer_params": None,
                "ec_transfer_params": None, "metrics": None}

    def start(self):
        return []

    def token(self, index, i, text, finish):
        chunk = self._head() | {"choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                                             "stop_reason": None, "prompt_token_ids": None, "token_ids": None}]}
        if finish is not None and not self.gen.include_usage:
            chunk["system_fingerprint"] = self.fingerprint
        if self.gen.continuous_usage:
            prompt = self.gen.prompt_tokens[index // self.gen.n]
            chunk["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt + i + 1, "completion_tokens": i + 1}
        return [sse(chunk)]


def model_list(served: tuple[str, ...], created: int, max_model_len: int, root: str) -> dict:
    return {"object": "list", "data": [{
        "id": name, "object": "model", "created": created, "owned_by": "vllm", "root": root,
        "parent": None, "max_model_len": max_model_len,
        "permission": [{"id": hex_id("modelperm-"), "object": "model_permission",
                        "created": created, "allow_create_engine": False, "allow_sampling": True,
                        "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                        "allow_fine_tuning": False, "organization": "*", "group": None,
                        "is_blocking": False}],
    } for name in served]}


def version(release: str) -> dict:
    return {"version": release}


def tokenize(tokens: list[int], max_model_len: int) -> dict:
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": None}

