"""/v1/responses answers as vLLM 0.32 serialises them (``shared/data/vllm/responses_8k/responses_*.txt``):
one ``response`` object, or its SSE events from ``response.created`` to ``response.completed``."""

from __future__ import annotations

from typing import Any

import orjson

from extproc.engine.responses import Shaper, hex_id


def event(name: str, obj: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class ResponsesShaper(Shaper):
    id_prefix = "resp_"

    def __init__(self, gen: Any, created: int, fingerprint: str) -> None:
        super().__init__(gen, created, fingerprint)
        self.item_id = hex_id("msg_")
        self.seq = 0
        self.text: list[str] = []
        self.finish: str | None = None

    def _response(self, status: str, output: list, usage: dict | None, finish: str | None) -> dict:
        echo = self.gen.echo
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        if status == "completed" and incomplete:
            status = "incomplete"
        return {"id": self.id, "created_at": self.created, "incomplete_details": incomplete, "instructions": None,
                "metadata": None, "model": self.gen.model, "object": "response", "output": output,
                "parallel_tool_calls": True, "temperature": echo.get("temperature", 1.0), "tool_choice": "none",
                "tools": [], "top_p": echo.get("top_p", 1.0), "background": False,
                "max_output_tokens": echo.get("max_output_tokens"), "max_tool_calls": None,
                "previous_response_id": None, "prompt": None, "reasoning": None, "service_tier": "auto",
                "status": status, "text": None, "top_logprobs": None, "truncation": "disabled", "usage": usage,
                "user": None, "presence_penalty": 0.0, "frequency_penalty": 0.0, "kv_transfer_params": None,
                "ec_transfer_params": None, "input_messages": None, "output_messages": None}

    def _item(self, text: str | None) -> dict:
        content = [] if text is None else [self._part(text, None)]
        return {"id": self.item_id, "content": content, "role": "assistant",
                "status": "in_progress" if text is None else "completed", "type": "message", "phase": None}

    @staticmethod
    def _part(text: str, logprobs: list | None) -> dict:
        return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "input_tokens_per_turn": [],
                                         "cached_tokens_per_turn": []},
                "output_tokens": completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                          "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []},
                "total_tokens": prompt_tokens + completion_tokens}

    def full(self, choices, prompt_tokens, completion_tokens):
        (text, finish), = choices
        return self._response("completed", [self._item(text)], self._usage(prompt_tokens, completion_tokens), finish)

    def _event(self, name: str, fields: dict) -> bytes:
        # the event models declare their fields alphabetically
        obj = dict(sorted((fields | {"sequence_number": self.seq, "type": name}).items()))
        self.seq += 1
        return event(name, obj)

    def start(self):
        pending = self._response("in_progress", [], None, None)
        return [self._event("response.created", {"response": pending}),
                self._event("response.in_progress", {"response": pending}),
                self._event("response.output_item.added", {"item": self._item(None), "output_index": 0}),
                self._event("response.content_part.added", {"content_index": 0, "item_id": self.item_id,
                                                             "output_index": 0, "part": self._part("", [])})]

    def token(self, index, i, text, finish):
        self.text.append(text)
        self.finish = finish
        return [self._event("response.output_text.delta", {"content_index": 0, "delta": text, "item_id": self.item_id,
                                                           "logprobs": [], "output_index": 0})]

    def end(self, prompt_tokens, completion_tokens):
        text = "".join(self.text)
        ids = {"content_index": 0, "item_id": self.item_id}
        return [self._event("response.output_text.done", ids | {"logprobs": [], "output_index": 0, "text": text}),
                self._event("response.content_part.done", ids | {"output_index": 0, "part": self._part(text, None)}),
                self._event("response.output_item.done", {"item": self._item(text), "output_index": 0}),
                self._event("response.completed", {"response": self._response(
                    "completed", [self._item(text)], self._usage(prompt_tokens, completion_tokens),
                    self.finish)})]
