"""PNG plots of a short-pool limit sweep (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from extproc.fleet.plan import Plan, fleet_ttft_p50, pareto_front


def plot_sweep(plans: list[Plan], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = [p.short_limit for p in plans]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(limits, [100 * p.savings for p in plans], "o-", label="sized by simulation (SLO met)")
    left.plot(limits, [100 * p.model.savings for p in plans], "s--", label="α(1 − 1/ρ), α = share of load")
    left.plot(limits, [100 * p.model.savings_by_count for p in plans], "^:", label="α(1 − 1/ρ), α = share of count")
    left.set_xscale("log", base=2)
    left.set_xticks(limits, [f"{x // 1024}K" for x in limits])
    left.set_xlabel("short-pool context limit (tokens)")
    left.set_ylabel("GPUs saved vs homogeneous (%)")
    left.axhline(0, color="grey", lw=0.5)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    front = pareto_front(plans)
    gpus = [p.pooled_gpus for p in plans]
    ttft = [fleet_ttft_p50(p) for p in plans]
    right.scatter(gpus, ttft, c=["tab:red" if f else "tab:grey" for f in front], zorder=3)
    for p, g, t in zip(plans, gpus, ttft):
        right.annotate(f"{p.short_limit // 1024}K", (g, t), textcoords="offset points", xytext=(5, 4), fontsize=8)
    pts = sorted((g, t) for g, t, f in zip(gpus, ttft, front) if f)
    if pts:
        right.plot(*zip(*pts), "-", color="tab:red", alpha=0.6, label="Pareto front")
    h = plans[0].homogeneous.gpus
    right.axvline(h, color="grey", ls="--", lw=1, label=f"homogeneous ({h:,} GPUs)")
    right.set_xlabel("pooled fleet GPUs")
    right.set_ylabel("fleet median TTFT (s)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
