"""/v1/responses and /v1/messages bodies as the chat messages vLLM renders for them (vLLM serves both
by converting to a chat completion). Used by the interim counter only: the exact counter in
``extproc.tokens`` reads these APIs itself (``count_request``)."""

from __future__ import annotations

import json
from typing import Any

from extproc.engine.errors import validation_error


def _text(content: Any) -> Any:
    """A content-part list reduced to its text parts (the chat templates join them)."""
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
    return parts


def responses_to_chat(body: dict) -> list[dict]:
    items = body.get("input")
    if items is None:
        raise validation_error("missing", ("body", "input"), "Field required", body)
    messages: list[dict] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise validation_error("string_type", ("body", "input"), "Input should be a valid string", items)
    for item in items:
        if not isinstance(item, dict):
            raise validation_error("model_type", ("body", "input"), "Input should be a valid dictionary", item)
        kind = item.get("type", "message")
        if kind == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "{}")}}]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text(item.get("output", ""))})
        else:
            role = item.get("role", "user")
            messages.append({"role": "system" if role == "developer" else role, "content": _text(item.get("content"))})
    return messages


def responses_tools(body: dict) -> list | None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
            for t in tools if isinstance(t, dict) and t.get("type") == "function"] or None


def anthropic_to_chat(body: dict) -> tuple[list[dict], list | None]:
    messages: list[dict] = []
    system = body.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": system})
    elif isinstance(system, list):
        messages.append({"role": "system", "content": "".join(
            b.get("text", "") for b in system if isinstance(b, dict) and isinstance(b.get("text"), str))})
    for m in body.get("messages") or []:
        if not isinstance(m, dict):
            raise validation_error("model_type", ("body", "messages"), "Input should be a valid dictionary", m)
        content = m.get("content")
        if not isinstance(content, list):
            messages.append({"role": m.get("role", "user"), "content": content})
            continue
        text, calls = [], []
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                text.append({"type": "text", "text": block["text"]})
            elif block.get("type") == "tool_use":
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name", ""),
                                           "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
            elif block.get("type") == "tool_result":
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                 "content": _text(block.get("content", ""))})
        if text or calls or not content:
            message: dict[str, Any] = {"role": m.get("role", "user"), "content": text}
            if calls:
                message["tool_calls"] = calls
            messages.append(message)
    tools = body.get("tools")
    chat_tools = [{"type": "function", "function": {"name": t.get("name", ""), "description": t.get("description", ""),
                                                    "parameters": t.get("input_schema", {})}}
                  for t in tools if isinstance(t, dict)] if isinstance(tools, list) and tools else None
    return messages, chat_tools
