"""Attacks on the router's online calibration, and what honest traffic pays for them.

Every request goes through the service's own ``Router`` (extproc.service.router: the size bound,
the pool choice, which responses are read, the pending-decision table) with every response read
(``usage_sample_rate: 1``, no cap), and every response is what vLLM 0.32 would answer on the pool
the router chose: a 200 with ``usage.prompt_tokens``, or a context-length 400 ("at least
window + 1" for a text prompt that does not fit, "max_tokens must be at least 1" when it fills
the window). Responses are parsed by the core's own reader (extproc.budget.response) and learned
through ``Router.response_read``, as in production. Who sent each request is a header the router
is configured to read (``service.client_header``): honest traffic comes from ``--honest-clients``
clients, each attack from ``--attacker-clients``.

Truth is exact and never the estimator's: each body's prompt count is what vLLM reports for it,
the model's own chat template over its real tokenizer.json (extproc.tokens), or, for the
``harmony`` model, the o200k_harmony tokenizer (quicktok) over the Harmony format.

Honest traffic: chat requests built from ../shared/data/texts (single-kind texts, mixed
conversations, chats with tool schemas; ``--near-share`` of the budgets within ``--near-width``
of the short pool's 8,192, the rest far below or above; half with max_tokens).

Attacks (``--attacks``; 3,000 requests each by default, from one client):

* ``cheap-special`` — content made of the family's special-token strings (``<|begin_of_text|>``,
  ``<|reserved_special_token_7|>``, ``<|im_start|>``…: 7–30 bytes of letters and punctuation that
  vLLM encodes as ONE token each), 1.1 KB, ``max_tokens: 1`` (the issue's poisoning);
* ``cheap-runs`` — text that is cheap for its bytes without special tokens: long runs of
  ``=``, ``-``, ``*``, spaces and newlines (one token per 16–64 bytes) between a few words;
* ``expensive`` — text that costs more tokens than its bytes suggest: random alphanumeric
  strings (one token per byte), emoji and rare CJK, 2–6 KB (large enough to reach the margins);
* ``roles`` — custom role names (2–40 words each) on several turns of ordinary prose, near the
  short pool's limit, ``max_tokens: 1``;
* ``outlier`` — not an attack: one emoji-heavy prompt that the features under-estimate by ~50%,
  sent once (the issue's single outlier), then honest traffic.

For each attack a table: honest overflow (% of honest requests sent short whose true budget did
not fit), waste (% of short-eligible honest requests sent long) and MAPE of the prompt estimate,
before (``--before`` honest requests, after a warm-up), during (``--during`` honest requests
interleaved with the attack) and after it (``--after`` honest requests); with the attacked
model's Latin scale, its widest margin, and what the guards refused.

``--scenario clean``: no attack — overflow, waste and MAPE after 50 samples per model, for
Llama-3, Qwen3 and two models the router ships no priors for (``acme/assistant-v2``: Llama-3.1's
template and tokenizer under a name no family matches; ``openai/gpt-oss-20b``: o200k_harmony).
``--scenario change``: a genuine change — the model behind a name changes tokenizer and template
mid-stream; how many samples until its estimates are within 3% again (rolling MAPE of 20) and
what overflow the change cost meanwhile.

    .venv/bin/python benchmarks/attacks.py                          # every attack, one attacker client
    .venv/bin/python benchmarks/attacks.py --attacker-clients 300   # the same attacks spread over 300 identities
    .venv/bin/python benchmarks/attacks.py --scenario clean [--half 1 --priors PRIORS_FIT_ON_HALF_0]
    .venv/bin/python benchmarks/attacks.py --scenario change
"""

from __future__ import annotations

import argparse
import json
import pathlib
import pickle
import random
import statistics
import string
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import orjson

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from extproc.budget import BudgetRouter, BudgetSettings  # noqa: E402
from extproc.budget.response import read_response  # noqa: E402
from extproc.config import parse_config  # noqa: E402
from extproc.service.metrics import Metrics  # noqa: E402
from extproc.service.router import Router  # noqa: E402
from fit_priors import text_half  # noqa: E402

DEFAULT_TEXTS = ROOT.parent / "shared" / "data" / "texts" / "dev_texts.jsonl"
SHORT, LONG = 8192, 65536
CLIENT_HEADER = "x-client-id"
DEFAULT_RESERVE = BudgetSettings().default_output_tokens
MAPE_AFTER = 50  # samples per model before its estimates count in the MAPE


# -- models and their exact counts ---------------------------------------------------------------

_HARMONY_SYSTEM = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                   "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: medium\n\n"
                   "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")


@dataclass(frozen=True)
class Model:
    key: str           # short name in the tables
    name: str          # the model name requests carry (what the router keys calibration on)
    text_counts: str   # dev_texts' token-count column for its tokenizer
    counter: str       # extproc.tokens family, or "harmony"

    def count(self, body: dict) -> int:
        """The prompt count vLLM reports for the body (tools with a tool parser configured)."""
        if self.counter == "harmony":
            return _harmony_count(body)
        from extproc.tokens import counter_for

        return counter_for(self.counter).count_request("chat", body, enable_auto_tool_choice=True,
                                                       tool_call_parser="hermes")[0]


def _harmony_count(body: dict) -> int:
    import quicktok

    enc = _harmony_count.enc = getattr(_harmony_count, "enc", None) or quicktok.get_encoding("o200k_harmony")
    parts = [_HARMONY_SYSTEM]
    if body.get("tools"):
        parts.append("<|start|>developer<|message|># Tools\n\n" + "\n".join(json.dumps(t) for t in body["tools"])
                     + "<|end|>")
    for m in body["messages"]:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|start|>{m.get('role', 'user')}<|message|>{content}<|end|>")
    parts.append("<|start|>assistant")
    return len(enc.encode("".join(parts), allowed_special="all"))


MODELS = {
    "llama3": Model("llama3", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3", "llama3"),
    "qwen3": Model("qwen3", "Qwen/Qwen3-8B", "qwen3", "qwen3"),
    "acme": Model("acme (Llama-3.1, no priors)", "acme/assistant-v2", "llama3", "llama3_1"),
    "harmony": Model("gpt-oss (o200k, no priors)", "openai/gpt-oss-20b", "o200k", "harmony"),
}


# -- honest traffic ------------------------------------------------------------------------------

@dataclass
class Req:
    body: bytes
    prompt: int            # exact prompt tokens vLLM reports
    reserve: int           # max_tokens, or the router's default reserve
    max_tokens: int | None
    model: Model
    kind: str
    client: str
    honest: bool = True

    @property
    def budget(self) -> int:
        return self.prompt + self.reserve


def load_texts(path: pathlib.Path, half: int | None) -> dict[str, list[dict]]:
    by_cat: dict[str, list[dict]] = {}
    for line in path.open():
        row = json.loads(line)
        if half is None or text_half(row["id"]) == half:
            by_cat.setdefault(row["category"], []).append(row)
    return by_cat


def _fill(rng: random.Random, pool: list[dict], counts: str, tokens: int) -> list[str]:
    out, have = [], 0
    while have < tokens:
        row = rng.choice(pool)
        n = max(1, row["tokens"][counts])
        if n > tokens - have:
            out.append(row["text"][: max(1, int(len(row["text"]) * (tokens - have) / n))])
            break
        out.append(row["text"])
        have += n
    return out


def honest_request(rng: random.Random, by_cat: dict, model: Model, near_share: float, near_width: float,
                   client: str) -> Req:
    kinds = [c for c in sorted(by_cat) if c != "json"] + ["mixed", "mixed", "tools"]
    kind = rng.choice(kinds)
    max_tokens = rng.choice([256, 512, 1024, 2048, 4096]) if rng.random() < 0.5 else None
    reserve = max_tokens if max_tokens is not None else DEFAULT_RESERVE
    u = rng.random()
    if u < near_share:
        budget = int(SHORT * rng.uniform(1 - near_width, 1 + near_width))
    elif u < near_share + (1 - near_share) / 2:
        budget = int(10 ** rng.uniform(2.0, 3.8))
    else:
        budget = int(10 ** rng.uniform(4.0, 4.75))
    target = max(16, budget - reserve)
    body: dict = {"model": model.name}
    if kind == "mixed":
        cats = [c for c in by_cat if c != "json"]
        messages, have, role = [], 0, "user"
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(by_cat["chat"])["text"][:400]})
        while have < target:
            texts = _fill(rng, by_cat[rng.choice(cats)], model.text_counts, min(target - have, rng.randint(50, 3000)))
            messages.append({"role": role, "content": "\n\n".join(texts)})
            have += sum(len(t) for t in texts) // 4 + 5
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
            tools += [{"type": "function", "function": fn} for fn in (fns if isinstance(fns, list) else [fns])]
        body["tools"] = tools
        body["messages"] = [{"role": "user", "content": "\n\n".join(
            _fill(rng, by_cat["chat"], model.text_counts, max(8, target - 200 * len(tools))))}]
    else:
        body["messages"] = [{"role": "user", "content": "\n\n".join(_fill(rng, by_cat[kind], model.text_counts, target))}]
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    raw = json.dumps(body).encode() if rng.random() < 1 / 3 else orjson.dumps(body)
    return Req(raw, model.count(body), reserve, max_tokens, model, kind, client)


# -- attacks -------------------------------------------------------------------------------------

def _specials(model: Model) -> list[str]:
    from extproc.tokens import counter_for

    return sorted(counter_for(model.counter).special_tokens)


def _words(rng: random.Random, by_cat: dict, n: int) -> str:
    return " ".join(rng.choice(rng.choice(by_cat["en_prose"])["text"].split() or ["word"]) for _ in range(n))


def attack_request(rng: random.Random, attack: str, model: Model, by_cat: dict, client: str) -> Req:
    max_tokens: int | None = 1
    if attack == "cheap-special":
        specials = _specials(model)
        content = ""
        while len(content.encode()) < 1100:
            content += rng.choice(specials)
        messages = [{"role": "user", "content": content}]
    elif attack == "cheap-runs":
        pieces = []
        while sum(len(p) for p in pieces) < rng.randint(1100, 6000):
            pieces.append(rng.choice("=-*_ #.~") * rng.choice((16, 32, 64)) if rng.random() < 0.8
                          else rng.choice(("\n" * 8, _words(rng, by_cat, 3))))
        messages = [{"role": "user", "content": "".join(pieces)}]
    elif attack == "expensive":
        size = rng.randint(2000, 6000)
        alphabet = string.ascii_letters + string.digits
        if rng.random() < 0.5:
            content = "".join(rng.choice(alphabet) for _ in range(size))
        else:
            content = "".join(chr(rng.choice((rng.randint(0x1F300, 0x1F64F), rng.randint(0x20000, 0x2A6DF))))
                              for _ in range(size // 4))
        messages = [{"role": "user", "content": content}]
        max_tokens = 16
    elif attack == "roles":
        messages = []
        total = rng.randint(4000, 7800)
        while sum(len(m["content"]) for m in messages) < total * 4:
            role = "_".join(_words(rng, by_cat, rng.randint(2, 40)).split())
            messages.append({"role": role, "content": "\n\n".join(_fill(rng, by_cat["en_prose"], model.text_counts,
                                                                       rng.randint(300, 1500)))})
        messages.append({"role": "user", "content": "Summarise."})
    elif attack == "outlier":
        emoji = "".join(chr(rng.randint(0x1F300, 0x1F64F)) for _ in range(900))
        text = "\n\n".join(_fill(rng, by_cat["chat"], model.text_counts, 2500))
        messages = [{"role": "user", "content": text + "\n" + emoji}]
        max_tokens = 256
    else:
        raise ValueError(f"unknown attack {attack!r}")
    body = {"model": model.name, "messages": messages, "max_tokens": max_tokens}
    return Req(orjson.dumps(body), model.count(body), max_tokens or DEFAULT_RESERVE, max_tokens, model,
               attack, client, honest=False)


# -- the router and the responses vLLM would give ------------------------------------------------

def vllm_response(prompt: int, max_tokens: int | None, window: int) -> tuple[int, bytes]:
    """What vLLM 0.32 answers a text chat prompt of ``prompt`` tokens on a ``window``-token pool."""
    if prompt > window:
        msg = (f"This model's maximum context length is {window} tokens. However, your prompt contains at least "
               f"{window + 1} input tokens, which exceeds this limit even without any output tokens. Please reduce "
               f"the length of the input prompt. (parameter=input_tokens, value={window + 1})")
        return 400, orjson.dumps({"error": {"message": msg, "type": "BadRequestError", "param": "input_tokens",
                                            "code": 400}})
    if prompt == window:
        return 400, orjson.dumps({"error": {"message": "max_tokens must be at least 1, got 0.",
                                            "type": "BadRequestError", "param": None, "code": 400}})
    if max_tokens is not None and max_tokens > window:
        msg = f"max_tokens={max_tokens} cannot be greater than max_model_len={window}. Please request fewer output tokens."
        return 400, orjson.dumps({"error": {"message": msg, "type": "BadRequestError", "param": None, "code": 400}})
    want = max_tokens if max_tokens is not None else 200
    out = min(want, window - prompt)
    return 200, orjson.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "length" if out < want or max_tokens == out else "stop",
         "message": {"role": "assistant", "content": "x"}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}})


class Stack:
    """The service's Router with every response read, and vLLM's answers fed back."""

    def __init__(self, priors: str | None, share: float | None) -> None:
        doc = {"service": {"usage_sample_rate": 1.0, "usage_samples_per_s": 1e6, "calibration_samples": 1 << 30,
                           "client_header": CLIENT_HEADER, "client_hash_key": "benchmark-hash-key-0001"}}
        if share is not None:
            doc["learning"] = {"client_share": share}
        cfg = parse_config(doc)
        self.budget = BudgetRouter(cfg.budget if priors is None else replace(cfg.budget, priors_path=priors))
        self.router = Router(self.budget, cfg.service, Metrics())
        self.window = {p.name: p.max_context for p in self.budget.pools}

    def send(self, req: Req):
        r = self.router
        client = r.client_of({CLIENT_HEADER: req.client}.get)
        routed = r.route(req.body, "/v1/chat/completions", client=client)
        status, body = vllm_response(req.prompt, req.max_tokens, self.window[routed.pool])
        if routed.read:
            r.response_read(routed.decision_id, read_response(status, "application/json", body))
        r.finished(routed.pool)
        return routed


# -- measuring -----------------------------------------------------------------------------------

@dataclass
class Tally:
    n: int = 0
    eligible: int = 0
    overflow: int = 0
    waste: int = 0
    ape: list[float] = field(default_factory=list)

    def add(self, req: Req, routed, count_error: bool) -> None:
        d = routed.decision
        fits = req.budget <= SHORT
        self.n += 1
        self.eligible += fits
        self.overflow += routed.pool == "short" and not fits
        self.waste += routed.pool != "short" and fits
        if count_error and d.source not in ("bound", "fallback", "exact"):
            self.ape.append(abs(d.prompt_tokens - req.prompt) / req.prompt)

    def row(self) -> tuple[str, str, str]:
        mape = f"{100 * statistics.fmean(self.ape):.2f}" if self.ape else "-"
        return (f"{100 * self.overflow / max(1, self.n):.2f}", f"{100 * self.waste / max(1, self.eligible):.2f}", mape)


class Run:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.seen: dict[str, int] = {}

    def honest(self, reqs: list[Req], tally: Tally | None) -> None:
        for req in reqs:
            routed = self.stack.send(req)
            self.seen[req.model.name] = self.seen.get(req.model.name, 0) + 1
            if tally is not None:
                tally.add(req, routed, self.seen[req.model.name] > MAPE_AFTER)

    def state(self, model: Model) -> str:
        cal = self.stack.budget.calibration(model.name) or {}
        learning = self.stack.budget.learning(model.name) or {}
        scales, margins = cal.get("scales", {}), cal.get("margins", {})
        widest = max(margins.items(), key=lambda kv: kv[1]) if margins else ("-", 0.0)
        return (f"latin {scales.get('latin', 1.0):.3f}  punct {scales.get('punct', 1.0):.3f}  "
                f"special {scales.get('special', 1.0):.2f}  prose margin {margins.get('prose', 0):.3f}  "
                f"widest {widest[0]} {widest[1]:.3f}  refused {learning.get('refused', 0)}  "
                f"unexplained {cal.get('unexplained', '-')}")


def build(label: str, cache: pathlib.Path | None, make: Callable[[], list[Req]]) -> list[Req]:
    if cache is not None:
        path = cache / f"{label}.pkl"
        if path.exists():
            return pickle.loads(path.read_bytes())
    reqs = make()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{label}.pkl").write_bytes(pickle.dumps(reqs))
    return reqs


def honest_stream(args, by_cat, models: list[Model], n: int, seed: int, cache) -> list[Req]:
    seed += 1000 * args.seed

    def make():
        rng = random.Random(seed)
        return [honest_request(rng, by_cat, rng.choice(models), args.near_share, args.near_width,
                               f"honest-{rng.randrange(args.honest_clients)}") for _ in range(n)]
    return build(f"honest-{'+'.join(m.counter for m in models)}-{n}-{seed}-{args.near_share}-{args.near_width}-"
                 f"{args.half}-{args.honest_clients}", cache, make)


def attack_scenario(args, by_cat, attack: str, cache) -> list[str]:
    models = [MODELS["llama3"], MODELS["qwen3"]]
    target = MODELS[args.target]
    warm = honest_stream(args, by_cat, models, args.warmup, 1, cache)
    before = honest_stream(args, by_cat, models, args.before, 2, cache)
    during_honest = honest_stream(args, by_cat, models, args.during, 3, cache)
    after = honest_stream(args, by_cat, models, args.after, 4, cache)
    n_attack = 1 if attack == "outlier" else args.requests

    def make():
        rng = random.Random(11 + 1000 * args.seed)
        return [attack_request(rng, attack, target, by_cat, f"attacker-{rng.randrange(args.attacker_clients)}")
                for _ in range(n_attack)]
    attacks = build(f"attack-{attack}-{target.counter}-{n_attack}-{args.attacker_clients}-{args.half}-{args.seed}",
                    cache, make)
    run = Run(Stack(args.priors, args.client_share))
    run.honest(warm, None)
    t_before = Tally()
    run.honest(before, t_before)
    state_before = run.state(target)
    # the attack, with the honest requests spread evenly through it
    t_during, attack_tally = Tally(), Tally()
    step = max(1, len(attacks) // max(1, len(during_honest)))
    hi = 0
    for i, req in enumerate(attacks):
        routed = run.stack.send(req)
        attack_tally.add(req, routed, True)
        if i % step == step - 1 and hi < len(during_honest):
            run.honest([during_honest[hi]], t_during)
            hi += 1
    run.honest(during_honest[hi:], t_during)
    state_during = run.state(target)
    t_after = Tally()
    run.honest(after, t_after)
    state_after = run.state(target)
    est = [abs(e) for e in attack_tally.ape]
    lines = [f"attack {attack}: {len(attacks)} requests to {target.name} from {args.attacker_clients} client(s), "
             f"every response learned; attack prompts' estimate error {100 * statistics.fmean(est):.0f}% "
             f"(median {100 * statistics.median(est):.0f}%)" if est else f"attack {attack}",
             f"{'phase':<8} {'honest':>6} {'short-elig':>10} {'overflow%':>9} {'waste%':>7} {'MAPE%':>6}  calibration of the attacked model"]
    for name, tally, state in (("before", t_before, state_before), ("during", t_during, state_during),
                               ("after", t_after, state_after)):
        over, waste, mape = tally.row()
        lines.append(f"{name:<8} {tally.n:>6} {tally.eligible:>10} {over:>9} {waste:>7} {mape:>6}  {state}")
    return lines


def clean_scenario(args, by_cat, cache) -> list[str]:
    lines = [f"{'model':<30} {'n':>5} {'short-elig':>10} {'overflow%':>9} {'waste%':>7} {'MAPE%':>6}  "
             f"(MAPE after {MAPE_AFTER} samples per model)"]
    for key in ("llama3", "qwen3", "acme", "harmony"):
        model = MODELS[key]
        reqs = honest_stream(args, by_cat, [model], args.clean_requests, 21, cache)
        run, tally = Run(Stack(args.priors, args.client_share)), Tally()
        run.honest(reqs, tally)
        over, waste, mape = tally.row()
        lines.append(f"{model.key:<30} {tally.n:>5} {tally.eligible:>10} {over:>9} {waste:>7} {mape:>6}")
    return lines


def change_scenario(args, by_cat, cache) -> list[str]:
    """A model name whose tokenizer and template change mid-stream."""
    name = "acme/served-model"
    lines = [f"{'change':<34} {'to MAPE<=3%':>11} {'overflow% (first 300 after)':>28} {'waste%':>7}  "
             f"(samples after the change; rolling MAPE of 20)"]
    for old, new in (("llama3", "qwen3"), ("qwen3", "llama3"), ("llama3", "harmony"), ("llama3", "acme")):
        a, b = MODELS[old], MODELS[new]
        a2, b2 = Model(a.key, name, a.text_counts, a.counter), Model(b.key, name, b.text_counts, b.counter)
        first = honest_stream(args, by_cat, [a2], 300, 31, cache)
        then = honest_stream(args, by_cat, [b2], 600, 32, cache)
        run = Run(Stack(args.priors, args.client_share))
        run.honest(first, None)
        errors, converged, tally = [], None, Tally()
        for i, req in enumerate(then):
            routed = run.stack.send(req)
            if i < 300:
                tally.add(req, routed, False)
            d = routed.decision
            if d.source not in ("bound", "fallback", "exact"):
                errors.append(abs(d.prompt_tokens - req.prompt) / req.prompt)
                if converged is None and len(errors) >= 20 and statistics.fmean(errors[-20:]) <= 0.03:
                    converged = i + 1
        over, waste, _ = tally.row()
        lines.append(f"{a.key + ' -> ' + b.key:<34} {converged if converged is not None else '>600':>11} "
                     f"{over:>28} {waste:>7}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=("attacks", "clean", "change"), default="attacks")
    ap.add_argument("--attacks", default="cheap-special,cheap-runs,expensive,roles,outlier")
    ap.add_argument("--target", choices=("llama3", "qwen3"), default="llama3", help="the attacked model")
    ap.add_argument("--requests", type=int, default=3000, help="requests per attack")
    ap.add_argument("--attacker-clients", type=int, default=1)
    ap.add_argument("--honest-clients", type=int, default=16)
    ap.add_argument("--client-share", type=float, help="learning.client_share (default: the router's)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--before", type=int, default=1000)
    ap.add_argument("--during", type=int, default=1000)
    ap.add_argument("--after", type=int, default=1000)
    ap.add_argument("--clean-requests", type=int, default=2000)
    ap.add_argument("--near-share", type=float, default=0.45)
    ap.add_argument("--near-width", type=float, default=0.30)
    ap.add_argument("--texts", type=pathlib.Path, default=DEFAULT_TEXTS)
    ap.add_argument("--half", type=int, choices=(0, 1), help="texts of one half only (held out from priors "
                    "fitted on the other: fit_priors.py --half)")
    ap.add_argument("--priors", help="priors.json to route with (default: the packaged one)")
    ap.add_argument("--seed", type=int, default=0, help="another draw of every request stream")
    ap.add_argument("--cache", type=pathlib.Path, help="keep built requests here (building counts every body)")
    args = ap.parse_args()
    if not args.texts.exists():
        sys.exit(f"SKIP: texts not found at {args.texts} (the shared data set is needed)")
    by_cat = load_texts(args.texts, args.half)
    t0 = time.time()
    print(f"seed {args.seed}; texts {args.texts.name}{'' if args.half is None else f' (half {args.half})'}, priors "
          f"{args.priors or 'packaged'}; honest budgets: {100 * args.near_share:.0f}% within "
          f"±{100 * args.near_width:.0f}% of {SHORT}; {args.honest_clients} honest clients\n")
    if args.scenario == "clean":
        print("\n".join(clean_scenario(args, by_cat, args.cache)))
    elif args.scenario == "change":
        print("\n".join(change_scenario(args, by_cat, args.cache)))
    else:
        for attack in args.attacks.split(","):
            print("\n".join(attack_scenario(args, by_cat, attack, args.cache)) + "\n", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
