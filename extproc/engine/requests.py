"""Reading OpenAI request bodies the way vLLM does: validation, exact prompt counts, the context check.

Pure functions over parsed JSON; no HTTP types. Errors are ``RequestError`` carrying vLLM's status,
error type and message, so the HTTP layer only has to serialise them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from extproc import chat_tokens


class RequestError(Exception):
    """A request vLLM would refuse, with the status and error type it would answer with."""

    def __init__(self, message: str, *, status: int = 400, err_type: str = "BadRequestError",
                 param: str | None = None, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param
        self.reason = reason  # metrics label: why the engine refused it


@dataclass(frozen=True)
class GenerationRequest:
    """What the engine needs from one request body: one entry in prompt_tokens per sequence."""

    endpoint: str  # "chat" or "completions"
    model: str
    prompt_tokens: tuple[int, ...]
    requested_output_tokens: int | None  # max_completion_tokens, else max_tokens; None when absent
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class OutputPolicy:
    """How many tokens to generate when the request sets no max_tokens (vLLM would run to the window;
    a real model stops earlier, so the simulated length is a policy). ``None`` runs to the window."""

    default_tokens: int | None = 256

    def __post_init__(self) -> None:
        if self.default_tokens is not None and self.default_tokens < 1:
            raise ValueError("the default output length must be >= 1 token")

    @classmethod
    def parse(cls, text: str) -> OutputPolicy:
        """``"256"`` (at most 256 tokens) or ``"max"`` (up to max_model_len - prompt)."""
        if text.strip().lower() == "max":
            return cls(None)
        try:
            return cls(int(text))
        except ValueError:
            raise ValueError(f"output tokens must be a positive integer or 'max', got {text!r}") from None

    def output_tokens(self, requested: int | None, room: int) -> tuple[int, str]:
        """Tokens to generate and the finish reason vLLM would report."""
        if requested is not None:
            return requested, "length"
        if self.default_tokens is None or self.default_tokens >= room:
            return room, "length"
        return self.default_tokens, "stop"


def parse_json(raw: bytes) -> dict:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"Invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    return body


def context_length_message(max_model_len: int, prompt_tokens: int, output_tokens: int) -> str:
    """vLLM's current (≈ v0.25+) wording for a request longer than the context window."""
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{output_tokens} output tokens and your prompt contains {prompt_tokens} input tokens, for a "
        f"total of {prompt_tokens + output_tokens} tokens. Please reduce the length of the input "
        f"prompt or the number of requested output tokens."
    )


def check_context(prompt_tokens: int, requested_output: int | None, max_model_len: int) -> None:
    """Raise vLLM's 400 when prompt + requested output exceeds the window, or the prompt alone fills it."""
    output = requested_output or 0
    if prompt_tokens >= max_model_len or prompt_tokens + output > max_model_len:
        raise RequestError(context_length_message(max_model_len, prompt_tokens, output),
                           param="input_tokens" if prompt_tokens >= max_model_len else None,
                           reason="context_length")


def read_chat(body: dict, served_model: str) -> GenerationRequest:
    """A /v1/chat/completions body; prompt tokens counted with the served model's chat template."""
    model = _model(body, served_model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("Field required: 'messages' must be a non-empty list of messages.",
                           param="messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("Each message must be an object with a string 'role'.", param="messages")
    _only_one_choice(body)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("'tools' must be a list.", param="tools")
    family = chat_tokens.family_for_model(served_model)
    count = chat_tokens.count_chat(messages, family, tools or None)
    requested = _requested_output(body, ("max_completion_tokens", "max_tokens"))
    stream, include_usage = _stream_flags(body)
    return GenerationRequest("chat", model, (count,), requested, stream, include_usage)


def read_completion(body: dict, served_model: str) -> GenerationRequest:
    """A /v1/completions body: prompt as a string, strings, token ids, or lists of token ids."""
    model = _model(body, served_model)
    _only_one_choice(body)
    family = chat_tokens.family_for_model(served_model)
    counts = tuple(_prompt_counts(body.get("prompt"), family))
    requested = _requested_output(body, ("max_tokens",))
    stream, include_usage = _stream_flags(body)
    return GenerationRequest("completions", model, counts, requested, stream, include_usage)


def _prompt_counts(prompt: Any, family: str) -> list[int]:
    if isinstance(prompt, str):
        return [chat_tokens.count_completion(prompt, family)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [chat_tokens.count_completion(p, family) for p in prompt]
        if all(_is_token_id(t) for t in prompt):
            return [len(prompt)]  # token ids go to the model as they are: no BOS added
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
            return [len(p) for p in prompt]
    raise RequestError("'prompt' must be a string, a list of strings, a list of token ids, or a list "
                       "of lists of token ids, and must not be empty.", param="prompt")


def _only_one_choice(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        # Refused rather than ignored: a client asking for n choices would get silently wrong usage.
        raise RequestError("The simulated engine supports only n=1.", param="n")


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _model(body: dict, served_model: str) -> str:
    model = body.get("model", served_model)
    if model is None:
        return served_model
    if model != served_model:
        raise RequestError(f"The model `{model}` does not exist.", status=404, err_type="NotFoundError",
                           param="model", reason="unknown_model")
    return model


def _requested_output(body: dict, fields: tuple[str, ...]) -> int | None:
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError(f"'{field}' must be an integer.", param=field)
        if value < 1:
            raise RequestError(f"max_tokens must be at least 1, got {value}.", param=field)
        return value
    return None


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise RequestError("Stream options can only be defined when `stream=True`.", param="stream_options")
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object.", param="stream_options")
    return stream, bool(options.get("include_usage", False))
