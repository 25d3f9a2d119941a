"""Side by side: the authors' fleet simulator (PyPI vllm-sr-sim) and ours, on the same requests.

    .venv/bin/python benchmarks/vs_authors_sim.py [--traces azure-conv mooncake] [--requests 20000]
                                                  [--qwen] [--corrected] [--json out.json]

Both get exactly the same (arrival, input, output) triples (``authors_sim.requests``). Printed per
workload:

* GPU counts and savings: theirs (analytical optimizer; its DES sizing), ours (SLO sizing by our
  DES with our instance model, over at least 20 s of the same traffic), and ours with *their* A100
  instance constants, which separates what the instance model changes from what the simulators change;
* µs per simulated request: their DES (``Fleet.run`` alone) and ours (``simulate`` alone) on the
  same fleet (their analytical pool counts) and the same requests, and the ratio.

vllm-sr-sim runs in a venv of its own (see authors_sim.py); skips with a message when the shared
traces or PyPI are unavailable. Bounded: each simulation is one pass over ``--requests``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import authors_sim  # noqa: E402  (a sibling module, standard library only)

from extproc.fleet import plan as planner  # noqa: E402
from extproc.fleet import routing, sim, workload  # noqa: E402
from extproc.fleet.instance import GPU_PRICE_PER_HOUR, hardware_profile  # noqa: E402

OUR_HARDWARE = {"a100-llama3-70b": "llama3-70b-a100", "mi300x-qwen3-235b-fp8": "qwen3-235b-mi300x"}


def our_workload(w: authors_sim.Workload) -> workload.Workload:
    reqs, _ = authors_sim.requests(w)
    arr = np.array(reqs, dtype=float)
    return workload.synthetic(arr[:, 0], arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64), name=w.trace)


def ours(w: authors_sim.Workload, hardware: str) -> dict:
    # Sizing needs the fleet in steady state: at least 20 s of traffic (2 s at 10,000 req/s is mostly
    # warm-up), the same trace rows and arrival process continued.
    longer = dataclasses.replace(w, n_requests=min(authors_sim.MAX_REQUESTS, max(w.n_requests, int(20 * w.rate))))
    wl = our_workload(longer)
    short = hardware_profile(hardware, max_model_len=w.threshold, name="short")
    long = hardware_profile(hardware, max_model_len=w.long_ctx, name="long")
    slo = planner.SLO(w.slo_ttft_s, w.slo_tpot_s)
    started = time.perf_counter()
    p = planner.plan(wl, short, long, slo=slo, price_per_gpu_hour=GPU_PRICE_PER_HOUR[long.gpu])
    return {"hardware": hardware, "homogeneous_instances": p.homogeneous.instances,
            "pooled_instances": [s.instances for s in p.pools], "gpus_per_instance": long.gpus,
            "savings_pct": 100 * p.savings, "predicted_pct": 100 * p.model.savings, "rho": p.model.rho,
            "alpha_load": p.model.alpha_load, "plan_wall_s": time.perf_counter() - started}


def our_speed(w: authors_sim.Workload, fleet: list[int], hardware: str, repeats: int = 3) -> float:
    """µs per simulated request of one DES run on a fleet: [n] homogeneous (long context, least
    loaded) or [short, long] pools (token budget), best of ``repeats``."""
    wl = our_workload(w)
    short = hardware_profile(hardware, max_model_len=w.threshold, name="short")
    long = hardware_profile(hardware, max_model_len=w.long_ctx, name="long")
    if len(fleet) == 1:
        pools = [sim.PoolSpec("all", long, max(1, fleet[0]))]
        factory = routing.LeastLoaded
    else:
        pools = [sim.PoolSpec("short", short, max(1, fleet[0])), sim.PoolSpec("long", long, max(1, fleet[1]))]
        ones = np.ones(len(wl))

        def factory(inst, x):
            return routing.TokenBudget(inst, x, ratios=ones)
    best = float("inf")
    for _ in range(repeats):
        best = min(best, sim.simulate(wl, pools, factory).wall_s)
    return 1e6 * best / len(wl)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", nargs="+", default=["azure-conv", "azure-code", "mooncake"],
                    choices=list(authors_sim.TRACE_FILES))
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--qwen", action="store_true", help="add Qwen3-235B FP8 on MI300X at 10x --rate")
    ap.add_argument("--corrected", action="store_true",
                    help="with --their-des-sizing: also with a slot held for the full service time")
    ap.add_argument("--their-des-sizing", action="store_true",
                    help="also size fleets with their DES (its SLO search; tens of minutes per workload)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args(argv)
    try:
        for t in args.traces:
            authors_sim.load_trace(t)
        authors_sim.srsim_python()
    except authors_sim.Unavailable as exc:
        print(f"SKIP: {exc}")
        return 0
    workloads = [authors_sim.Workload(t, args.rate, args.requests) for t in args.traces]
    if args.qwen:
        # Ten times the rate, ten times the requests: the same simulated window.
        workloads += [authors_sim.Workload(t, 10 * args.rate, min(authors_sim.MAX_REQUESTS, 10 * args.requests),
                                           profile="mi300x-qwen3-235b-fp8") for t in args.traces]
    rows = []
    for w in workloads:
        theirs = authors_sim.measure(w, args.corrected, args.timeout, des_sizing=args.their_des_sizing)
        hw = OUR_HARDWARE[w.profile]
        faithful = ours(w, hw)
        same_constants = ours(w, "authors-a100") if w.profile == "a100-llama3-70b" else None
        unit = theirs["gpus_per_unit"]
        fleets = [[theirs["analytical"]["homogeneous_gpus"] // unit],
                  [g // unit for g in theirs["analytical"]["pooled_gpus"]]]
        speed_profile = "authors-a100" if w.profile == "a100-llama3-70b" else hw
        checks = [theirs["des_check"]["homogeneous"], theirs["des_check"]["pooled"]]
        speed = [{"fleet": f, "theirs": 1e6 * c["des_wall_s"] / c["requests"] if "des_wall_s" in c else None,
                  "requests": c.get("requests"), "ours": our_speed(w, f, speed_profile)}
                 for f, c in zip(fleets, checks)]
        rows.append({"workload": f"{w.trace} @ {w.rate:,.0f} req/s ({w.profile})", "theirs": theirs,
                     "ours": faithful, "ours_their_constants": same_constants, "speed": speed})
        print(f"  done: {rows[-1]['workload']}", file=sys.stderr)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    return 0


def print_table(rows: list[dict]) -> None:
    print("\nInstances (8 GPUs each on A100/MI300X; vllm-sr-sim prices an A100 instance as one GPU), homogeneous → pooled")
    print("| workload | theirs, analytical | theirs, DES-sized | ours (our instance model) | "
          "ours (their A100 constants) | ours: α(1−1/ρ) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t, o, c = r["theirs"], r["ours"], r["ours_their_constants"]
        unit = t["gpus_per_unit"]
        a = t["analytical"]
        d = t.get("des_sized", {})

        def theirs_cell(block: dict) -> str:
            if block.get("homogeneous_gpus") is None:
                return "not run (--their-des-sizing)"
            pooled = [g // unit if g is not None else None for g in block["pooled_gpus"]]
            if None in pooled:
                return f"{block['homogeneous_gpus'] // unit:,} → ?"
            return (f"{block['homogeneous_gpus'] // unit:,} → {sum(pooled):,} ({pooled[0]:,}+{pooled[1]:,}), "
                    f"{block['savings_pct']:.1f}%")

        def ours_cell(block: dict | None) -> str:
            if block is None:
                return "–"
            s, l = block["pooled_instances"]
            return (f"{block['homogeneous_instances']:,} → {s + l:,} ({s:,}+{l:,}), {block['savings_pct']:.1f}%")
        print(f"| {r['workload']} | {theirs_cell(a)} | {theirs_cell(d)} | {ours_cell(o)} | {ours_cell(c)} | "
              f"{o['predicted_pct']:.1f}% (ρ {o['rho']:.2f}, α {o['alpha_load']:.2f}) |")
    print("\nSpeed: one DES run on the same requests and the same fleet (their analytical sizes)")
    print("| workload | fleet | requests | their DES µs/request | our DES µs/request | ours faster by |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for sp in r["speed"]:
            fleet = f"{sp['fleet'][0]:,} homogeneous" if len(sp["fleet"]) == 1 else \
                f"{sp['fleet'][0]:,} short + {sp['fleet'][1]:,} long"
            theirs, ours_us = sp["theirs"], sp["ours"]
            their_cell = "–" if theirs is None else f"{theirs:,.0f}"
            ratio = "–" if theirs is None else f"{theirs / ours_us:,.0f}×"
            print(f"| {r['workload']} | {fleet} | {sp['requests'] or 0:,} | {their_cell} | {ours_us:,.1f} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
