"""The operator gRPC API (protos/extproc/operator/v1/operator.proto) on the router's gRPC port:
``Explain`` (a body → the decision with every number behind it, a dry run), ``GetCalibration``
(with what the learning guards know per client hash), ``RestoreCalibration`` and
``ResetCalibration`` (one model back to its priors).

Protobuf in, ``Router`` / ``BudgetRouter`` calls out, protobuf back: the decision is the one the
request path makes (``BudgetRouter.explain`` routes with the same code, ``Router.place`` applies
the same spillover), never a second copy of the logic. The converters here are also what
``extproc explain`` formats, with or without ``--server``.
"""

from __future__ import annotations

import json
import logging

import grpc

from ..budget import REASONS, SOURCES, BudgetRouter
from ..operator.v1 import operator_pb2 as pb
from ..operator.v1 import operator_pb2_grpc as pb_grpc
from .router import Placement, Router

log = logging.getLogger("extproc.service")

SERVICE_NAME = "extproc.operator.v1.Operator"
DEFAULT_PATH = "/v1/chat/completions"
# The core's names <-> the enums. Built at import, so a reason or source the core gains without
# the proto following fails every test that imports this, not one request in production.
_REASON = {name: pb.Reason.Value(f"REASON_{name.upper()}") for name in REASONS}
_SOURCE = {name: pb.Source.Value(f"SOURCE_{name.upper()}") for name in SOURCES}
_REASON_NAME = {v: k for k, v in _REASON.items()}
_SOURCE_NAME = {v: k for k, v in _SOURCE.items()}


def explain_response(placed: Placement) -> pb.ExplainResponse:
    ex = placed.explanation
    d = ex.decision
    resp = pb.ExplainResponse(
        pool=placed.pool, decided_pool=d.pool, spilled_from=placed.spilled_from or "", shadow=placed.shadow,
        reason=_REASON[d.reason], source=_SOURCE[d.source], prompt_tokens=d.prompt_tokens,
        conservative_prompt_tokens=d.budget_tokens - d.output_tokens, output_reserve_tokens=d.output_tokens,
        budget_tokens=d.budget_tokens, margin=d.margin, content_kind=d.content_kind, model=d.model, api=d.api,
        family=ex.family, calibration_key=ex.calibration_key or "", calibration_samples=ex.calibration_samples,
        detail=d.detail)
    if ex.size_bound_tokens is not None:
        resp.size_bound_tokens = ex.size_bound_tokens
    for load in placed.loads:
        state = resp.pools.add(name=load.pool.name, max_context=load.pool.max_context,
                               holds=load.pool.name in d.fits, in_flight=load.in_flight)
        v = load.load
        if v is not None:
            state.instances, state.fresh, state.under_pressure = v.instances, v.fresh, v.pressured
            state.queue_threshold, state.kv_cache_threshold = v.queue_threshold, v.kv_threshold
            if v.age_s is not None:
                state.queue_per_instance, state.load_age_s = v.queue_per_instance, v.age_s
            if v.kv_cache is not None:
                state.kv_cache_usage = v.kv_cache
    return resp


def explain_record(resp: pb.ExplainResponse) -> dict:
    """An Explain answer as JSON-able values under the core's names (``extproc explain --json``)."""
    return {
        "pool": resp.pool, "decided_pool": resp.decided_pool, "spilled_from": resp.spilled_from or None,
        "shadow": resp.shadow, "reason": _REASON_NAME.get(resp.reason, "unspecified"),
        "source": _SOURCE_NAME.get(resp.source, "unspecified"), "prompt_tokens": resp.prompt_tokens,
        "conservative_prompt_tokens": resp.conservative_prompt_tokens,
        "output_reserve_tokens": resp.output_reserve_tokens, "budget_tokens": resp.budget_tokens,
        "margin": resp.margin, "content_kind": resp.content_kind, "model": resp.model, "api": resp.api,
        "family": resp.family, "calibration_key": resp.calibration_key or None,
        "calibration_samples": resp.calibration_samples,
        "size_bound_tokens": resp.size_bound_tokens if resp.HasField("size_bound_tokens") else None,
        "pools": [_pool_record(p) for p in resp.pools],
        "detail": resp.detail,
    }


def _pool_record(p: pb.PoolState) -> dict:
    rec = {"name": p.name, "max_context": p.max_context, "holds": p.holds, "in_flight": p.in_flight}
    if p.HasField("queue_threshold"):  # its load is read
        rec["load"] = {"fresh": p.fresh, "under_pressure": p.under_pressure, "instances": p.instances,
                       **{k: getattr(p, k) if p.HasField(k) else None for k in
                          ("queue_per_instance", "kv_cache_usage", "load_age_s", "queue_threshold",
                           "kv_cache_threshold")}}
    return rec


def calibration_message(budget: BudgetRouter) -> pb.Calibration:
    """The calibration as the snapshot file holds it, plus a summary per key and what its
    learning guards know. Runs on the event loop, where the calibrator is updated, so the
    document is one consistent state."""
    msg = pb.Calibration(estimator=budget.estimator.name, snapshot_json=json.dumps(budget.snapshot()).encode())
    for key, summary in budget.calibration_states():
        entry = msg.keys.add(key=key, samples=budget.estimator.samples(key), summary_json=json.dumps(summary).encode())
        learning = budget.learning(key)
        if learning is not None:
            entry.learning.CopyFrom(learning_message(learning))
    return msg


def learning_message(learning: dict) -> pb.KeyLearning:
    """``BudgetRouter.learning`` as its protobuf message."""
    msg = pb.KeyLearning(window=learning["window"], client_share=learning["client_share"],
                         recent=learning["recent"], unidentified=learning["unidentified"],
                         refused=learning["refused"], unexplained=learning["unexplained"])
    for c in learning["clients"]:
        msg.clients.add(client_hash=c["client"], recent=c["recent"], share=c["share"], refused=c["refused"],
                        unexplained=c["unexplained"])
    return msg


class OperatorServicer(pb_grpc.OperatorServicer):
    def __init__(self, router: Router, mode: str) -> None:
        self.r = router
        self.mode = mode  # service.operator_api: read_only or read_write

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        return explain_response(await self.r.explain(request.body, request.path or DEFAULT_PATH))

    async def GetCalibration(self, request: pb.GetCalibrationRequest,
                             context: grpc.aio.ServicerContext) -> pb.Calibration:
        return calibration_message(self.r.budget)

    async def RestoreCalibration(self, request: pb.RestoreCalibrationRequest,
                                 context: grpc.aio.ServicerContext) -> pb.Calibration:
        if self.mode != "read_write":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "RestoreCalibration is disabled: set service.operator_api: read_write")
        try:
            self.r.budget.restore_json(request.snapshot_json)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"calibration not restored: {exc}")
        if self.r.shared is not None:  # the fleet's calibration, not one replica's
            self.r.shared.replaced()
        msg = calibration_message(self.r.budget)
        log.info("calibration restored through the operator API: %d model keys", len(msg.keys))
        return msg

    async def ResetCalibration(self, request: pb.ResetCalibrationRequest,
                               context: grpc.aio.ServicerContext) -> pb.Calibration:
        if self.mode != "read_write":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "ResetCalibration is disabled: set service.operator_api: read_write")
        budget = self.r.budget
        key = budget.calibration_key(request.model)
        if key is None or not budget.reset(request.model):
            await context.abort(grpc.StatusCode.NOT_FOUND, "no calibration held for that model")
        if self.r.shared is not None:
            self.r.shared.replaced()
        log.info("calibration of model key %s reset through the operator API", key[:64])
        return calibration_message(budget)


def add_to_server(router: Router, mode: str, server: grpc.aio.Server) -> None:
    """Serve the operator API on ``server`` unless ``mode`` is off."""
    if mode != "off":
        pb_grpc.add_OperatorServicer_to_server(OperatorServicer(router, mode), server)
