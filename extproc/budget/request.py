"""Reading an OpenAI-compatible request body into the shape the estimator needs.

One parse per body (orjson: C speed, and its ``str`` values are already decoded, so a body
written with ``\\uXXXX`` escapes is measured on its real text, not on its escape bytes). The
walk collects text by kind (prose/code/etc. text, JSON such as tool schemas and call arguments,
output schemas), counts turns and media parts, and reads the output reserve fields. Features
are then measured once per kind per prompt.

Nothing here raises on a bad body: :func:`read_request` returns a shape whose ``error`` says
why it could not be read, and the policy sends such a request to the largest pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import orjson

from .features import measure_sampled, sample, utf8_len
from .specials import NONE, SpecialTokens

MAX_OUTPUT_TOKENS = 1 << 31  # larger requested outputs are clamped (they fit no pool anyway)
_MODEL_NAME_MAX = 200

_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal", "summary_text",
                              "reasoning_text"})
_MEDIA_PART_TYPES = frozenset({"image_url", "input_image", "image", "input_audio", "audio",
                               "input_file", "file", "video_url", "input_video"})
# Roles every template renders in its per-turn header; any other role name is rendered too (by
# Llama-3's template, as its header text) and is counted as text.
_PLAIN_ROLES = frozenset({"system", "developer", "user", "assistant"})
# A chat message made only of these is rendered as its text (role names and names counted) plus a
# few tokens per turn, which is what the size bound assumes.
_PLAIN_MESSAGE_KEYS = frozenset({"role", "content", "name"})
_TEMPLATE_ARGS = ("chat_template", "chat_template_kwargs", "documents")
_RESERVE_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# /v1/messages: vLLM's Anthropic request model has max_tokens only (required there)
_MESSAGES_RESERVE_FIELDS = ("max_tokens",)
# vLLM drops system text blocks that start with this (Claude Code's per-request attribution)
_BILLING_HEADER = "x-anthropic-billing-header"


@dataclass(slots=True)
class Prompt:
    """One sequence the engine will hold in its KV cache (a batched completion has several)."""

    text_features: np.ndarray | None = None    # byte-class features of free text (all messages joined)
    json_features: np.ndarray | None = None    # ... of JSON the template renders (tools, arguments)
    schema_features: np.ndarray | None = None  # ... of output schemas (response_format)
    text_bytes: int = 0                  # UTF-8 bytes of everything measured (special-token strings too)
    special: float = 0                   # special-token strings typed in the text: one token each
    messages: int = 0                    # chat turns (the template adds tokens per turn)
    chat: int = 0                        # 1 when a chat template wraps the prompt
    media: int = 0                       # image/audio/file parts
    tools: int = 0                       # tool/function definitions (the template wraps each)
    measured_on_sample: bool = False     # features measured on a sample of a very long text
    exact_tokens: int | None = None      # token-id prompts carry their exact length
    unmeasured: dict[str, str] | None = None  # joined text per kind until measure() (then dropped)

    def measure(self, specials: SpecialTokens = NONE) -> "Prompt":
        """Measure the features of the gathered text (once), then let the text go. ``specials``:
        the family's special-token strings, counted apart and cut out of the measured text."""
        if self.unmeasured:
            for kind, joined in self.unmeasured.items():
                part, factor = sample(joined)  # (a very long text: evenly spaced blocks, counts scaled up)
                part, found = specials.split(part)
                self.special += found * factor
                setattr(self, f"{kind}_features", measure_sampled(part, factor))
                self.measured_on_sample |= factor != 1.0
        self.unmeasured = None
        return self


@dataclass(slots=True)
class RequestShape:
    api: str                             # "chat", "completions", "responses", "messages", "count_tokens", "unknown"
    model: str = ""
    prompts: list[Prompt] = field(default_factory=list)
    output_tokens: int | None = None     # requested output reserve, when the body gives one
    output_field: str | None = None      # which field gave it
    notes: list[str] = field(default_factory=list)  # non-fatal oddities, e.g. an invalid max_tokens
    error: str | None = None             # why the body could not be read
    # True when the prompt's template may render more than the text gathered here: message fields
    # beyond role/content/name (tool ids, tool calls, reasoning), a role that is not a string,
    # template arguments, documents, or the Responses API's items. The size bound does not hold
    # then (router.py). Role names and names are gathered as text, so they keep it.
    template_extras: bool = False


class _Collector:
    """Text of one prompt, gathered by kind before measuring each kind once."""

    __slots__ = ("text", "json", "schema", "messages", "media", "chat", "tools")

    def __init__(self, chat: int) -> None:
        self.text: list[str] = []
        self.json: list[str] = []
        self.schema: list[str] = []
        self.messages = 0
        self.media = 0
        self.tools = 0
        self.chat = chat

    def add_json(self, value: object) -> None:
        if isinstance(value, str):
            self.json.append(value)
        elif value is not None:
            self.json.append(_dumps(value))

    def add_content(self, content: object) -> None:
        if content is None:
            return
        if isinstance(content, str):
            self.text.append(content)
        elif isinstance(content, list):
            for part in content:
                self.add_part(part)
        else:
            self.add_json(content)

    def add_part(self, part: object) -> None:
        if isinstance(part, str):
            self.text.append(part)
            return
        if not isinstance(part, dict):
            self.add_json(part)
            return
        kind = part.get("type")
        if not isinstance(kind, str):
            kind = None
        if kind in _MEDIA_PART_TYPES:
            self.media += 1
            return
        for key in ("text", "refusal"):
            value = part.get(key)
            if isinstance(value, str):
                self.text.append(value)
                return
        if kind in _TEXT_PART_TYPES:
            return  # a text part with no text: nothing to count
        self.add_json(part)  # unknown part: count its JSON rather than silently nothing

    def add_tool_calls(self, calls: object) -> None:
        if not isinstance(calls, list):
            self.add_json(calls)
            return
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                name = fn.get("name")
                if isinstance(name, str):
                    self.text.append(name)
                self.add_json(fn.get("arguments"))
            else:
                self.add_json(call)

    def finish(self) -> Prompt:
        """The prompt with its text joined per kind (each kind is measured once, on all its
        segments, by ``Prompt.measure``)."""
        p = Prompt(messages=self.messages, chat=self.chat, media=self.media, tools=self.tools)
        p.unmeasured = {kind: "\n".join(parts) for kind in ("text", "json", "schema")
                        if (parts := getattr(self, kind))}
        p.text_bytes = sum(utf8_len(joined) for joined in p.unmeasured.values())
        return p


def _dumps(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return str(value)


def _read_chat(body: dict, shape: RequestShape) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        shape.error = "messages missing or not a list"
        return
    c = _Collector(chat=1)
    shape.template_extras |= any(key in body for key in _TEMPLATE_ARGS)
    for m in messages:
        if not isinstance(m, dict):
            shape.error = "a message is not an object"
            return
        role = m.get("role")
        shape.template_extras |= not isinstance(role, str) or not m.keys() <= _PLAIN_MESSAGE_KEYS
        c.messages += 1
        if isinstance(role, str):
            if role not in _PLAIN_ROLES:
                c.text.append(role)  # a template prints the role's name in the turn's header
        elif role is not None:
            c.add_json(role)
        c.add_content(m.get("content"))
        for key in ("name", "reasoning_content", "reasoning"):
            value = m.get(key)
            if isinstance(value, str):
                c.text.append(value)
        if "tool_calls" in m:
            c.add_tool_calls(m["tool_calls"])
        if "function_call" in m:
            c.add_tool_calls([{"function": m["function_call"]}])
    _read_tools(body, c)
    if body.get("documents") is not None:  # templates that take documents print them
        c.add_json(body["documents"])
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in ("json_schema", "json_object"):
        c.schema.append(_dumps(rf.get("json_schema") or rf))
    for key in ("guided_json", "guided_grammar", "guided_regex", "structured_outputs"):
        if key in body:
            c.schema.append(_dumps(body[key]))
    shape.prompts.append(c.finish())


def _read_tools(body: dict, c: _Collector) -> None:
    for key in ("tools", "functions"):
        tools = body.get(key)
        if isinstance(tools, list):
            c.tools += len(tools)
            for tool in tools:
                c.add_json(tool)
        elif tools is not None:
            c.add_json(tools)


def _read_responses(body: dict, shape: RequestShape) -> None:
    if body.get("previous_response_id") or body.get("conversation"):
        # The prompt includes history stored server-side that the body does not carry.
        shape.error = "continues stored state (previous_response_id or conversation): size unknown"
        return
    c = _Collector(chat=1)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        c.messages += 1
        c.text.append(instructions)
    inp = body.get("input")
    if isinstance(inp, str):
        c.messages += 1
        c.text.append(inp)
    elif isinstance(inp, list):
        for item in inp:
            c.messages += 1
            if isinstance(item, str):
                c.text.append(item)
            elif not isinstance(item, dict):
                c.add_json(item)
            elif "content" in item:
                c.add_content(item["content"])
            elif item.get("type") == "function_call":
                c.add_tool_calls([{"function": item}])
            elif "output" in item:
                c.add_content(item["output"])
            elif "summary" in item:
                c.add_content(item["summary"])
            else:
                c.add_json(item)
    elif inp is not None:
        shape.error = "input is neither a string nor a list"
        return
    if not c.messages:
        shape.error = "no input or instructions"
        return
    _read_tools(body, c)
    text_cfg = body.get("text")
    if isinstance(text_cfg, dict) and isinstance(text_cfg.get("format"), dict):
        if text_cfg["format"].get("type") == "json_schema":
            c.schema.append(_dumps(text_cfg["format"]))
    shape.prompts.append(c.finish())


def _read_messages(body: dict, shape: RequestShape) -> None:
    """Anthropic Messages (``/v1/messages``), gathered as vLLM 0.32 turns it into a chat
    (``entrypoints/anthropic/serving.py``): the top-level ``system`` is one system turn; each
    message a turn; a user's ``tool_result`` a tool turn of its own. What the chat template
    renders beyond the gathered text (tool calls, tool ids, template arguments) sets
    ``template_extras``, as for a chat."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        shape.error = "messages missing or not a list"
        return
    c = _Collector(chat=1)
    shape.template_extras |= body.get("chat_template_kwargs") is not None
    system = body.get("system")
    if system:
        c.messages += 1
        _add_system(c, system)
    for m in messages:
        if not isinstance(m, dict):
            shape.error = "a message is not an object"
            return
        role, content = m.get("role"), m.get("content")
        c.messages += role != "user" or not isinstance(content, list) or any(map(_is_part, content))
        if role == "system":
            _add_system(c, content)
            continue
        if role not in ("user", "assistant"):
            shape.template_extras = True  # vLLM refuses it; measured, never bounded
            c.add_json(role)
        if isinstance(content, list):
            for block in content:
                shape.template_extras |= _add_block(c, block, role)
        else:
            c.add_content(content)
    _read_message_tools(body.get("tools"), c)
    output = body.get("output_config")
    fmt = output.get("format") if isinstance(output, dict) else None
    if isinstance(fmt, dict) and fmt.get("schema") is not None:  # becomes response_format json_schema
        c.schema.append(_dumps(fmt["schema"]))
    shape.prompts.append(c.finish())


def _is_part(block: object) -> bool:
    """A block that becomes part of its message's content (a user message made only of
    tool_results is no turn of its own: vLLM sends only their tool turns)."""
    return not isinstance(block, dict) or block.get("type") != "tool_result"


def _add_system(c: _Collector, system: object) -> None:
    """System text: a string or text blocks (vLLM joins them with nothing and drops billing
    headers, which are left out here too). Other blocks there are measured as JSON."""
    for block in system if isinstance(system, list) else [system]:
        text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else block
        if isinstance(text, str):
            if not text.startswith(_BILLING_HEADER):
                c.text.append(text)
        elif text is not None:
            c.add_json(text)


def _add_block(c: _Collector, block: object, role: object) -> bool:
    """One content block of a user or assistant message. True where the template renders more
    than the text gathered (a tool call's JSON, a tool turn's id): the size bound is off then."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text" or kind == "thinking":  # thinking: the turn's reasoning, which templates may print
        value = block.get(kind)
        if isinstance(value, str):
            c.text.append(value)
        elif value is not None:
            c.add_json(value)
        return False
    if kind == "image":
        c.media += 1
        return False
    if kind in ("redacted_thinking", "tool_reference"):
        return False  # vLLM drops both
    if kind == "tool_use":  # a tool call: its name, its input as arguments JSON
        name = block.get("name")
        if isinstance(name, str):
            c.text.append(name)
        c.add_json(block.get("input") or {})
        return True
    if kind == "tool_result":
        _add_tool_result(c, block.get("content"), role == "user")
        return True
    c.add_part(block)  # anything else (vLLM refuses it): measured as the chat reader measures it
    return True


def _add_tool_result(c: _Collector, content: object, own_turn: bool) -> None:
    """A user's tool_result is a tool turn of its own (and its images a user turn after it);
    an assistant's becomes "Tool result: " and Python's ``str()`` of its content."""
    if not own_turn:
        c.text.append("Tool result: ")
        if isinstance(content, str):
            c.text.append(content)
        elif content:
            c.add_json(content)  # str() of a list of dicts: not the text's bytes, so no bound
        return
    c.messages += 1
    if isinstance(content, list):
        images = 0
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "image":
                images += 1
            elif kind == "text" and isinstance(item.get("text"), str):
                c.text.append(item["text"])
            elif kind is not None:
                c.add_json(item)
        c.media += images
        c.messages += images > 0
    else:
        c.add_content(content)


def _read_message_tools(tools: object, c: _Collector) -> None:
    """Anthropic tools, measured in the chat tool shape vLLM renders them in (``input_schema``
    becomes ``parameters``), so that tool JSON is measured alike on both APIs."""
    if not isinstance(tools, list):
        c.add_json(tools)
        return
    c.tools += len(tools)
    for tool in tools:
        if isinstance(tool, dict):
            fn = {k: tool[k] for k in ("name", "description") if k in tool}
            fn["parameters"] = tool.get("input_schema")
            tool = {"type": "function", "function": fn}
        c.add_json(tool)


def _is_token_ids(value: list) -> bool:
    return all(type(t) is int for t in value)


def _read_completions(body: dict, shape: RequestShape) -> None:
    prompt = body.get("prompt")
    suffix = body.get("suffix") if isinstance(body.get("suffix"), str) else None
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = [prompt] if _is_token_ids(prompt) else prompt
    else:
        shape.error = "prompt missing, empty or of the wrong type"
        return
    for item in items:
        if isinstance(item, str):
            c = _Collector(chat=0)
            c.text.append(item)
            if suffix:
                c.text.append(suffix)
            p = c.finish()
        elif isinstance(item, list) and _is_token_ids(item):
            p = Prompt(exact_tokens=len(item))
        else:
            shape.error = "prompt list holds something other than strings or token ids"
            return
        shape.prompts.append(p)


def _read_output_reserve(body: dict, shape: RequestShape) -> None:
    fields = _MESSAGES_RESERVE_FIELDS if shape.api == "messages" else _RESERVE_FIELDS
    for key in fields:
        if key not in body or body[key] is None:
            continue
        value = body[key]
        if type(value) is float and value.is_integer():
            value = int(value)
        if type(value) is not int or value < 0:
            shape.notes.append(f"invalid {key}")
            continue
        shape.output_tokens = min(value, MAX_OUTPUT_TOKENS)
        shape.output_field = key
        return


def _lenient_loads(body) -> object | None:
    """The standard library's parser, for the bodies orjson refuses but vLLM's Python server
    accepts (lone UTF-16 surrogates in escapes). Only reached on a body orjson rejected."""
    import json

    try:
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray, memoryview)) else body
        if "\\ud" not in text and "\\uD" not in text:
            return None  # not the surrogate case: genuinely invalid
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError, AttributeError):
        return None


def api_for_path(path: str) -> str:
    p = path.split("?", 1)[0].rstrip("/")
    if p.endswith("/chat/completions"):
        return "chat"
    if p.endswith("/completions"):
        return "completions"
    if p.endswith("/responses"):
        return "responses"
    if p.endswith("/messages"):
        return "messages"
    if p.endswith("/messages/count_tokens"):
        return "count_tokens"
    return "unknown"


def read_request(body: bytes | bytearray | memoryview | str, path: str = "/v1/chat/completions",
                 measured: bool = True) -> RequestShape:
    """Parse a request body once and collect everything the budget estimate needs.
    ``measured=False`` leaves each prompt's features to ``Prompt.measure`` (its sizes are known)."""
    api = api_for_path(path or "")
    shape = RequestShape(api=api)
    if not body:
        shape.error = "empty body"
        return shape
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = _lenient_loads(body)
        if doc is None:
            shape.error = "body is not valid JSON"
            return shape
    except RecursionError:
        shape.error = "body nested too deeply"
        return shape
    if not isinstance(doc, dict):
        shape.error = "body is not a JSON object"
        return shape
    model = doc.get("model")
    if isinstance(model, str):
        shape.model = model[:_MODEL_NAME_MAX]
    if api == "unknown":  # infer from the body's keys
        api = "chat" if "messages" in doc else "completions" if "prompt" in doc else \
            "responses" if "input" in doc else "unknown"
        shape.api = api
    try:
        if api == "chat":
            _read_chat(doc, shape)
        elif api == "completions":
            _read_completions(doc, shape)
        elif api == "responses":
            _read_responses(doc, shape)
        elif api == "messages":
            _read_messages(doc, shape)
        elif api == "count_tokens":
            # vLLM only renders and counts it: nothing is generated or held in a KV cache, and
            # any pool answers it. Like the paths Envoy sends past the router: the largest pool.
            shape.error = "count_tokens is not a generation: no budget"
        else:
            shape.error = "not an OpenAI chat, completions or responses body"
    except RecursionError:
        shape.error = "body nested too deeply"
    if shape.error:
        shape.prompts.clear()
        return shape
    _read_output_reserve(doc, shape)
    if shape.api == "messages" and doc.get("max_tokens") is None:
        # vLLM answers 400 (max_tokens is required) whichever pool gets it; routed on its
        # prompt with the default reserve, as a chat without one, not as unreadable
        shape.notes.append("max_tokens missing (required by /v1/messages)")
    if measured:
        for p in shape.prompts:
            p.measure()
    return shape
