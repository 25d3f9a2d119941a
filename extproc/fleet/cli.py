"""``extproc simulate`` and ``extproc plan``: the fleet simulator and the sizing planner from the shell.

Tables for people by default, ``--json`` for machines, ``--plot FILE.png`` for the sweep.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys

import numpy as np

from extproc.fleet import plan as planner
from extproc.fleet import routing, sim, workload
from extproc.fleet.instance import GPU_PRICE_PER_HOUR, HARDWARE, InstanceProfile, hardware_profile

SHARED_REQUESTS = workload.SHARED_TRACES.parent / "requests" / "dev_requests.jsonl"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="azure-conv",
                   help=f"one of {', '.join(workload.TRACES)} (from ../shared/data/traces) or a file of the same "
                        "format (default: %(default)s)")
    p.add_argument("--trace-dir", help="directory holding the shared traces (default: ../shared/data/traces)")
    p.add_argument("--arrivals", choices=["trace", "poisson"], default="trace",
                   help="the trace's own arrival pattern time-scaled to --rate, or Poisson (default: %(default)s)")
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second (default: %(default)s)")
    p.add_argument("--requests", type=int, default=50_000, help="requests to simulate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hardware", choices=sorted(HARDWARE), default="llama3-70b-a100",
                   help="model and GPUs of every instance (default: %(default)s)")
    p.add_argument("--short", type=int, default=8_192, help="short pool context, tokens (default: %(default)s)")
    p.add_argument("--long", default="auto",
                   help="long pool (and homogeneous fleet) context in tokens; auto = 65536, or the next power "
                        "of two holding the workload's longest request (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8_192,
                   help="vLLM's per-iteration token budget (chunked prefill) (default: %(default)s)")
    p.add_argument("--error", default="exact",
                   help="router estimate error: exact | lognormal:BIAS:SD | replay[:REQUESTS.jsonl] "
                        "(replay runs the budget core on real bodies; default: %(default)s)")
    p.add_argument("--dispatch", choices=sorted(routing.DISPATCH), default="least-requests",
                   help="instance choice inside a pool: outstanding requests (Envoy's LEAST_REQUEST) or prompt "
                        "tokens not yet prefilled (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="leading fraction of requests left out of latency statistics (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def register(sub) -> None:
    p = sub.add_parser("simulate", help="replay a trace through a simulated vLLM fleet and report latencies")
    _common(p)
    p.add_argument("--router", choices=["pools", "least-loaded", "round-robin"], default="pools",
                   help="token-budget pools, or one homogeneous pool dispatched least-loaded / round robin")
    p.add_argument("--short-instances", type=int, help="short pool size (default: sized for the SLO)")
    p.add_argument("--long-instances", type=int, help="long pool size (default: sized for the SLO)")
    p.add_argument("--instances", type=int, help="homogeneous fleet size (default: sized for the SLO)")
    p.add_argument("--pool", action="append", default=[], metavar="CONTEXT:INSTANCES",
                   help="N pools instead of --short/--long: repeat, e.g. --pool 4096:40 --pool 16384:60 "
                        "--pool 65536:10 (each shaped by --hardware for its context)")
    p.add_argument("--spill-at", type=int, help="spill to the next larger pool when every instance of the preferred "
                   "one has this many requests outstanding (default: no spillover)")
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("plan", help="fewest GPUs meeting the SLO: homogeneous against token-budget pools")
    _common(p)
    p.add_argument("--slo-ttft", type=float, default=2.0, help="P99 TTFT target, s (default: %(default)s)")
    p.add_argument("--slo-tpot", type=float, default=0.080, help="P99 TPOT target, s (default: %(default)s)")
    p.add_argument("--ttft-basis", choices=["queue", "total"], default="queue",
                   help="queue: TTFT beyond the prompt's own unloaded prefill; total: literal TTFT "
                        "(default: %(default)s)")
    p.add_argument("--price", type=float, help="$ per GPU-hour (default: the GPU's: "
                   + ", ".join(f"{k} {v}" for k, v in GPU_PRICE_PER_HOUR.items()) + ")")
    p.add_argument("--sweep", help="comma-separated short-pool limits to compare, e.g. 2048,4096,8192,16384,32768")
    p.add_argument("--plot", help="write the sweep's plot to this PNG file")
    p.set_defaults(func=cmd_plan)


# --- inputs ---------------------------------------------------------------------------------------------


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_workload(args) -> workload.Workload:
    try:
        trace = workload.load_trace(args.trace, args.trace_dir)
    except workload.TraceUnavailable as exc:
        _fail(str(exc))
    if args.rate <= 0 or args.requests < 1:
        _fail("--rate must be > 0 and --requests >= 1")
    if args.arrivals == "poisson":
        return workload.poisson(trace, rate=args.rate, count=args.requests, seed=args.seed)
    return workload.from_trace(trace, rate=args.rate, count=args.requests)


def error_model(spec: str, seed: int) -> routing.ErrorModel:
    kind, _, rest = spec.partition(":")
    if kind == "exact":
        return routing.ErrorModel()
    if kind == "lognormal":
        try:
            bias, sd = (float(x) for x in rest.split(":"))
        except ValueError:
            _fail("--error lognormal:BIAS:SD, e.g. lognormal:0.03:0.02 (log-ratio mean and spread)")
        return routing.ErrorModel("lognormal", bias=bias, sd=sd)
    if kind == "replay":
        path = pathlib.Path(rest) if rest else SHARED_REQUESTS
        if not path.is_file():
            _fail(f"--error replay needs real request bodies with exact counts: {path} not found")
        return routing.replayed_errors(path, seed)
    _fail(f"--error {spec!r}: expected exact, lognormal:BIAS:SD or replay[:PATH]")
    raise AssertionError  # unreachable


def profiles(args, wl: workload.Workload) -> tuple[InstanceProfile, InstanceProfile, list[str]]:
    notes = []
    if args.long == "auto":
        long_len = planner.long_context(wl)
        if long_len != 65_536:
            notes.append(f"long pool context {long_len} (auto): the workload's longest request is "
                         f"{int(wl.total.max())} tokens")
    else:
        try:
            long_len = int(args.long)
        except ValueError:
            _fail(f"--long must be a token count or auto, got {args.long!r}")
    if not 0 < args.short < long_len:
        _fail(f"--short ({args.short}) must be below the long pool's context ({long_len})")
    try:
        short = hardware_profile(args.hardware, max_model_len=args.short, name="short")
        long = hardware_profile(args.hardware, max_model_len=long_len, name="long")
    except ValueError as exc:
        _fail(str(exc))
    btok = args.max_num_batched_tokens
    return short.with_overrides(max_num_batched_tokens=btok), long.with_overrides(max_num_batched_tokens=btok), notes


# --- simulate -------------------------------------------------------------------------------------------


def cmd_simulate(args) -> int:
    wl = load_workload(args)
    short, long, notes = profiles(args, wl)
    err = error_model(args.error, args.seed)
    ratios = err.ratios(len(wl), args.seed)
    if args.router == "pools" and args.pool:
        notes = []  # --short/--long do not apply
        pools = []
        for spec in args.pool:
            try:
                ctx, count = (int(x) for x in spec.split(":"))
                prof = hardware_profile(args.hardware, max_model_len=ctx, name=f"{ctx // 1024}K")
            except ValueError:
                _fail(f"--pool takes CONTEXT:INSTANCES with a context the hardware holds, got {spec!r}")
            pools.append(sim.PoolSpec(prof.name, prof.with_overrides(max_num_batched_tokens=args.max_num_batched_tokens),
                                      count))
        pools.sort(key=lambda p: p.profile.max_model_len)
        spill = [args.spill_at] * (len(pools) - 1) + [None] if args.spill_at else None

        def factory(inst, w):
            return routing.TokenBudget(inst, w, ratios=ratios, spill_at=spill, dispatch=args.dispatch)
    elif args.router == "pools":
        n_short, n_long = args.short_instances, args.long_instances
        if n_short is None or n_long is None:
            sized = planner.plan(wl, short, long, error=err, seed=args.seed, warmup=args.warmup,
                                 price_per_gpu_hour=0.0, dispatch=args.dispatch)
            n_short = n_short or max(sized.pools[0].instances, 1)
            n_long = n_long or max(sized.pools[1].instances, 1)
            notes.append(f"pool sizes from the SLO planner: short {n_short}, long {n_long}")
        pools = [sim.PoolSpec("short", short, n_short), sim.PoolSpec("long", long, n_long)]
        spill = [args.spill_at, None] if args.spill_at else None

        def factory(inst, w):
            return routing.TokenBudget(inst, w, ratios=ratios, spill_at=spill, dispatch=args.dispatch)
    else:
        n = args.instances
        if n is None:
            n = max(planner.size_pool("homogeneous", wl.subset(wl.total <= long.max_model_len), long,
                                      planner.SLO(), warmup=args.warmup, dispatch=args.dispatch).instances, 1)
            notes.append(f"fleet size from the SLO planner: {n}")
        pools = [sim.PoolSpec("homogeneous", long, n)]
        if args.router == "least-loaded":
            factory = functools.partial(routing.LeastLoaded, dispatch=args.dispatch)
        else:
            factory = routing.RoundRobin
    result = _run_with_progress(wl, pools, factory, args.warmup)
    summary = result.summary()
    summary.update(workload=wl.name, rate=wl.rate, rate_asked=args.rate, router=args.router,
                   error_model=err.describe(), notes=notes, hardware=args.hardware, warmup=args.warmup)
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return 0
    print(f"{wl.name}: {len(wl):,} requests at {rate_text(args.rate, wl.rate)} on {args.hardware}; "
          f"router {args.router}; estimate error {err.describe()}")
    for note in notes:
        print(f"  note: {note}")
    print(f"  note: latencies leave out the first {args.warmup:.0%} of requests ({result.warmup:,}, "
          "--warmup: the fleet starts empty); 'served' counts the requests measured")
    rows = []
    for k, pr in enumerate(result.pools):
        rows.append(_latency_row(pr.name, pr.instances, result, result.pool_of == k) | {
            "rejected": pr.rejected, "preempted": pr.preemptions, "busy %": 100 * pr.busy,
            "seq util %": 100 * pr.seq_util, "kv util %": 100 * pr.kv_util})
    rows.append(_latency_row("fleet", sum(p.instances for p in pools), result, np.ones(len(wl), bool)) | {
        "rejected": summary["rejected"], "preempted": summary["preemptions"]})
    print(table(rows))
    print(f"simulated {len(wl):,} requests in {result.wall_s:.2f} s: {summary['us_per_request']:.1f} µs per request")
    return 0


def rate_text(asked: float, delivered: float) -> str:
    """The rate asked for, and what the workload delivered where the two differ: a time-scaled
    trace keeps its own burstiness, so a window of it runs above or below the mean rate."""
    text = f"{asked:,.0f} req/s"
    if f"{asked:,.0f}" != f"{delivered:,.0f}":
        text += f" asked ({delivered:,.0f} req/s delivered by the trace's arrivals)"
    return text


def change_text(savings: float) -> str:
    """A signed GPU saving in words: '13.5% fewer', '9.7% more'."""
    if abs(savings) < 5e-4:
        return "no change"
    return f"{100 * abs(savings):.1f}% {'fewer' if savings > 0 else 'more'}"


def _latency_row(name: str, instances: int, result: sim.SimResult, mask: np.ndarray) -> dict:
    m = result.measured() & mask
    ttft, tpot = result.ttft[m], result.tpot[m]
    tpot = tpot[~np.isnan(tpot)]

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else math.nan
    return {"pool": name, "instances": instances, "served": int(m.sum()),
            "TTFT p50 s": pct(ttft, 50), "TTFT p99 s": pct(ttft, 99),
            "TPOT p50 ms": 1000 * pct(tpot, 50), "TPOT p99 ms": 1000 * pct(tpot, 99)}


def _run_with_progress(wl, pools, factory, warmup) -> sim.SimResult:
    from tqdm import tqdm

    with tqdm(total=len(wl), desc="simulating", unit="req", disable=None, leave=False) as bar:
        last = [0]

        def progress(done: int, total: int) -> None:
            bar.update(done - last[0])
            last[0] = done
        return sim.simulate(wl, pools, factory, warmup=warmup, progress=progress)


# --- plan -----------------------------------------------------------------------------------------------


def cmd_plan(args) -> int:
    from tqdm import tqdm

    wl = load_workload(args)
    short, long, notes = profiles(args, wl)
    err = error_model(args.error, args.seed)
    try:
        slo = planner.SLO(args.slo_ttft, args.slo_tpot, args.ttft_basis)
    except ValueError as exc:
        _fail(str(exc))
    price = args.price if args.price is not None else GPU_PRICE_PER_HOUR.get(long.gpu, 0.0)
    limits = [args.short]
    if args.sweep:
        try:
            limits = sorted({int(x) for x in args.sweep.split(",") if x.strip()})
        except ValueError:
            _fail(f"--sweep takes comma-separated token counts, got {args.sweep!r}")
    with tqdm(desc="sizing (simulations)", unit="sim", disable=None, leave=False) as bar:
        kwargs = dict(slo=slo, error=err, seed=args.seed, price_per_gpu_hour=price, warmup=args.warmup,
                      on_sim=lambda: bar.update(1), dispatch=args.dispatch)
        try:
            plans = planner.sweep(wl, args.hardware, limits, long, **kwargs)
        except ValueError as exc:
            _fail(str(exc))
    for p in plans:
        p.assumptions.extend(notes)
    if args.plot:
        from extproc.fleet.plot import plot_sweep

        plot_sweep(plans, args.plot, title=f"{wl.name} at {rate_text(args.rate, wl.rate)}, {args.hardware}")
    front = planner.pareto_front(plans)
    if args.json:
        doc = {"hardware": args.hardware, "rate_asked": args.rate, "plans": [p.as_dict() | {"pareto": f, "fleet_ttft_p50_s":
                                                                     planner.fleet_ttft_p50(p)}
                                                    for p, f in zip(plans, front)]}
        print(json.dumps(doc, indent=2, default=float))
        return 0
    print_plans(plans, front, args.hardware, args.rate)
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def print_plans(plans: list[planner.Plan], front: list[bool], hardware: str, rate_asked: float | None = None) -> None:
    first = plans[0]
    rate = rate_text(first.rate if rate_asked is None else rate_asked, first.rate)
    print(f"{first.workload}: {first.requests:,} requests at {rate}, {hardware}")
    print("assumptions:")
    for a in first.assumptions:
        print(f"  - {a}")
    for p in plans:
        m = p.model
        d = p.as_dict()
        print(f"\nshort pool <= {p.short_limit} tokens")
        rows = [p.homogeneous.row(p.slo)] + [s.row(p.slo) for s in p.pools]
        queue = p.slo.ttft_basis == "queue"
        print(table([{"fleet": r["pool"], "context": r["max_model_len"], "seqs": r["max_num_seqs"],
                      "requests": r["requests"], "instances": r["instances"], "GPUs": r["gpus"],
                      "TTFT p50 s": r["ttft_s_p50"], "TTFT p99 s": r["ttft_s_p99"],
                      # the TTFT feasibility is judged on, beside the literal one
                      **({"queue TTFT p99 s": r["slo_ttft_s_p99"]} if queue else {}),
                      "TPOT p99 ms": None if r["tpot_s_p99"] is None else 1000 * r["tpot_s_p99"],
                      "seq util %": 100 * r["seq_util"], "feasible": r["feasible"]} for r in rows]))
        ttft = "queue TTFT (TTFT beyond the prompt's own unloaded prefill)" if queue else "TTFT"
        print(f"  feasible: P99 {ttft} <= {p.slo.ttft_p99_s:g} s and P99 TPOT <= {1000 * p.slo.tpot_p99_s:g} ms"
              + ("; TTFT p50/p99 are literal (--ttft-basis total judges those)" if queue else ""))
        usd = d["usd_per_year"]
        print(f"  GPUs: homogeneous {p.homogeneous.gpus:,} -> pooled {p.pooled_gpus:,} "
              f"({change_text(p.savings)}); ${usd['homogeneous'] / 1e6:,.1f}M -> ${usd['pooled'] / 1e6:,.1f}M "
              f"per year at ${usd['price_per_gpu_hour']}/GPU-h")
        print(f"  cost model: alpha {m.alpha_load:.3f} (share of homogeneous load; by count {m.alpha_count:.3f}), "
              f"rho {m.rho:.2f} -> predicted savings {100 * m.savings:.1f}% "
              f"(with alpha by count {100 * m.savings_by_count:.1f}%, drift {100 * m.drift:+.1f} points); "
              f"sized: {change_text(p.savings)} GPUs")
        if p.misrouted or p.too_long:
            print(f"  misrouted (rejected by the short pool): {p.misrouted}; longer than the long pool: {p.too_long}")
    if len(plans) > 1:
        print("\nsweep of the short-pool limit (* = Pareto-optimal in GPUs and fleet median TTFT)")
        print(table([{"limit": p.short_limit, "short share %": 100 * p.model.alpha_count,
                      "alpha": p.model.alpha_load, "rho": p.model.rho,
                      "predicted %": 100 * p.model.savings, "GPUs": p.pooled_gpus,
                      "sized savings %": 100 * p.savings, "TTFT p50 s": planner.fleet_ttft_p50(p),
                      "misrouted": p.misrouted, "pareto": "*" if f else ""} for p, f in zip(plans, front)]))


def table(rows: list[dict]) -> str:
    """A fixed-width text table: numbers right-aligned, floats to 3 significant decimals."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
