"""The operator gRPC API over a real router (grpc.aio on 127.0.0.1, the port ext_proc uses):
Explain answers what the local BudgetRouter decides and moves nothing; calibration taken from one
router and restored into another reproduces its decisions; bad snapshots are refused; and
``extproc explain --server`` prints what the local command prints."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys
import warnings

import grpc
import pytest
from service_harness import (MODEL, chat, long_text, request_body, request_headers, response_body,
                             response_headers, run, running, set_headers)

from extproc.budget import BudgetRouter
from extproc.config import parse_config
from extproc.operator.v1 import operator_pb2 as pb
from extproc.operator.v1 import operator_pb2_grpc as pb_grpc
from extproc.service.operator import explain_record

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED_REQUESTS = REPO.parent / "shared" / "data" / "requests" / "dev_requests.jsonl"
BUNDLED_REQUESTS = REPO / "extproc" / "samples" / "requests.jsonl"
CHAT = "/v1/chat/completions"
READ_WRITE = {"service": {"routing_filter": "ext_proc", "operator_api": "read_write"}}
TIMEOUT = 10.0


def _rows() -> list[dict]:
    """Real request rows: the shared dev set, else (saying so) the bundled sample."""
    path = SHARED_REQUESTS
    if not path.is_file():
        warnings.warn(f"shared request bodies not found at {SHARED_REQUESTS}: using the bundled sample "
                      f"{BUNDLED_REQUESTS.name} (fewer bodies, no recorded prompt counts)")
        path = BUNDLED_REQUESTS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows, f"{path} holds no requests"
    return rows


ROWS = _rows()


def _true_tokens(row: dict) -> int:
    """The prompt count vLLM reports for the body (recorded in the shared set; else counted)."""
    if "prompt_tokens" in row:
        return row["prompt_tokens"]["qwen3" if "qwen" in row["body"]["model"].lower() else "llama3"]
    from extproc.tokens import counter_for

    body = row["body"]
    family = "qwen3" if "qwen" in body["model"].lower() else "llama3"
    api = "completions" if row.get("path") == "/v1/completions" else "chat"
    # usage.prompt_tokens of a server that takes tools (--enable-auto-tool-choice, a tool parser)
    return sum(counter_for(family).count_request(api, body, enable_auto_tool_choice=True,
                                                 tool_call_parser="hermes"))


def _bodies() -> list[tuple[bytes, str]]:
    """The real bodies, plus kinds they lack: long, larger than any pool, token ids, another
    model family, and bodies that cannot be read."""
    out = [(json.dumps(r["body"], ensure_ascii=False).encode(), r.get("path") or CHAT) for r in ROWS]
    out += [(chat(long_text(20_000), max_tokens=512), CHAT), (chat(long_text(90_000)), CHAT),
            (json.dumps({"model": MODEL, "prompt": list(range(7000)), "max_tokens": 2000}).encode(), "/v1/completions"),
            (json.dumps({"model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": "你好，请介绍一下长江。"}]}).encode(), CHAT),
            (b'{"model": "m", "messages": [', CHAT), (b"", CHAT), (b"\xff\xfe", "/v1/embeddings")]
    return out


def _stub(h) -> pb_grpc.OperatorStub:
    return pb_grpc.OperatorStub(h.channel)


def _assert_same_decision(resp: pb.ExplainResponse, local: BudgetRouter, body: bytes, path: str) -> None:
    d = local.route(body, path)
    rec = explain_record(resp)
    assert (rec["decided_pool"], rec["reason"], rec["source"]) == (d.pool, d.reason, d.source)
    assert (rec["prompt_tokens"], rec["budget_tokens"], rec["output_reserve_tokens"]) == \
        (d.prompt_tokens, d.budget_tokens, d.output_tokens)
    assert rec["conservative_prompt_tokens"] == d.budget_tokens - d.output_tokens
    assert rec["margin"] == d.margin and rec["content_kind"] == d.content_kind  # exact: a double on the wire
    assert (rec["model"], rec["api"], rec["detail"]) == (d.model, d.api, d.detail)
    _, obs = local.route_learnable(body, path)
    assert rec["family"] == (obs.family.name if obs else "")
    assert rec["calibration_key"] == local.calibration_key(d.model)
    assert rec["calibration_samples"] == (local.estimator.samples(d.model) if d.model else 0)
    assert [p["name"] for p in rec["pools"] if p["holds"]] == list(d.fits)
    assert [(p["name"], p["max_context"]) for p in rec["pools"]] == [(p.name, p.max_context) for p in local.pools]
    quick = local.route(body, path, by_size=True)
    assert rec["size_bound_tokens"] == (quick.prompt_tokens if quick.source == "bound" else None)
    assert rec["pool"] == d.pool and rec["spilled_from"] is None  # no spillover set
    assert all("load" not in p for p in rec["pools"])


async def _teach(h, body: bytes, true_tokens: int) -> None:
    """Calibrate the way a router really learns: a routing stream marks the request for reading,
    then the usage stream brings the response's usage.prompt_tokens."""
    _, routed = await h.exchange([request_headers(CHAT), request_body(body)])
    sample_id = set_headers(routed).get("x-token-decision")
    assert sample_id, "a calibrating router reads every response"
    usage = json.dumps({"object": "chat.completion", "choices": [],
                        "usage": {"prompt_tokens": true_tokens, "completion_tokens": 1,
                                  "total_tokens": true_tokens + 1}}).encode()
    await h.send_all([request_headers(CHAT, extra={"x-token-decision": sample_id}, observability=True),
                      response_headers(200, "application/json"), response_body(usage, eos=True)])


async def _taught_router(h, count: int = 30) -> None:
    for row in ROWS[:count]:
        await _teach(h, json.dumps(row["body"], ensure_ascii=False).encode(), _true_tokens(row))
    assert h.samples(ROWS[0]["body"]["model"]) > 0


async def _calibration(h) -> pb.Calibration:
    return await _stub(h).GetCalibration(pb.GetCalibrationRequest(), timeout=TIMEOUT)


async def _explain_all(stub: pb_grpc.OperatorStub, bodies) -> list[pb.ExplainResponse]:
    return [await stub.Explain(pb.ExplainRequest(body=b, path=p), timeout=TIMEOUT) for b, p in bodies]


# -- Explain -------------------------------------------------------------------------------------------------

def test_explain_answers_what_the_local_budget_router_decides():
    async def scenario():
        async with running(READ_WRITE) as h:
            stub = _stub(h)
            bodies = _bodies()
            local = BudgetRouter(h.service.config.budget)
            for resp, (body, path) in zip(await _explain_all(stub, bodies), bodies):
                _assert_same_decision(resp, local, body, path)

            # the same after the router has learned (its calibration restored into the local one)
            await _taught_router(h)
            snapshot = (await _calibration(h)).snapshot_json
            local.restore_json(snapshot)
            answers = await _explain_all(stub, bodies)
            for resp, (body, path) in zip(answers, bodies):
                _assert_same_decision(resp, local, body, path)
            seen = {(explain_record(r)["pool"], explain_record(r)["reason"], explain_record(r)["source"]) for r in answers}
            # the bodies reach both pools, every reason, and learned as well as prior and exact estimates
            assert {("short", "fits"), ("long", "fits"), ("long", "too_large"), ("long", "unreadable")} <= \
                {(p, r) for p, r, _ in seen}
            sources = {s for _, _, s in seen}
            assert {"prior", "exact", "fallback"} <= sources
            if len(ROWS) >= 20:
                assert "calibrated" in sources
    run(scenario())


def test_a_malformed_body_is_a_decision_for_the_largest_pool_not_an_error():
    async def scenario():
        async with running() as h:
            for body, path in [(b'{"model": "m", "messages": [', CHAT), (b"\x00" * 1000, CHAT), (b"", ""),
                               (b'{"model": "m", "messages": "hi"}', CHAT), (b"[1, 2, 3]", "/v1/completions")]:
                rec = explain_record(await _stub(h).Explain(pb.ExplainRequest(body=body, path=path), timeout=TIMEOUT))
                assert rec["pool"] == "long" and rec["reason"] == "unreadable" and rec["source"] == "fallback"
                assert rec["detail"] and rec["budget_tokens"] == 0
                assert not any(p["holds"] for p in rec["pools"])
    run(scenario())


def test_explain_is_a_dry_run():
    async def scenario():
        async with running(READ_WRITE) as h:
            await _taught_router(h, 5)
            stub = _stub(h)
            before = (await _calibration(h)).snapshot_json
            decisions = h.value("extproc_decisions_total", pool="short", reason="fits", source="prior")
            pending = len(h.service.router.pending)
            await _explain_all(stub, _bodies())
            after = (await _calibration(h)).snapshot_json
            assert after == before
            assert h.service.router.inflight == {"short": 0, "long": 0}
            assert len(h.service.router.pending) == pending
            assert h.value("extproc_decisions_total", pool="short", reason="fits", source="prior") == decisions
    run(scenario())


def test_explain_shows_spillover_and_the_load_it_read():
    from aiohttp import web

    async def metrics_page(waiting: int) -> tuple[web.AppRunner, int]:
        """A real HTTP server with a vLLM metrics page: the pool's load as the router reads it."""
        body = (f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}\n'
                f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} 0.5\n').encode()
        async def page(request: web.Request) -> web.Response:
            return web.Response(body=body)

        app = web.Application()
        app.router.add_get("/metrics", page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    async def scenario():
        (short_server, short_port), (long_server, long_port) = await metrics_page(20), await metrics_page(0)
        spill = {"pools": {"short": {"endpoints": [f"127.0.0.1:{short_port}"], "queue_per_instance": 8},
                           "long": {"endpoints": [f"127.0.0.1:{long_port}"]}}, "period_s": 0.05}
        try:
            async with running({"service": {"routing_filter": "ext_proc", "spillover": spill}}) as h:
                readings = h.service.router.readings
                for _ in range(200):  # the first read: bounded wait
                    if readings.view("short").fresh and readings.view("long").fresh:
                        break
                    await asyncio.sleep(0.01)
                short_body = chat("What is the capital of France?")
                call = h.open()  # a routed request that has not ended: one in flight, spilled to long
                await call.write(request_headers(CHAT))
                await call.read()
                await call.write(request_body(short_body))
                assert set_headers(await call.read())["x-token-pool"] == "long"
                rec = explain_record(await _stub(h).Explain(pb.ExplainRequest(body=short_body, path=CHAT),
                                                            timeout=TIMEOUT))
                assert rec["decided_pool"] == "short" and rec["pool"] == "long" and rec["spilled_from"] == "short"
                short, long_ = rec["pools"]
                assert (short["in_flight"], long_["in_flight"]) == (0, 1)
                assert short["load"]["under_pressure"] and short["load"]["queue_per_instance"] == 20
                assert short["load"]["queue_threshold"] == 8 and short["load"]["kv_cache_usage"] == 0.5
                # long: its page's 0 plus the one request sent since the read began, if it began before
                assert not long_["load"]["under_pressure"] and long_["load"]["queue_per_instance"] in (0, 1)
                assert long_["load"]["fresh"] and 0 <= long_["load"]["load_age_s"] < 1
                assert h.service.router.inflight == {"short": 0, "long": 1}  # Explain placed nothing
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
        finally:
            await short_server.cleanup()
            await long_server.cleanup()
    run(scenario())


def test_explain_never_returns_prompt_text():
    async def scenario():
        async with running() as h:
            secret = "zebra-quartz-41 my account password is hunter2"
            for body in (chat(secret), b'{"model": "m", "messages": [{"role": "user", "content": "' + secret.encode()):
                resp = await _stub(h).Explain(pb.ExplainRequest(body=body, path=CHAT), timeout=TIMEOUT)
                wire = resp.SerializeToString()
                assert b"zebra" not in wire and b"hunter2" not in wire
    run(scenario())


# -- calibration ----------------------------------------------------------------------------------------------

def test_calibration_restored_on_a_second_router_reproduces_its_decisions():
    async def scenario():
        async with running(READ_WRITE) as first, running(READ_WRITE) as second:
            await _taught_router(first)
            bodies = _bodies()
            taken = await _calibration(first)
            model = ROWS[0]["body"]["model"]
            assert taken.estimator == "feature-kalman"
            assert [k.key for k in taken.keys] == [model]
            assert taken.keys[0].samples == first.samples(model) > 0
            assert json.loads(taken.keys[0].summary_json) == first.service.budget.calibration(model)
            assert json.loads(taken.snapshot_json) == first.service.budget.snapshot()

            fresh = await _explain_all(_stub(second), bodies)
            expected = await _explain_all(_stub(first), bodies)
            assert fresh != expected  # what was learned changes decisions: the restore has something to show

            restored = await _stub(second).RestoreCalibration(
                pb.RestoreCalibrationRequest(snapshot_json=taken.snapshot_json), timeout=TIMEOUT)
            assert [(k.key, k.samples) for k in restored.keys] == [(k.key, k.samples) for k in taken.keys]
            assert json.loads(restored.snapshot_json) == json.loads(taken.snapshot_json)
            assert await _explain_all(_stub(second), bodies) == expected
    run(scenario())


def _snapshot_variants(good: dict) -> list[tuple[str, bytes]]:
    other_features = {**good, "features": "999:00000000"}
    other_estimator = {**good, "estimator": "paper-ema"}
    bad_key = {**good, "keys": {MODEL: {"theta": [1.0], "P": [], "n": 1, "margins": {}, "errors": {}}}}
    missing = {**good, "keys": {MODEL: {"margins": {}, "errors": {}}}}
    nan = json.loads(json.dumps(good))
    next(iter(nan["keys"].values()))["theta"][0] = float("nan")
    return [("other content features", json.dumps(other_features).encode()),
            ("estimator 'paper-ema'", json.dumps(other_estimator).encode()),
            ("wrong dimensions", json.dumps(bad_key).encode()),
            ("malformed", json.dumps(missing).encode()),
            ("non-finite", json.dumps(nan).encode()),
            ("not JSON", b"{not json"), ("not a calibration snapshot", b"[1, 2]"),
            ("not JSON", b"")]


def test_a_snapshot_the_router_cannot_use_is_refused_and_changes_nothing():
    async def scenario():
        async with running(READ_WRITE) as h:
            await _taught_router(h, 5)
            stub = _stub(h)
            good = (await _calibration(h)).snapshot_json
            for why, doc in _snapshot_variants(json.loads(good)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.RestoreCalibration(pb.RestoreCalibrationRequest(snapshot_json=doc), timeout=TIMEOUT)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
                assert err.value.details().startswith("calibration not restored: ") and why in err.value.details()
                assert (await _calibration(h)).snapshot_json == good
            assert await h.serving()
    run(scenario())


def test_start_up_restore_takes_what_get_calibration_gives_and_refuses_what_restore_refuses(tmp_path):
    async def scenario():
        async with running(READ_WRITE) as h:
            await _taught_router(h, 5)
            taken = await _calibration(h)
        good, bad = tmp_path / "good.json", tmp_path / "bad.json"
        good.write_bytes(taken.snapshot_json)
        bad.write_bytes(dict(_snapshot_variants(json.loads(taken.snapshot_json)))["other content features"])
        async with running({"service": {"snapshot_path": str(good), "snapshot_interval_s": 3600}}) as h:
            again = await _calibration(h)
            assert json.loads(again.snapshot_json) == json.loads(taken.snapshot_json)
        async with running({"service": {"snapshot_path": str(bad), "snapshot_interval_s": 3600}}) as h:
            assert not (await _calibration(h)).keys
    run(scenario())


def test_restore_needs_read_write_and_off_serves_no_operator_api():
    async def scenario():
        async with running() as h:  # the default: read_only
            stub = _stub(h)
            taken = await _calibration(h)
            assert taken.estimator == "feature-kalman" and not taken.keys
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RestoreCalibration(pb.RestoreCalibrationRequest(snapshot_json=taken.snapshot_json),
                                              timeout=TIMEOUT)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "service.operator_api: read_write" in err.value.details()
        async with running({"service": {"operator_api": "off"}}) as h:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _stub(h).Explain(pb.ExplainRequest(body=chat("hi")), timeout=TIMEOUT)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert await h.serving()  # ext_proc and health are there all the same
    run(scenario())


# -- extproc explain --server -----------------------------------------------------------------------------------

async def _cli(*args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}  # the built-in config, as the server's
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "extproc", "explain", *args, cwd=REPO, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return out.decode().splitlines()


def test_explain_cli_against_the_live_router_prints_what_the_local_command_prints(tmp_path):
    async def scenario():
        async with running(READ_WRITE) as h:
            await _taught_router(h)
            requests = tmp_path / "requests.jsonl"
            requests.write_text("".join(json.dumps({"body": r["body"]}) + "\n" for r in ROWS[:12]))
            snapshot = tmp_path / "calibration.json"
            snapshot.write_bytes((await _calibration(h)).snapshot_json)
            server = f"127.0.0.1:{h.service.port}"

            remote = await _cli(str(requests), "--server", server)
            local = await _cli(str(requests), "--no-learn", "--calibration", str(snapshot))
            assert remote[0].endswith(f"decided by the router at {server}; pools: short=8192, long=65536")
            assert "decided by a local router that does not learn" in local[0]
            assert remote[1:] == local[1:]
            assert len(remote) > 12 + 4 and any(line.startswith("calibration ") for line in remote)
            assert any(" long " in line for line in remote[2:])  # the stacked long conversations

            remote_json = await _cli(str(requests), "--server", server, "--json")
            local_json = await _cli(str(requests), "--no-learn", "--calibration", str(snapshot), "--json")
            assert remote_json == local_json and len(remote_json) == min(12, len(ROWS)) + 4
            assert all(json.loads(line)["calibration_key"] == ROWS[0]["body"]["model"]
                       for line in remote_json if json.loads(line)["model"] == ROWS[0]["body"]["model"])
            # and the router still has nothing in flight and learned nothing from it
            assert h.service.router.inflight == {"short": 0, "long": 0}
            assert json.loads(snapshot.read_text()) == h.service.budget.snapshot()
    run(scenario())


def test_explain_cli_says_when_the_router_cannot_be_reached(tmp_path):
    async def scenario():
        async with running({"service": {"operator_api": "off"}}) as h:
            env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "extproc", "explain", "--server", f"127.0.0.1:{h.service.port}", cwd=tmp_path,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 1 and out == b""
            assert f"cannot explain with the router at 127.0.0.1:{h.service.port}: UNIMPLEMENTED" in err.decode()
    run(scenario())
