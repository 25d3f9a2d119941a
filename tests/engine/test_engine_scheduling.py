"""Admission and pacing over real HTTP: max_num_seqs queueing, KV limits, TTFT, client aborts."""

from __future__ import annotations

import asyncio
import time

from engine_harness import metric, metric_values, read_sse


async def _timed(session, path, body):
    start = time.perf_counter()
    async with session.post(path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        payload = await resp.json()
    return time.perf_counter() - start, payload


async def _watch(session, done: asyncio.Event, samples: list[dict]) -> None:
    # Bounded: the requests under test finish in well under a second.
    for _ in range(500):
        if done.is_set():
            return
        samples.append(await metric_values(session))
        await asyncio.sleep(0.01)


async def _two_concurrent(session, body, path="/v1/chat/completions"):
    samples: list[dict] = []
    done = asyncio.Event()
    watcher = asyncio.ensure_future(_watch(session, done, samples))
    first = asyncio.ensure_future(_timed(session, path, body))
    await asyncio.sleep(0.02)  # FIFO order: the first request is admitted first
    second = asyncio.ensure_future(_timed(session, path, body))
    results = await asyncio.gather(first, second)
    done.set()
    await watcher
    return results, samples


CHAT = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 20}


def test_max_num_seqs_one_queues_the_second_request(serve):
    async def scenario(session, engine):
        return await _two_concurrent(session, CHAT)

    ((t1, r1), (t2, r2)), samples = serve(scenario, max_num_seqs=1, time_scale=0.5)
    assert r1["usage"]["completion_tokens"] == r2["usage"]["completion_tokens"] == 20
    waiting = [metric(s, "vllm:num_requests_waiting") for s in samples]
    running = [metric(s, "vllm:num_requests_running") for s in samples]
    assert 1.0 in waiting, waiting
    assert max(running) == 1.0, running
    assert t2 > 1.7 * t1, (t1, t2)


def test_requests_within_max_num_seqs_run_together(serve):
    async def scenario(session, engine):
        return await _two_concurrent(session, CHAT)

    ((t1, _), (t2, _)), samples = serve(scenario, max_num_seqs=2, time_scale=0.5)
    assert max(metric(s, "vllm:num_requests_waiting") for s in samples) == 0.0
    assert 2.0 in [metric(s, "vllm:num_requests_running") for s in samples]
    assert t2 < 1.4 * t1, (t1, t2)


def test_kv_capacity_holds_back_a_request_that_does_not_fit(serve):
    # 1,024 tokens of KV: one sequence of 100 prompt + 500 output tokens fits, two do not.
    body = {"prompt": list(range(100)), "max_tokens": 500}

    async def scenario(session, engine):
        return await _two_concurrent(session, body, "/v1/completions")

    ((t1, _), (t2, _)), samples = serve(scenario, max_model_len=1024, kv_capacity_tokens=1024,
                                        max_num_seqs=8, time_scale=0.02)
    assert 1.0 in [metric(s, "vllm:num_requests_waiting") for s in samples]
    usage = [metric(s, "vllm:kv_cache_usage_perc") for s in samples]
    assert 0.0 < max(usage) <= 1.0, usage
    assert t2 > 1.7 * t1, (t1, t2)


def test_ttft_grows_with_prompt_length(serve):
    async def ttft(session, prompt_len):
        body = {"prompt": [5] * prompt_len, "max_tokens": 2, "stream": True}
        start = time.perf_counter()
        async with session.post("/v1/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    first = time.perf_counter() - start
                    break
            await resp.read()
        return first

    async def scenario(session, engine):
        return await ttft(session, 10), await ttft(session, 8000), engine.scheduler.profile.ttft_s(8000)

    short, long, modelled = serve(scenario, time_scale=0.2)
    assert long >= 0.9 * 0.2 * modelled, (long, modelled)
    assert short < 0.1 < long, (short, long)


def test_client_abort_frees_the_slot(serve):
    async def scenario(session, engine):
        body = {"messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 2000, "stream": True}
        resp = await session.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        resp.close()  # drop the connection mid-stream
        # The aborted stream had ~2 s left; the slot must come free long before that.
        elapsed, payload = await _timed(session, "/v1/chat/completions", dict(CHAT, max_tokens=2))
        return elapsed, payload, await metric_values(session)

    elapsed, payload, metrics = serve(scenario, max_num_seqs=1, time_scale=0.05)
    assert payload["usage"]["completion_tokens"] == 2
    assert elapsed < 0.5, elapsed
    assert metric(metrics, "vllm:num_requests_running") == 0.0
    assert any(k.startswith('vllm:request_success_total{engine="0",finished_reason="abort"') and v == 1.0
               for k, v in metrics.items()), metrics


def test_stream_and_plain_responses_agree(serve):
    async def scenario(session, engine):
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12}
        async with session.post("/v1/chat/completions", json=body) as resp:
            plain = await resp.json()
        async with session.post("/v1/chat/completions", json=dict(body, stream=True)) as resp:
            events = await read_sse(resp)
        return plain, events

    plain, events = serve(scenario)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"])
    assert streamed == plain["choices"][0]["message"]["content"]
    assert plain["object"] == "chat.completion" and plain["choices"][0]["finish_reason"] == "length"


def test_prefills_take_turns(serve):
    # Prefill is compute-bound: two long prompts admitted together do not both finish in one prefill time.
    body = {"prompt": [5] * 8000, "max_tokens": 1}

    async def scenario(session, engine):
        return await _two_concurrent(session, body, "/v1/completions")

    ((t1, _), (t2, _)), samples = serve(scenario, time_scale=0.1)
    assert max(metric(s, "vllm:num_requests_waiting") for s in samples) == 0.0  # both admitted
    assert t2 > 1.6 * t1, (t1, t2)
