"""Routing quality and speed of the budget core, on real text with real tokenizers.

Builds chat requests from ../shared/data/texts/dev_texts.jsonl (or --texts): single-kind
requests per text category, mixed multi-turn conversations, and chats with tool schemas; total
budgets spread around the short pool's 8,192 limit (most within ±25%) and far from it; half with
max_tokens; a third of the bodies written with ASCII escapes; two model families. The true
prompt count of each body is what vLLM would report: the model's chat template tokenised by the
real Llama-3 / Qwen3 tokenizer.json, as vLLM counts it (extproc.tokens). Each estimator replays the
requests online: route, then learn from the true count.

Columns: overflow = sent short while the true budget exceeds the short pool (% of all
requests); waste = fit short but sent long (% of short-eligible requests); MAPE = mean absolute
error of the prompt estimate after each model's first 50 samples.

    .venv/bin/python benchmarks/routing_quality.py [--texts PATH] [--requests N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys
import time
from collections import defaultdict

import orjson

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extproc.tokens import counter_for  # noqa: E402
from extproc.budget import BudgetRouter, BudgetSettings  # noqa: E402
from fit_priors import text_half  # noqa: E402

DEFAULT_TEXTS = ROOT.parent / "shared" / "data" / "texts" / "dev_texts.jsonl"
SHORT = 8192
WARMUP = 50
MODELS = {"llama3": "meta-llama/Llama-3.1-8B-Instruct", "qwen3": "Qwen/Qwen3-8B"}
DEFAULT_RESERVE = BudgetSettings().default_output_tokens


def load_texts(path: pathlib.Path, half: int | None = None) -> dict[str, list[dict]]:
    by_cat: dict[str, list[dict]] = defaultdict(list)
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            if half is None or text_half(row["id"]) == half:
                by_cat[row["category"]].append(row)
    return by_cat


NEAR_SHARE = 0.6


def target_budget(rng: random.Random) -> int:
    u = rng.random()
    if u < NEAR_SHARE:  # near the short pool's limit: where misroutes and waste happen
        return int(SHORT * rng.uniform(0.75, 1.25))
    if u < NEAR_SHARE + (1 - NEAR_SHARE) / 2:
        return int(10 ** rng.uniform(2.0, 3.8))
    return int(10 ** rng.uniform(4.0, 4.75))


def fill(rng: random.Random, pool: list[dict], family: str, tokens: int) -> list[str]:
    """Texts from ``pool`` whose token counts add up to about ``tokens`` (the last one cut)."""
    out, have = [], 0
    while have < tokens:
        row = rng.choice(pool)
        need = tokens - have
        n = row["tokens"][family]
        if n > need:
            text = row["text"][: max(1, int(len(row["text"]) * need / n))]
            out.append(text)
            break
        out.append(row["text"])
        have += n
    return out


def build_request(rng: random.Random, by_cat: dict[str, list[dict]], family: str, kind: str) -> dict:
    max_tokens = rng.choice([256, 512, 1024, 2048, 4096]) if rng.random() < 0.5 else None
    reserve = max_tokens if max_tokens is not None else DEFAULT_RESERVE
    prompt_target = max(16, target_budget(rng) - reserve)
    body: dict = {"model": MODELS[family]}
    if kind == "mixed":
        cats = [c for c in by_cat if c != "json"]
        messages, have, role = [], 0, "user"
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(by_cat["chat"])["text"][:400]})
        while have < prompt_target:
            texts = fill(rng, by_cat[rng.choice(cats)], family, min(prompt_target - have, rng.randint(50, 3000)))
            content = "\n\n".join(texts)
            messages.append({"role": role, "content": content})
            have += counter_for(family).count_text(content) + 5
            role = "assistant" if role == "user" else "user"
        if messages[-1]["role"] == "assistant":
            messages.append({"role": "user", "content": rng.choice(by_cat["chat"])["text"]})
        body["messages"] = messages
    elif kind == "tools":
        tools = []
        for row in rng.sample(by_cat["json"], rng.randint(1, 4)):
            try:
                fns = json.loads(row["text"])
            except ValueError:
                continue
            for fn in fns if isinstance(fns, list) else [fns]:
                tools.append({"type": "function", "function": fn})
        body["tools"] = tools
        texts = fill(rng, by_cat["chat"], family, max(8, prompt_target - 200 * len(tools)))
        body["messages"] = [{"role": "user", "content": "\n\n".join(texts)}]
    else:
        texts = fill(rng, by_cat[kind], family, prompt_target)
        body["messages"] = [{"role": "user", "content": "\n\n".join(texts)}]
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    # what vLLM reports: tools need a tool parser (a server started with --enable-auto-tool-choice)
    true_prompt = counter_for(family).count_request("chat", body, enable_auto_tool_choice=True,
                                                    tool_call_parser="hermes")[0]
    escaped = rng.random() < 1 / 3
    raw = json.dumps(body).encode() if escaped else orjson.dumps(body)
    return {"kind": kind, "family": family, "body": raw, "prompt": true_prompt,
            "budget": true_prompt + reserve, "model": body["model"]}


def build_requests(by_cat, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    kinds = [c for c in sorted(by_cat) if c != "json"] + ["mixed", "mixed", "tools"]
    reqs = [build_request(rng, by_cat, rng.choice(list(MODELS)), rng.choice(kinds)) for _ in range(n)]
    return reqs


class _Row:
    def __init__(self) -> None:
        self.n = self.eligible = self.overflow = self.waste = 0
        self.ape: list[float] = []


def replay(requests: list[dict], estimator_name: str | None, priors: str | None = None,
           settings: dict | None = None) -> dict[str, _Row]:
    """Route then observe every request; estimator None routes on the true count (the limit)."""
    router = BudgetRouter(BudgetSettings(estimator=estimator_name or "fixed-ratio", priors_path=priors,
                                         estimator_settings=settings or {}))
    rows: dict[str, _Row] = defaultdict(_Row)
    seen: dict[str, int] = defaultdict(int)
    for r in requests:
        d, observation = router.route_learnable(r["body"], "/v1/chat/completions")
        if estimator_name is None:
            budget_est = r["prompt"] + d.output_tokens
            pool, point = ("short" if budget_est <= SHORT else "long"), r["prompt"]
        else:
            pool, point = d.pool, d.prompt_tokens
            router.observe(observation, r["prompt"])
        seen[r["model"]] += 1
        for key in (r["kind"], "ALL"):
            row = rows[key]
            row.n += 1
            fits_short = r["budget"] <= SHORT
            row.eligible += fits_short
            row.overflow += (pool == "short" and not fits_short)
            row.waste += (pool != "short" and fits_short)
            if seen[r["model"]] > WARMUP:
                row.ape.append(abs(point - r["prompt"]) / r["prompt"])
    return rows


def speed_table() -> list[str]:
    router = BudgetRouter()
    base = [row["text"] for rows in load_texts(DEFAULT_TEXTS).values() for row in rows] \
        if DEFAULT_TEXTS.exists() else ["The quick brown fox jumps over the lazy dog. " * 20]
    text = "\n".join(base)
    lines = [f"{'body':>8} {'route µs':>10} {'µs/KB':>8} {'orjson.loads µs':>16} {'route/parse':>12}"]
    for size in (1_000, 100_000, 1_000_000):
        content = text[:size]
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 64})
        n = max(20, 2_000_000 // size)
        for _ in range(3):
            router.route(body)

        def best_of(fn) -> float:
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                times.append((time.perf_counter() - t0) / n)
            return min(times) * 1e6

        t_route = best_of(lambda: router.route(body))
        t_parse = best_of(lambda: orjson.loads(body))
        kb = len(body) / 1024
        lines.append(f"{len(body):>8} {t_route:>10.1f} {t_route / kb:>8.2f} {t_parse:>16.1f} {t_route / t_parse:>12.2f}")
    return lines


def main() -> None:
    global NEAR_SHARE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=pathlib.Path, default=DEFAULT_TEXTS)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--priors", help="priors.json to use (default: the packaged one)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a feature-kalman setting for the default row, e.g. --set margin_quantile=0.95")
    ap.add_argument("--near-share", type=float, default=NEAR_SHARE,
                    help="share of requests with budgets within ±25%% of the short pool's limit")
    ap.add_argument("--half", type=int, choices=(0, 1),
                    help="build requests from one half of the texts (fit priors on the other: held-out check)")
    args = ap.parse_args()
    if not args.texts.exists():
        sys.exit(f"SKIP: texts not found at {args.texts} (the shared data set is needed)")
    NEAR_SHARE = args.near_share
    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = float(value) if "." in value else int(value)
    t0 = time.time()
    requests = build_requests(load_texts(args.texts, args.half), args.requests, args.seed)
    near = sum(1 for r in requests if 0.75 * SHORT <= r["budget"] <= 1.25 * SHORT)
    print(f"{len(requests)} requests from {args.texts.name} ({near} within ±25% of {SHORT}), "
          f"built and tokenised in {time.time() - t0:.1f}s; seed {args.seed}\n")
    rows = {"fixed 4.0 B/tok": replay(requests, "fixed-ratio"), "paper EMA": replay(requests, "paper-ema"),
            "feature-kalman (default)": replay(requests, "feature-kalman", args.priors, settings),
            "tokenizer (limit)": replay(requests, None)}
    kinds = sorted(k for k in rows["tokenizer (limit)"] if k != "ALL") + ["ALL"]
    print(f"{'estimator':<26} {'kind':<13} {'n':>5} {'overflow%':>10} {'waste%':>8} {'MAPE%':>7}")
    for name, res in rows.items():
        for kind in kinds:
            r = res[kind]
            mape = 100 * statistics.fmean(r.ape) if r.ape else float("nan")
            print(f"{name:<26} {kind:<13} {r.n:>5} {100 * r.overflow / r.n:>10.2f} "
                  f"{100 * r.waste / max(1, r.eligible):>8.2f} {mape:>7.2f}")
        print()
    if not args.no_speed:
        print("route() speed (best of 5 runs, same process; orjson.loads of the same body as the baseline)")
        print("\n".join(speed_table()))


if __name__ == "__main__":
    main()
