"""Reading request bodies the way vLLM 0.32 does: field validation, the served-model check, exact prompt
counts and the context-window rules, in vLLM's order (body validation, model 404, max_tokens over the
window, prompt characters, prompt tokens, the max_tokens that is left).

Pure functions over parsed JSON; no HTTP types. Errors are ``RequestError`` (``errors``) carrying
vLLM's status, type, param and wording; the HTTP layer only serialises them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extproc.engine.counting import Counted
from extproc.engine.errors import RequestError, not_found_model, validation_error
from extproc.engine.jsonbody import require_object
from extproc.engine.versions import VllmVersion

MAX_N = 16_384  # vLLM's VLLM_MAX_N_SEQUENCES default


@dataclass(frozen=True)
class Serving:
    """What reading a body needs to know about this engine."""

    served: tuple[str, ...]  # served model names; answers carry the first
    window: int  # max_model_len
    version: VllmVersion
    counter: Any  # extproc.engine.counting's counter


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request: a prompt count and a sampling limit per prompt, n sequences each."""

    api: str  # "chat", "completions", "responses" or "messages"
    model: str
    prompt_tokens: tuple[int, ...]
    limits: tuple[int, ...]  # max_tokens vLLM samples each prompt with (clamped to the window in 0.32+)
    requested: int | None  # the request's own max_tokens (None: the engine's output policy decides)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    echo: dict = field(default_factory=dict)  # request fields an answer repeats (/v1/responses)


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

    def output_tokens(self, requested: int | None, limit: int) -> tuple[int, str]:
        """Tokens to generate and the finish reason, given vLLM's sampling limit for the sequence."""
        if requested is not None or self.default_tokens is None or self.default_tokens >= limit:
            return limit, "length"
        return self.default_tokens, "stop"


# --- the four generation APIs ---------------------------------------------------------------------


def read_chat(body: Any, s: Serving) -> GenerationRequest:
    body = require_object(body)
    _stream_options_before_validation(body)
    model = _str_field(body, "model")
    messages = _list_field(body, "messages", required=True)
    _list_field(body, "tools")
    n = _int_field(body, "n")
    mct, mt = _int_field(body, "max_completion_tokens"), _int_field(body, "max_tokens")
    stream, include_usage, continuous = _stream_flags(body)
    _check_model(model, s)
    n = _check_n(n)
    requested, param = (mct, "max_completion_tokens") if mct is not None else (mt, "max_tokens")
    prompt = _prompt(s, "chat", body, requested, param)
    limit = s.version.output_limit(prompt, requested, s.window)
    return GenerationRequest("chat", s.served[0], (prompt,), (limit,), requested, n, stream, include_usage,
                             continuous)


def read_completion(body: Any, s: Serving) -> GenerationRequest:
    body = require_object(body)
    _stream_options_before_validation(body)
    model = _str_field(body, "model")
    _prompts(body)
    n = _int_field(body, "n")
    requested = _int_field(body, "max_tokens")
    stream, include_usage, continuous = _stream_flags(body)
    _check_model(model, s)
    n = _check_n(n)
    s.version.check_requested(requested, "max_tokens", s.window)
    # token ids go to the model as they are (exact count, no BOS); each prompt checked in order
    counts = [_checked(s, c, requested) for c in _count(s, "completions", body)]
    limits = tuple(s.version.output_limit(c, requested, s.window) for c in counts)
    return GenerationRequest("completions", s.served[0], tuple(counts), limits, requested, n, stream, include_usage,
                             continuous)


def read_responses(body: Any, s: Serving) -> GenerationRequest:
    body = require_object(body)
    model = _str_field(body, "model")
    requested = _int_field(body, "max_output_tokens")
    stream = _bool_field(body, "stream")
    if body.get("input") is None:
        raise validation_error("missing", ("body", "input"), "Field required", body)
    _check_model(model, s)
    prompt = _prompt(s, "responses", body, requested, "max_output_tokens")
    limit = s.version.output_limit(prompt, requested, s.window)
    echo = {"max_output_tokens": requested,
            "temperature": _float_field(body, "temperature", 1.0), "top_p": _float_field(body, "top_p", 1.0)}
    return GenerationRequest("responses", s.served[0], (prompt,), (limit,), requested, 1, stream, stream, False, echo)


def read_messages(body: Any, s: Serving) -> GenerationRequest:
    body = require_object(body)
    model = _str_field(body, "model", required=True)
    _list_field(body, "messages", required=True)
    requested = _int_field(body, "max_tokens", required=True)
    stream = _bool_field(body, "stream")
    _check_model(model, s)
    # vLLM passes max_tokens on as max_tokens and max_completion_tokens; the check over the
    # window names the latter (the "at least 1" one, max_tokens: tests/budget/vllm_messages)
    prompt = _prompt(s, "messages", body, requested, "max_completion_tokens")
    limit = s.version.output_limit(prompt, requested, s.window)
    # vLLM streams /v1/messages as a chat stream with include_usage and continuous_usage_stats
    return GenerationRequest("messages", s.served[0], (prompt,), (limit,), requested, 1, stream, stream, stream)


# --- counting only --------------------------------------------------------------------------------


def read_count_tokens(body: Any, s: Serving) -> int:
    """/v1/messages/count_tokens: the prompt of a Messages request, checked against the window."""
    body = require_object(body)
    model = _str_field(body, "model", required=True)
    _list_field(body, "messages", required=True)
    _check_model(model, s)
    # counted as the Messages request it would be (its max_tokens changes no count)
    return _prompt(s, "messages", dict(body, max_tokens=1), None, "max_tokens")


def read_tokenize(body: Any, s: Serving) -> list[int]:
    """/tokenize: a chat (``messages``) or a prompt, tokenized whole (no window applies)."""
    body = require_object(body)
    model = _str_field(body, "model")
    if "messages" in body:
        _list_field(body, "messages", required=True)
        _list_field(body, "tools")
        _check_model(model, s)
        try:
            return s.counter.encode_chat(body)
        except (ValueError, TypeError) as exc:  # the template's TemplateError is a ValueError
            raise RequestError(str(exc)) from None
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise validation_error("missing" if prompt is None else "string_type", ("body", "prompt"),
                               "Field required" if prompt is None else "Input should be a valid string",
                               body if prompt is None else prompt)
    add_special = _bool_field(body, "add_special_tokens", True)
    _check_model(model, s)
    return s.counter.encode_prompt(prompt, add_special)


# --- prompts and the window -----------------------------------------------------------------------


def _prompt(s: Serving, api: str, body: dict, requested: int | None, param: str) -> int:
    """The one prompt of a chat-like request, checked against the window."""
    s.version.check_requested(requested, param, s.window)
    (counted,) = _count(s, api, body)
    return _checked(s, counted, requested)


def _count(s: Serving, api: str, body: dict) -> list[Counted]:
    # 0.32+ tokenizes a text prompt only to window + 1 (and not at all past the character bound);
    # older releases counted it whole.
    try:
        return s.counter.count_request(api, body, stop_after=s.window if s.version.clamps_max_tokens else None)
    except RequestError:
        raise
    except (ValueError, TypeError) as exc:  # the template's TemplateError is a ValueError
        raise RequestError(str(exc)) from None


def _checked(s: Serving, counted: Counted, requested: int | None) -> int:
    if counted.ids:
        s.version.check_prompt(counted.tokens, requested, s.window, exact=True)
        return counted.tokens
    s.version.check_text_length(counted.chars, s.window, s.counter.max_chars_per_token)
    assert counted.tokens is not None  # only untokenized past the character bound, refused just above
    stopped = s.version.clamps_max_tokens and counted.tokens > s.window  # counting stopped at window + 1
    s.version.check_prompt(counted.tokens, requested, s.window, exact=not stopped)
    return counted.tokens


def _prompts(body: dict) -> list[str | list[int]]:
    """The prompt field's shape, checked (the counter reads the prompts themselves)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(_is_token_id(t) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
            return prompt
    if prompt is None:
        raise RequestError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    raise validation_error("string_type", ("body", "prompt"), "Input should be a valid string", prompt)


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


# --- fields, checked as pydantic would ------------------------------------------------------------


def _check_model(model: str | None, s: Serving) -> None:
    if model and model not in s.served:
        raise not_found_model(model, s.served)


def _check_n(n: int | None) -> int:
    n = 1 if n is None else n
    if n < 1:
        raise RequestError(f"n must be at least 1, got {n}.")
    if n > MAX_N:
        raise RequestError(f"n must be at most {MAX_N}, got {n}. To increase this limit, set the "
                           "VLLM_MAX_N_SEQUENCES environment variable.")
    return n


def _missing(body: dict, name: str) -> RequestError:
    return validation_error("missing", ("body", name), "Field required", body)


def _str_field(body: dict, name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _missing(body, name)
        return None
    if not isinstance(value, str):
        raise validation_error("string_type", ("body", name), "Input should be a valid string", value)
    return value


def _list_field(body: dict, name: str, required: bool = False) -> list | None:
    value = body.get(name)
    if value is None:
        if required and name not in body:
            raise _missing(body, name)
        if required:
            raise validation_error("list_type", ("body", name), "Input should be a valid list", value)
        return None
    if not isinstance(value, list):
        raise validation_error("list_type", ("body", name), "Input should be a valid list", value)
    return value


def _int_field(body: dict, name: str, required: bool = False) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _missing(body, name)
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise validation_error("int_parsing", ("body", name),
                                   "Input should be a valid integer, unable to parse string as an integer",
                                   value) from None
    if isinstance(value, float):
        raise validation_error("int_from_float", ("body", name),
                               "Input should be a valid integer, got a number with a fractional part", value)
    raise validation_error("int_type", ("body", name), "Input should be a valid integer", value)


def _float_field(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise validation_error("float_type", ("body", name), "Input should be a valid number", value)


def _bool_field(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if value in (0, 1) and isinstance(value, int):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off", "t", "f",
                                                       "y", "n"):
        return value.lower() in ("true", "1", "yes", "on", "t", "y")
    raise validation_error("bool_parsing" if isinstance(value, str) else "bool_type", ("body", name),
                           "Input should be a valid boolean, unable to interpret input" if isinstance(value, str)
                           else "Input should be a valid boolean", value)


def _stream_options_before_validation(body: dict) -> None:
    # a pydantic "before" validator in vLLM: runs ahead of every field check
    if body.get("stream_options") and not body.get("stream"):
        raise RequestError("Stream options can only be defined when `stream=True`.", param="stream_options")


def _stream_flags(body: dict) -> tuple[bool, bool, bool]:
    stream = _bool_field(body, "stream")
    options = body.get("stream_options")
    if options is None or not stream:
        return stream, False, False
    if not isinstance(options, dict):
        raise validation_error("model_type", ("body", "stream_options"),
                               "Input should be a valid dictionary or instance of StreamOptions", options)
    include = _bool_field(options, "include_usage", False)
    continuous = _bool_field(options, "continuous_usage_stats", False)
    return stream, include, include and continuous
