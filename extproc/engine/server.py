"""The simulated vLLM engine: an aiohttp app speaking the OpenAI API of one vLLM instance.

HTTP shell only: body reading lives in ``requests``, response shapes in ``responses``, admission and
pacing in ``scheduler``, timings in ``extproc.fleet.instance``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import orjson
from aiohttp import web

from extproc.engine import metrics, responses
from extproc.engine.requests import (
    GenerationRequest, OutputPolicy, RequestError, check_context, parse_json, read_chat, read_completion,
)
from extproc.engine.scheduler import Sequence, SequenceScheduler
from extproc.fleet.instance import InstanceProfile, profile_named

@dataclass(frozen=True)
class EngineConfig:
    profile: InstanceProfile = field(default_factory=lambda: profile_named("short"))
    model: str | None = None  # served model name; the profile's model when None
    time_scale: float = 1.0  # multiplies every simulated delay; 0 answers as fast as possible
    output_policy: OutputPolicy = OutputPolicy()

    @property
    def served_model(self) -> str:
        return self.model or self.profile.model


@dataclass
class _Engine:
    config: EngineConfig
    scheduler: SequenceScheduler
    created: int


_ENGINE = web.AppKey("engine", _Engine)


def create_app(config: EngineConfig) -> web.Application:
    # Prompts up to 64K tokens of CJK text in JSON escapes run to a few MB.
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def on_startup(app: web.Application) -> None:
        # The scheduler's lock and futures belong to the loop the app runs on.
        app[_ENGINE] = _Engine(config, SequenceScheduler(config.profile, config.time_scale), int(time.time()))

    app.on_startup.append(on_startup)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


@dataclass
class RunningEngine:
    """A started engine: its base URL and how to stop it."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def scheduler(self) -> SequenceScheduler:
        return self.runner.app[_ENGINE].scheduler

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_engine(config: EngineConfig, host: str = "127.0.0.1", port: int = 0) -> RunningEngine:
    """Serve the engine on the running loop; ``port=0`` picks a free port."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return RunningEngine(runner, host, bound)


# --- handlers -------------------------------------------------------------------------------------


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, read_chat)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, read_completion)


async def _models(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE]
    body = responses.model_list(engine.config.served_model, engine.created, engine.config.profile.max_model_len)
    return _json(body)


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _metrics(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE]
    text = metrics.render(engine.scheduler, engine.config.served_model)
    return web.Response(body=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})


def _json(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


# --- generation -----------------------------------------------------------------------------------


@dataclass
class _Plan:
    request: GenerationRequest
    sequences: list[Sequence]
    finish_reasons: list[str]


def _plan(engine: _Engine, gen: GenerationRequest) -> _Plan:
    profile = engine.config.profile
    sequences, reasons = [], []
    for prompt in gen.prompt_tokens:
        check_context(prompt, gen.requested_output_tokens, profile.max_model_len)
        n, reason = engine.config.output_policy.output_tokens(gen.requested_output_tokens,
                                                              profile.max_output_tokens(prompt))
        sequences.append(Sequence(prompt, n))
        reasons.append(reason)
    return _Plan(gen, sequences, reasons)


async def _generate(request: web.Request, reader: Callable[[dict, str], GenerationRequest]) -> web.StreamResponse:
    engine = request.app[_ENGINE]
    try:
        body = parse_json(await request.read())
        plan = _plan(engine, reader(body, engine.config.served_model))
    except RequestError as err:
        engine.scheduler.stats.requests_rejected_total[err.reason] += 1
        return _json(responses.error_body(err.message, err.err_type, err.status, err.param), err.status)
    if plan.request.stream:
        return await _stream(request, engine, plan)
    return await _respond(engine, plan)


async def _run_sequence(engine: _Engine, seq: Sequence, on_token: Callable[[int], None] | None) -> None:
    """Admit, prefill and decode one sequence; ``on_token(i)`` after the i-th token (0-based)."""
    scheduler = engine.scheduler
    async with scheduler.admitted(seq):
        await scheduler.prefill(seq)
        if on_token:
            on_token(0)
        while seq.generated < seq.output_tokens:
            await scheduler.decode(seq)
            if on_token:
                on_token(seq.generated - 1)


async def _respond(engine: _Engine, plan: _Plan) -> web.Response:
    gen = plan.request
    rid, created = responses.request_id(gen.endpoint), int(time.time())
    tasks = [asyncio.ensure_future(_run_sequence(engine, seq, None)) for seq in plan.sequences]
    try:
        await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)
    _count_success(engine, plan)
    choices = [(responses.full_text(seq.generated), reason)
               for seq, reason in zip(plan.sequences, plan.finish_reasons)]
    body = responses.completion(gen.endpoint, rid, created, gen.model, choices, sum(gen.prompt_tokens),
                                sum(seq.generated for seq in plan.sequences))
    return _json(body)


async def _stream(request: web.Request, engine: _Engine, plan: _Plan) -> web.StreamResponse:
    gen = plan.request
    rid, created = responses.request_id(gen.endpoint), int(time.time())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)

    # Sequence tasks put finished SSE frames here; this coroutine is the only writer.
    frames: asyncio.Queue[bytes | None] = asyncio.Queue()

    def emitter(index: int, seq: Sequence, reason: str) -> Callable[[int], None]:
        def on_token(i: int) -> None:
            last = seq.generated == seq.output_tokens
            frames.put_nowait(responses.sse(responses.chunk(
                gen.endpoint, rid, created, gen.model, index, responses.token_text(i),
                reason if last else None)))
        return on_token

    async def run(index: int, seq: Sequence, reason: str) -> None:
        try:
            await _run_sequence(engine, seq, emitter(index, seq, reason))
        finally:
            frames.put_nowait(None)

    if gen.endpoint == "chat":
        for index in range(len(plan.sequences)):
            await resp.write(responses.sse(responses.chunk(gen.endpoint, rid, created, gen.model, index,
                                                           None, None, role=True)))
    tasks = [asyncio.ensure_future(run(i, seq, reason))
             for i, (seq, reason) in enumerate(zip(plan.sequences, plan.finish_reasons))]
    try:
        open_sequences = len(tasks)
        while open_sequences:
            frame = await frames.get()
            if frame is None:
                open_sequences -= 1
                continue
            await resp.write(frame)
        for task in tasks:
            task.result()  # surface a failed sequence instead of a silently short stream
        _count_success(engine, plan)
        if gen.include_usage:
            await resp.write(responses.sse(responses.usage_chunk(
                gen.endpoint, rid, created, gen.model, sum(gen.prompt_tokens),
                sum(seq.generated for seq in plan.sequences))))
        await resp.write(responses.SSE_DONE)
        await resp.write_eof()
    except ConnectionResetError:  # the client went away: vLLM aborts the request
        engine.scheduler.stats.request_success_total["abort"] += len(tasks)
    except asyncio.CancelledError:
        engine.scheduler.stats.request_success_total["abort"] += len(tasks)
        raise
    finally:
        await _cancel(tasks)
    return resp


def _count_success(engine: _Engine, plan: _Plan) -> None:
    for reason in plan.finish_reasons:
        engine.scheduler.stats.request_success_total[reason] += 1


async def _cancel(tasks: list[asyncio.Future]) -> None:
    """Stop sequences still running (their slots and KV are released) and collect their outcomes."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
