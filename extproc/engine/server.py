"""The simulated vLLM engine: an aiohttp app speaking the HTTP API of one vLLM instance.

HTTP shell only: bodies are parsed in ``jsonbody`` and read in ``requests``, answers shaped in
``responses``/``responses_api``/``anthropic``, admission and pacing in ``scheduler``, timings in
``extproc.fleet.instance``. Large bodies are parsed and counted off the event loop, so one request
never stalls the others.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
from aiohttp import web

from extproc.engine import anthropic, jsonbody, metrics, requests, responses
from extproc.engine.counting import counter_for
from extproc.engine.errors import RequestError, http_error
from extproc.engine.requests import GenerationRequest, OutputPolicy, Serving
from extproc.engine.responses_api import ResponsesShaper
from extproc.engine.scheduler import Sequence, SequenceScheduler
from extproc.engine.versions import VllmVersion
from extproc.fleet.instance import InstanceProfile, profile_named

# Prompts up to 64K tokens of CJK text in JSON escapes run to a few MB; vLLM refuses text past
# window x 128 characters anyway (8M characters for 64K), so nothing useful is larger than this.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_OFF_LOOP_BYTES = 256 * 1024  # bodies larger than this are parsed and counted in a worker thread


@dataclass(frozen=True)
class EngineConfig:
    profile: InstanceProfile = field(default_factory=lambda: profile_named("short"))
    model: str | None = None  # served model name; the profile's model when None
    time_scale: float = 1.0  # multiplies every simulated delay; 0 answers as fast as possible
    output_policy: OutputPolicy = OutputPolicy()
    served_names: tuple[str, ...] = ()  # --served-model-name a b: every name is accepted, the first answers
    vllm_version: VllmVersion = VllmVersion("0.32.0")
    tokenizer: str | None = None  # tokenizer family or directory; None: chosen by the served model name
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @property
    def served(self) -> tuple[str, ...]:
        return self.served_names or (self.model or self.profile.model,)

    @property
    def served_model(self) -> str:
        return self.served[0]


@dataclass
class _Engine:
    config: EngineConfig
    scheduler: SequenceScheduler
    serving: Serving
    created: int
    fingerprint: str


_ENGINE = web.AppKey("engine", _Engine)

_SHAPERS = {"chat": responses.ChatShaper, "completions": responses.CompletionShaper,
            "responses": ResponsesShaper, "messages": anthropic.MessagesShaper}


def create_app(config: EngineConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes)
    counter = counter_for(config.tokenizer, config.served_model)  # fails at start-up, not per request

    async def on_startup(app: web.Application) -> None:
        # The scheduler's lock and futures belong to the loop the app runs on.
        serving = Serving(config.served, config.profile.max_model_len, config.vllm_version, counter)
        app[_ENGINE] = _Engine(config, SequenceScheduler(config.profile, config.time_scale), serving,
                               int(time.time()), f"vllm-{config.vllm_version.release}-{secrets.token_hex(4)}")

    app.on_startup.append(on_startup)
    for path, api in (("/v1/chat/completions", "chat"), ("/v1/completions", "completions"),
                      ("/v1/responses", "responses"), ("/v1/messages", "messages")):
        app.router.add_post(path, _generation_handler(api))
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/version", _version)
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


# --- plain handlers -------------------------------------------------------------------------------


async def _models(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE]
    c = engine.config
    return _json(responses.model_list(c.served, engine.created, c.profile.max_model_len, c.served_model))


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _version(request: web.Request) -> web.Response:
    return _json(responses.version(request.app[_ENGINE].config.vllm_version.release))


async def _metrics(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE]
    text = metrics.render(engine.scheduler, engine.config.served_model)
    return web.Response(body=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})


async def _tokenize(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE]
    try:
        tokens = await _read(request, requests.read_tokenize)
    except RequestError as err:
        return _error(engine, "tokenize", err)
    return _json(responses.tokenize(tokens, engine.config.profile.max_model_len))


async def _count_tokens(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE]
    try:
        count = await _read(request, requests.read_count_tokens)
    except RequestError as err:
        return _error(engine, "messages", err)
    return _json(anthropic.count_tokens(count))


def _json(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(engine: _Engine, api: str, err: RequestError) -> web.Response:
    engine.scheduler.stats.requests_rejected_total[err.reason] += 1
    # vLLM answers /v1/messages errors in Anthropic's envelope, except those FastAPI raises while
    # validating the body (type "Bad Request"), which keep the OpenAI one
    if api == "messages" and err.err_type != "Bad Request":
        return _json(anthropic.error_body(err), err.status)
    return _json(responses.error_body(err), err.status)


async def _read(request: web.Request, reader: Callable[[Any, Serving], Any]) -> Any:
    """Parse and read the body; bounded in size, off the event loop when large."""
    engine = request.app[_ENGINE]
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise http_error(413, f"Request body exceeds {engine.config.max_body_bytes} bytes.",
                         reason="too_large") from None
    content_type = request.headers.get("Content-Type")

    def work() -> Any:
        return reader(jsonbody.parse(raw, content_type), engine.serving)

    if len(raw) > _OFF_LOOP_BYTES:
        return await asyncio.get_running_loop().run_in_executor(None, work)
    return work()


# --- generation -----------------------------------------------------------------------------------


@dataclass
class _Plan:
    request: GenerationRequest
    sequences: list[Sequence]  # prompt-major: choice index = prompt index x n + j
    finish_reasons: list[str]


def _plan(engine: _Engine, gen: GenerationRequest) -> _Plan:
    sequences, reasons = [], []
    for prompt, limit in zip(gen.prompt_tokens, gen.limits):
        for _ in range(gen.n):
            n, reason = engine.config.output_policy.output_tokens(gen.requested, limit)
            sequences.append(Sequence(prompt, n))
            reasons.append(reason)
    return _Plan(gen, sequences, reasons)


def _generation_handler(api: str) -> Callable[[web.Request], Any]:
    reader = {"chat": requests.read_chat, "completions": requests.read_completion,
              "responses": requests.read_responses, "messages": requests.read_messages}[api]

    async def handler(request: web.Request) -> web.StreamResponse:
        engine = request.app[_ENGINE]
        try:
            gen = await _read(request, reader)
        except RequestError as err:
            return _error(engine, api, err)
        plan = _plan(engine, gen)
        shaper = _SHAPERS[api](gen, int(time.time()), engine.fingerprint)
        if gen.stream:
            return await _stream(request, engine, plan, shaper)
        return await _respond(engine, plan, shaper)

    return handler


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


def _usage_totals(plan: _Plan) -> tuple[int, int]:
    # vLLM's usage: each prompt once (not once per choice), every choice's tokens
    return sum(plan.request.prompt_tokens), sum(seq.generated for seq in plan.sequences)


async def _respond(engine: _Engine, plan: _Plan, shaper: responses.Shaper) -> web.Response:
    tasks = [asyncio.ensure_future(_run_sequence(engine, seq, None)) for seq in plan.sequences]
    try:
        await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)
    _count_success(engine, plan)
    choices = [(responses.full_text(seq.generated), reason)
               for seq, reason in zip(plan.sequences, plan.finish_reasons)]
    return _json(shaper.full(choices, *_usage_totals(plan)))


async def _stream(request: web.Request, engine: _Engine, plan: _Plan, shaper: responses.Shaper) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": shaper.media_type})
    await resp.prepare(request)

    # Sequence tasks put finished SSE frames here; this coroutine is the only writer.
    frames: asyncio.Queue[list[bytes] | None] = asyncio.Queue()

    def emitter(index: int, seq: Sequence, reason: str) -> Callable[[int], None]:
        def on_token(i: int) -> None:
            last = seq.generated == seq.output_tokens
            frames.put_nowait(shaper.token(index, i, responses.token_text(i), reason if last else None))
        return on_token

    async def run(index: int, seq: Sequence, reason: str) -> None:
        try:
            await _run_sequence(engine, seq, emitter(index, seq, reason))
        finally:
            frames.put_nowait(None)

    tasks: list[asyncio.Future] = []
    try:
        for frame in shaper.start():
            await resp.write(frame)
        tasks = [asyncio.ensure_future(run(i, seq, reason))
                 for i, (seq, reason) in enumerate(zip(plan.sequences, plan.finish_reasons))]
        open_sequences = len(tasks)
        while open_sequences:
            batch = await frames.get()
            if batch is None:
                open_sequences -= 1
                continue
            for frame in batch:
                await resp.write(frame)
        for task in tasks:
            task.result()  # surface a failed sequence instead of a silently short stream
        _count_success(engine, plan)
        for frame in shaper.end(*_usage_totals(plan)):
            await resp.write(frame)
        await resp.write_eof()
    except ConnectionResetError:  # the client went away: vLLM aborts the request
        engine.scheduler.stats.request_success_total["abort"] += len(plan.sequences)
    except asyncio.CancelledError:
        engine.scheduler.stats.request_success_total["abort"] += len(plan.sequences)
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
