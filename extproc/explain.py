"""``extproc explain``: each request body's decision with the numbers behind it, from a router
built here or, with ``--server``, from a running router's operator API (its Explain never
learns). Both give ``ExplainResponse`` messages, and one function formats them."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol

from .operator.v1 import operator_pb2 as pb

if TYPE_CHECKING:
    from .budget import Observation
    from .config import Config

TIMEOUT_S = 30.0
_MAX_MESSAGE = 64 << 20  # the router accepts bodies up to this size (service.app.MAX_MESSAGE)


@dataclass(slots=True)
class Explained:
    """One request's row: the decision and the prompt's true count, where one can be had."""

    response: pb.ExplainResponse
    true_tokens: int | None
    error: float | None  # |estimate − true| / true, for estimated decisions with a true count


class Explainer(Protocol):
    origin: str

    def explain(self, body: bytes, path: str) -> pb.ExplainResponse: ...

    def learn(self, true_tokens: int) -> None: ...

    def calibration(self, keys: dict[str, str]) -> dict[str, str]: ...

    def close(self) -> None: ...


class LocalExplainer:
    """A router of this process, with nothing in flight; learns each true count unless told not to."""

    def __init__(self, config: Config, learn: bool = True, snapshot: bytes | None = None) -> None:
        from .budget import BudgetRouter
        from .service.metrics import Metrics
        from .service.router import Router

        from .exact import ExactCounts

        budget = BudgetRouter(config.budget)
        if snapshot is not None:
            budget.restore_json(snapshot)
        self.exact = ExactCounts(config.exact)  # close decisions counted as the service counts them
        self.router = Router(budget, config.service, Metrics(budget.calibration_states), self.exact)
        self.learns = learn
        self.origin = "a local router" + ("" if learn else " that does not learn")
        self._last: Observation | None = None  # what the next true count is about
        self._loop = asyncio.new_event_loop()    # one loop: the pool source's connections live on it

    def explain(self, body: bytes, path: str) -> pb.ExplainResponse:
        from .service.operator import explain_response

        model = self.router.budget.read(body, path).model
        try:
            self.exact.warm(model)  # a command answers at once: its tokenizer loaded now, not in the background
        except Exception:  # noqa: BLE001 - no tokenizer files (offline): the estimate decides, as in the service
            pass
        placed = self._loop.run_until_complete(self.router.explain(body, path))
        self._last = placed.explanation.observation
        return explain_response(placed)

    def close(self) -> None:
        self._loop.run_until_complete(self.exact.close())
        self._loop.close()

    def learn(self, true_tokens: int) -> None:
        if self.learns and self._last is not None:
            self.router.budget.observe(self._last, true_tokens)

    def calibration(self, keys: dict[str, str]) -> dict[str, str]:
        budget = self.router.budget
        out = {}
        for model in keys:  # the key a model reads now: learning here may have made it since
            summary = budget.calibration(model)
            if summary:
                out[model] = json.dumps(summary)
        return out


class RemoteExplainer:
    """A running router's operator API: ``host:port`` of its gRPC side (service.grpc_address)."""

    def __init__(self, address: str, tls=None) -> None:
        """``tls``: an EnvoyTlsSettings to reach a router serving TLS (service/tls.py)."""
        import grpc

        from .operator.v1 import operator_pb2_grpc as pb_grpc

        options = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]
        if tls is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            from .service.tls import channel_credentials

            creds, more = channel_credentials(tls)
            self.channel = grpc.secure_channel(address, creds, options=options + more)
        self.stub = pb_grpc.OperatorStub(self.channel)
        self.origin = f"the router at {address}"

    def explain(self, body: bytes, path: str) -> pb.ExplainResponse:
        return self.stub.Explain(pb.ExplainRequest(body=body, path=path), timeout=TIMEOUT_S)

    def learn(self, true_tokens: int) -> None:
        pass  # Explain is a dry run: the router learns only from its own traffic

    def calibration(self, keys: dict[str, str]) -> dict[str, str]:
        held = {k.key: k.summary_json.decode() for k in self.stub.GetCalibration(
            pb.GetCalibrationRequest(), timeout=TIMEOUT_S).keys}
        return {model: held[key] for model, key in keys.items() if key in held}

    def close(self) -> None:
        self.channel.close()


def explain_all(explainer: Explainer, requests: Iterable[tuple[bytes, str, object]]) -> list[Explained]:
    """Explain each (raw body, path, parsed body) in order; a local explainer learns as it goes."""
    from .tokens import TemplateError, counter_for, family_for_model

    out = []
    for raw, path, body in requests:
        resp = explainer.explain(raw, path)
        true = None
        if isinstance(body, dict) and isinstance(body.get("messages"), list):
            try:
                true = counter_for(family_for_model(resp.model)).count_request(
                    "chat", body, enable_auto_tool_choice=True, tool_call_parser="hermes")[0]
            except TemplateError:  # a body vLLM would refuse: no true count
                true = None
        error = None
        if true and resp.source not in (pb.SOURCE_FALLBACK, pb.SOURCE_EXACT, pb.SOURCE_UNSPECIFIED):
            error = abs(resp.prompt_tokens - true) / true
            explainer.learn(true)
        out.append(Explained(resp, true, error))
    return out


def format_explained(rows: list[Explained], label: str, origin: str, calibration: dict[str, str],
                     as_json: bool = False) -> list[str]:
    """The lines ``extproc explain`` prints: a table with a summary, or one JSON object a request."""
    from .service.operator import explain_record

    if as_json:
        return [json.dumps({"index": i, **explain_record(r.response), "true_prompt_tokens": r.true_tokens})
                for i, r in enumerate(rows)]
    pools = rows[0].response.pools if rows else []
    lines = [f"{len(rows)} requests from {label} (+ long ones stacked from them), decided by {origin}; pools: "
             + ", ".join(f"{p.name}={p.max_context}" for p in pools),
             f"{'#':>4} {'pool':<8} {'reason':<10} {'source':<10} {'estimate':>8} {'true':>7} {'budget':>7}  detail"]
    per_pool: dict[str, int] = {}
    for i, row in enumerate(rows):
        rec = explain_record(row.response)
        per_pool[rec["pool"]] = per_pool.get(rec["pool"], 0) + 1
        pool = rec["pool"] + ("*" if rec["spilled_from"] else "")
        true = row.true_tokens if row.true_tokens is not None else "-"
        lines.append(f"{i:>4} {pool:<8} {rec['reason']:<10} {rec['source']:<10} {rec['prompt_tokens']:>8} "
                     f"{true:>7} {rec['budget_tokens']:>7}  {rec['detail']}")
    lines.append("")
    lines.append("requests per pool: " + ", ".join(f"{k}={v}" for k, v in sorted(per_pool.items()))
                 + ("  (* spilled over from a busier pool)" if any(r.response.spilled_from for r in rows) else ""))
    errors = [r.error for r in rows if r.error is not None]
    if errors:
        lines.append(f"prompt estimate MAPE over {len(errors)} requests with a true count: "
                     f"{100 * sum(errors) / len(errors):.2f}%")
    for model in sorted(calibration):
        lines.append(f"calibration {model}: {calibration[model]}")
    return lines


def calibration_keys(rows: list[Explained]) -> dict[str, str]:
    """Each model the rows name → the calibration key its last decision read ("" for priors)."""
    return {r.response.model: r.response.calibration_key for r in rows if r.response.model}
