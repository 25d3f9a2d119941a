"""The errors the engine answers with, worded and typed the way vLLM 0.32's API server words them.

Three kinds, as in vLLM: a ``VLLMValidationError`` (type ``BadRequestError``, message suffixed with
``(parameter=..., value=...)``), a FastAPI request-validation error (type ``Bad Request``, pydantic's
error dicts in the message) and an ``HTTPException`` (type = the status phrase).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class RequestError(Exception):
    """A request vLLM would refuse, with the status, error type and param it would answer with."""

    def __init__(self, message: str, *, status: int = 400, err_type: str = "BadRequestError",
                 param: str | None = None, value: Any = None, reason: str = "bad_request",
                 suffix: bool = True) -> None:
        if suffix and (param is not None or value is not None):
            extras = [f"parameter={param}"] if param is not None else []
            extras += [f"value={value}"] if value is not None else []
            message = f"{message} ({', '.join(extras)})"
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param
        self.reason = reason  # metrics label: why the engine refused it


def http_error(status: int, detail: str, reason: str = "bad_request") -> RequestError:
    """What FastAPI's HTTPException becomes in vLLM: type is the status phrase, no param."""
    return RequestError(detail, status=status, err_type=HTTPStatus(status).phrase, reason=reason, suffix=False)


def _summary(value: Any) -> Any:
    """vLLM's bounded stand-in for a pydantic error's ``input`` (containers described, not rendered)."""
    if isinstance(value, str):
        return value[:200] + "...[truncated]" if len(value) > 200 else value
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text[:200] + "...[truncated]" if len(text) > 200 else text


def validation_error(kind: str, loc: tuple, msg: str, value: Any, ctx: dict | None = None) -> RequestError:
    """One pydantic/FastAPI validation error, rendered the way vLLM's validation handler renders it."""
    param = ".".join(str(p) for p in loc)
    err: dict[str, Any] = {"type": kind, "loc": param, "msg": msg, "input": _summary(value)}
    if ctx is not None:
        err["ctx"] = ctx
    return RequestError(f"1 validation error:\n  {err}", err_type=HTTPStatus.BAD_REQUEST.phrase, param=param,
                        suffix=False)


def not_found_model(model: Any, served: tuple[str, ...]) -> RequestError:
    return RequestError(f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.", status=404,
                        err_type="NotFoundError", param="model", reason="unknown_model", suffix=False)
