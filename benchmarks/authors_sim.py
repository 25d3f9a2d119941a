"""The authors' fleet simulator, PyPI ``vllm-sr-sim`` (inference-fleet-sim, arXiv 2603.16054), on our traces.

It lives in a venv of its own (made on first use under ~/.cache/extproc-bench, or
$EXTPROC_BENCH_CACHE), and runs in a subprocess through benchmarks/authors_sim_driver.py, so this
module needs only the standard library. The workload is built here, once, so that our simulator
(a sibling script imports ``Workload`` and ``requests``) sees exactly the same requests:

* lengths: the trace's own (input, output) pairs in trace order, cycled when more are asked for;
  rows whose total exceeds the long pool's context are left out and counted (vLLM would refuse them
  in every pool; vllm-sr-sim would serve them in the long pool);
* arrivals: Poisson at ``rate`` (what vllm-sr-sim's own generators do), or the trace's own gaps
  scaled to ``rate``;
* its DES (``Fleet``) is fed these exact (arrival, input, output) triples; its analytical optimizer
  only takes a CDF of total tokens, so it gets the CDF of these requests' totals (it then assumes
  80 % input / 20 % output for every request, whatever the trace says).

Reported per workload: its analytical sizing (homogeneous 64K fleet vs short+long pools, savings,
$/yr, optimizer wall time), its DES run on that fleet (P99 TTFT/TPOT, µs per simulated request,
timed around ``Fleet.run`` alone), and the smallest fleet its DES passes at the SLO; with
``--corrected`` also the smallest fleet once a slot is held for the full service time.

    python3 benchmarks/authors_sim.py [--traces azure-conv ...] [--rate 1000] [--requests 20000]
                                      [--fleets a100 qwen] [--corrected] [--demo] [--json out.json]
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import os
import pathlib
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "data" / "traces"
TRACE_FILES = {
    "azure-code": "azure_llm_2023_code.csv",
    "azure-conv": "azure_llm_2023_conv.csv",
    "mooncake": "mooncake_conversation.jsonl",
}
DRIVER = pathlib.Path(__file__).with_name("authors_sim_driver.py")
SRSIM_VERSION = "0.1.0.dev20260713123629"
SRSIM_VENV = pathlib.Path(os.environ.get("EXTPROC_BENCH_CACHE", pathlib.Path.home() / ".cache" / "extproc-bench")) / "vllm-sr-sim"
PROFILES = ("a100-llama3-70b", "mi300x-qwen3-235b-fp8")
MAX_REQUESTS = 200_000
# Its DES visits every instance at every event, so a run costs about instances × requests; a check
# run on a big fleet simulates only this many instance-requests (≈ 1 µs each here).
CHECK_COST = 40_000_000


class Unavailable(RuntimeError):
    """Something outside the project is missing (data, PyPI): a reason to skip, not a failure."""


@dataclass(frozen=True)
class Workload:
    trace: str
    rate: float = 1000.0
    n_requests: int = 20_000
    seed: int = 1
    threshold: int = 8192  # short pool's context: requests with input + output above it go long
    long_ctx: int = 65536
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.080
    profile: str = "a100-llama3-70b"
    arrivals: str = "poisson"  # or "trace"

    def __post_init__(self) -> None:
        checks = {
            "trace": self.trace in TRACE_FILES, "rate": 0 < self.rate <= 1e6,
            "n_requests": 1 <= self.n_requests <= MAX_REQUESTS,
            "threshold": 0 < self.threshold < self.long_ctx, "long_ctx": self.long_ctx > 0,
            "slo_ttft_s": self.slo_ttft_s > 0, "slo_tpot_s": self.slo_tpot_s > 0,
            "profile": self.profile in PROFILES, "arrivals": self.arrivals in ("poisson", "trace"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid workload field(s) {', '.join(bad)}: {self}")


def srsim_python() -> pathlib.Path:
    """The venv's interpreter, installing the pinned vllm-sr-sim there on first use."""
    python = SRSIM_VENV / "bin" / "python"
    marker = SRSIM_VENV / f".installed-{SRSIM_VERSION}"
    if marker.exists() and python.exists():
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(SRSIM_VENV)], check=True,
                       capture_output=True, text=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"vllm-sr-sim=={SRSIM_VERSION}"],
                       check=True, capture_output=True, text=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        raise Unavailable(f"cannot install vllm-sr-sim=={SRSIM_VERSION} into {SRSIM_VENV}: "
                          f"{(exc.stderr or '').strip()[-400:]}") from exc
    except (subprocess.TimeoutExpired, OSError) as exc:
        raise Unavailable(f"cannot install vllm-sr-sim=={SRSIM_VERSION} into {SRSIM_VENV}: {exc}") from exc
    marker.write_text(f"vllm-sr-sim=={SRSIM_VERSION}\n")
    return python


def load_trace(trace: str) -> list[tuple[float, int, int]]:
    """(seconds since the first request, input tokens, output tokens), in arrival order."""
    path = TRACES / TRACE_FILES[trace]
    if not path.exists():
        raise Unavailable(f"trace {path} not found (../shared/data is absent here)")
    rows = []
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                stamp = datetime.strptime(row["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
                rows.append((stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    else:
        with path.open() as f:
            for line in f:
                doc = json.loads(line)
                rows.append((doc["timestamp"] / 1000, doc["input_length"], doc["output_length"]))
    start = rows[0][0]
    return [(t - start, max(1, a), max(1, b)) for t, a, b in rows]


def requests(w: Workload) -> tuple[list[tuple[float, int, int]], int]:
    """The workload both simulators get: (arrival s, input, output) and how many rows were left out."""
    rows = load_trace(w.trace)
    servable = [r for r in rows if r[1] + r[2] <= w.long_ctx]
    span = servable[-1][0] - servable[0][0]
    stretch = (len(servable) / span) / w.rate  # maps the trace's mean rate onto w.rate
    rng = random.Random(w.seed)
    out, now = [], 0.0
    for i in range(w.n_requests):
        lap, k = divmod(i, len(servable))
        stamp, l_in, l_out = servable[k]
        if w.arrivals == "poisson":
            now += rng.expovariate(w.rate)
        else:
            now = (lap * (span + span / len(servable)) + stamp - servable[0][0]) * stretch
        out.append((now, l_in, l_out))
    return out, len(rows) - len(servable)


def length_cdf(reqs: list[tuple[float, int, int]], breakpoints: list[int]) -> list[list[float]]:
    """CDF of total tokens in vllm-sr-sim's format (its data/README.md recipe: about 200 quantile
    points), plus exact points at the pool limits, since it interpolates linearly between points."""
    totals = sorted(a + b for _, a, b in reqs)
    n = len(totals)
    points = {totals[i]: (i + 1) / n for i in range(0, n, max(1, n // 200))}
    for x in [*breakpoints, totals[-1]]:
        points[x] = bisect.bisect_right(totals, x) / n
    return [[t, f] for t, f in sorted(points.items())]


def run_driver(job: dict, timeout_s: float) -> dict:
    python = srsim_python()
    started = time.monotonic()
    try:
        done = subprocess.run([str(python), str(DRIVER)], input=json.dumps(job), capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        raise RuntimeError(f"vllm-sr-sim driver failed on {job['job']}: {done.stderr.strip()[-800:]}")
    answer = json.loads(done.stdout)
    print(f"  [{job['job']} {job.get('max_ctx', '')}{' corrected' if job.get('corrected') else ''}: "
          f"{len(job.get('requests', []))} requests, {time.monotonic() - started:.0f} s]", file=sys.stderr, flush=True)
    return answer


def _capped(reqs: list, instances: int) -> list:
    return reqs[: max(2_000, min(len(reqs), CHECK_COST // max(1, instances)))]


def measure(w: Workload, corrected: bool = False, timeout_s: float = 900.0, des_sizing: bool = True) -> dict:
    """Everything vllm-sr-sim says about one workload (see the module docstring). ``des_sizing=False``
    skips its DES sizing searches (tens of minutes per workload): analytical sizes and one DES run each."""
    reqs, excluded = requests(w)
    short = [r for r in reqs if r[1] + r[2] <= w.threshold]
    long_ = [r for r in reqs if r[1] + r[2] > w.threshold]
    base = {"profile": w.profile, "threshold": w.threshold, "slo_ttft_s": w.slo_ttft_s,
            "slo_tpot_s": w.slo_tpot_s, "contexts": [w.threshold, w.long_ctx]}
    ana = run_driver({**base, "job": "analytical", "cdf": length_cdf(reqs, [w.threshold, w.long_ctx]),
                      "rate": w.rate, "long_ctx": w.long_ctx}, timeout_s)
    unit = ana["gpus_per_unit"]
    homo_n, pooled = ana["homogeneous"]["total"], ana["pooled"]
    homo_check = run_driver({**base, "job": "des", "requests": _capped(reqs, homo_n),
                             "pools": [["all", homo_n, w.long_ctx]]}, timeout_s)
    pools = [["short", max(1, pooled["short"]), w.threshold], ["long", max(1, pooled["long"]), w.long_ctx]]
    pooled_check = run_driver({**base, "job": "des", "requests": _capped(reqs, pooled["total"]),
                               "pools": pools}, timeout_s)
    checks = [c for c in (homo_check, pooled_check) if "error" not in c]
    result = {
        "workload": asdict(w), "version": ana["version"], "profile_name": ana["profile_name"],
        "gpus_per_unit": unit, "n_slots": ana["n_slots"], "excluded_over_long_ctx": excluded,
        "short_share": len(short) / len(reqs),
        "analytical": {
            "homogeneous_gpus": homo_n * unit, "pooled_gpus": [pooled["short"] * unit, pooled["long"] * unit],
            "savings_pct": 100 * (1 - pooled["total"] / homo_n),
            "usd_per_year": [ana["homogeneous"]["usd_per_year"], pooled["usd_per_year"]],
            "p99_ttft_s": [pooled["p99_ttft_short_s"], pooled["p99_ttft_long_s"]],
            "wall_s": ana["wall_s"],
        },
        "des_check": {"homogeneous": homo_check, "pooled": pooled_check},
        "des_us_per_request": (sum(c["des_wall_s"] for c in checks) / sum(c["requests"] for c in checks) * 1e6
                               if checks else None),
    }
    runs = [("des_sized", False)] + ([("des_sized_corrected", True)] if corrected else [])
    for key, fix in runs if des_sizing else []:
        sized = {}
        for name, sub, ctx in [("homogeneous", reqs, w.long_ctx), ("short", short, w.threshold),
                               ("long", long_, w.long_ctx)]:
            sized[name] = (run_driver({**base, "job": "size", "requests": sub, "max_ctx": ctx,
                                       "corrected": fix, "deadline_s": timeout_s / 2}, timeout_s)
                           if sub else {"instances": 0, "complete": True, "runs": []})
        counts = [sized[k].get("instances") for k in ("homogeneous", "short", "long")]
        result[key] = {
            "homogeneous_gpus": counts[0] * unit if counts[0] is not None else None,
            "pooled_gpus": [c * unit if c is not None else None for c in counts[1:]],
            "savings_pct": (100 * (1 - (counts[1] + counts[2]) / counts[0])
                            if None not in counts and counts[0] else None),
            "complete": all(sized[k].get("complete") for k in sized), "searches": sized,
        }
    return result


def defect_demo(w: Workload, counts: tuple[int, ...], timeout_s: float = 900.0) -> list[dict]:
    """Its homogeneous-pool DES at several instance counts, as shipped and with the slot held for the
    full service time: as shipped, P99 TTFT stops depending on the count almost at once."""
    reqs, _ = requests(w)
    rows = []
    for n in counts:
        for fix in (False, True):
            run = run_driver({"job": "des", "profile": w.profile, "requests": _capped(reqs, n),
                              "pools": [["all", n, w.long_ctx]], "threshold": w.long_ctx,
                              "corrected": fix, "slo_ttft_s": w.slo_ttft_s, "slo_tpot_s": w.slo_tpot_s},
                             timeout_s)
            rows.append({"instances": n, "corrected": fix, **run})
    return rows


def _fmt(x: object, spec: str = "") -> str:
    return "–" if x is None else format(x, spec)


def _sized(sized: dict, pool: str, unit: int) -> str:
    """A sized pool's GPUs, or the P99 TTFT floor when no count meets the SLO."""
    search = sized["searches"][pool]
    if search.get("infeasible"):
        return f"≥{search['p99_ttft_floor_s']:.1f}s"
    return _fmt(search.get("instances") * unit if search.get("instances") is not None else None)


def print_table(results: list[dict]) -> None:
    print(f"\nvllm-sr-sim {results[0]['version']} — analytical (its optimizer, CDF input) vs its DES (exact requests)")
    head = (f"{'workload':<24}{'req/s':>7}{'short%':>7} | {'ana homo':>8} {'ana pooled':>11} {'save':>6} "
            f"{'$M/yr':>12} {'ana ms':>7} | {'DES P99 TTFT':>12} {'µs/req':>7} | {'DES homo':>8} "
            f"{'DES pooled':>12} {'save':>6}")
    corrected = any("des_sized_corrected" in r for r in results)
    if corrected:
        head += f" | {'fixed homo':>10} {'fixed pooled':>13} {'save':>6}"
    print(head)
    print("-" * len(head))
    for r in results:
        w, a, d, u = r["workload"], r["analytical"], r["des_sized"], r["gpus_per_unit"]
        label = f"{w['trace']}/{w['profile'].split('-')[0]}"
        check = r["des_check"]["pooled"]
        line = (f"{label:<24}{w['rate']:>7.0f}{100 * r['short_share']:>6.1f}% | {a['homogeneous_gpus']:>8} "
                f"{a['pooled_gpus'][0]:>5}+{a['pooled_gpus'][1]:<5} {a['savings_pct']:>5.1f}% "
                f"{a['usd_per_year'][0] / 1e6:>5.1f}→{a['usd_per_year'][1] / 1e6:<5.1f} {a['wall_s'] * 1e3:>7.1f} | "
                f"{_fmt(check.get('p99_ttft_s'), '>11.2f')}s {_fmt(r['des_us_per_request'], '>7.0f')} | "
                f"{_sized(d, 'homogeneous', u):>8} {_sized(d, 'short', u):>5}+{_sized(d, 'long', u):<6}"
                f"{_fmt(d['savings_pct'], '>5.1f')}%")
        if corrected and "des_sized_corrected" in r:
            c = r["des_sized_corrected"]
            line += (f" | {_sized(c, 'homogeneous', u):>10} {_sized(c, 'short', u):>6}+"
                     f"{_sized(c, 'long', u):<6}{_fmt(c['savings_pct'], '>5.1f')}%")
        print(line)
    print("GPU counts are as vllm-sr-sim prices them: its A100 profile counts an 8-GPU instance's KV as one GPU;"
          " the MI300X rows count 8 GPUs per instance.\n'≥Xs': no count meets the SLO, P99 TTFT stays at X s"
          " (prefill, not queueing). DES P99 TTFT and µs/req: its DES on its analytical pooled fleet.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", nargs="+", default=list(TRACE_FILES), choices=list(TRACE_FILES))
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threshold", type=int, default=8192)
    parser.add_argument("--arrivals", choices=("poisson", "trace"), default="poisson")
    parser.add_argument("--corrected", action="store_true", help="also size with the slot held for the full service time")
    parser.add_argument("--demo", action="store_true", help="P99 TTFT vs instance count, as shipped and corrected")
    parser.add_argument("--fleets", nargs="+", choices=("a100", "qwen"), default=["a100", "qwen"],
                        help="a100: Llama-3-70B on A100 at --rate; qwen: Qwen3-235B FP8 on MI300X (TP8) at 10x --rate")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per vllm-sr-sim subprocess")
    parser.add_argument("--json", type=pathlib.Path, help="write every number to this file")
    args = parser.parse_args(argv)
    try:
        for trace in args.traces:
            load_trace(trace)
        srsim_python()
    except Unavailable as exc:
        print(f"SKIP: {exc}")
        return 0
    workloads = [Workload(t, args.rate, args.requests, args.seed, args.threshold, arrivals=args.arrivals)
                 for t in args.traces if "a100" in args.fleets]
    if "qwen" in args.fleets:
        # Ten times the rate, ten times the requests: the same simulated window.
        workloads += [Workload(t, 10 * args.rate, min(MAX_REQUESTS, 10 * args.requests), args.seed, args.threshold,
                               arrivals=args.arrivals, profile="mi300x-qwen3-235b-fp8") for t in args.traces]
    started = time.monotonic()
    results = [measure(w, args.corrected, args.timeout) for w in workloads]
    print_table(results)
    out: dict = {"results": results}
    if args.demo:
        w = workloads[0]
        homo = results[0]["analytical"]["homogeneous_gpus"] // results[0]["gpus_per_unit"]
        out["defect_demo"] = defect_demo(w, (5, 20, 60, homo), args.timeout)
        print(f"\nDefect: its DES, homogeneous 64K pool, {w.trace} at {w.rate:.0f} req/s, {w.n_requests} requests")
        print(f"{'instances':>9} {'model':>10} {'P99 TTFT s':>11} {'lost':>6} {'used':>5} {'µs/req':>7}")
        for row in out["defect_demo"]:
            print(f"{row['instances']:>9} {'corrected' if row['corrected'] else 'shipped':>10} "
                  f"{_fmt(row.get('p99_ttft_s'), '>11.3f')} {_fmt(row.get('lost'), '>6')} "
                  f"{_fmt(row.get('instances_used'), '>5')} {_fmt(row.get('us_per_request'), '>7.0f')}")
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
