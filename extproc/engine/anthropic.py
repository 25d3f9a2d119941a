"""/v1/messages answers in Anthropic's shape, as vLLM 0.32 converts its chat completion into them
(``vllm/entrypoints/anthropic/serving.py``): the message id is the chat completion's, usage is
``input_tokens``/``output_tokens``, and a stream runs message_start, content_block_start,
content_block_delta..., content_block_stop, message_delta (stop reason and usage), message_stop."""

from __future__ import annotations

import orjson

from extproc.engine.errors import RequestError
from extproc.engine.responses import Shaper

_STOP = {"length": "max_tokens", "stop": "end_turn"}


def event(name: str, obj: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def error_body(err: RequestError) -> dict:
    return {"type": "error", "error": {"type": err.err_type, "message": err.message}}


def count_tokens(input_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "context_management": {"original_input_tokens": input_tokens}}


class MessagesShaper(Shaper):
    def __init__(self, gen, created, fingerprint) -> None:
        super().__init__(gen, created, fingerprint)
        self.open_block = False
        self.finish: str | None = None

    def full(self, choices, prompt_tokens, completion_tokens):
        (text, finish), = choices
        return {"id": self.id, "type": "message", "role": "assistant", "content": [{"type": "text", "text": text}],
                "model": self.gen.model, "stop_reason": _STOP.get(finish),
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}}

    def start(self):
        return [event("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.gen.model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.gen.prompt_tokens[0], "output_tokens": 0}}})]

    def token(self, index, i, text, finish):
        frames = []
        if not self.open_block:
            self.open_block = True
            frames.append(event("content_block_start", {"type": "content_block_start",
                                                        "content_block": {"type": "text", "text": ""}, "index": 0}))
        if finish is not None:
            self.finish = finish
        frames.append(event("content_block_delta", {"type": "content_block_delta",
                                                    "delta": {"type": "text_delta", "text": text}, "index": 0}))
        return frames

    def end(self, prompt_tokens, completion_tokens):
        frames = [event("content_block_stop", {"type": "content_block_stop", "index": 0})] if self.open_block else []
        return frames + [
            event("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": _STOP.get(self.finish or "stop"), "stop_sequence": None},
                                    "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}}),
            event("message_stop", {"type": "message_stop"})]
