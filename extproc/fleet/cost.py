"""The closed-form cost model of pool routing: savings = alpha * (1 - 1/rho).

Let a homogeneous fleet run every request on the long configuration. Each request costs some
instance-seconds there; summed over a second of traffic that is the fleet's size. Pooling moves the
short requests to instances configured for short contexts, where the same requests cost 1/rho as much.
If alpha is the short requests' share of the homogeneous fleet's load, the pooled fleet is
``(1 - alpha) + alpha / rho`` of the homogeneous one, so it saves ``alpha * (1 - 1/rho)``. That is
exact for the load (instance-seconds), with no queueing; sizing for a latency SLO adds headroom the
simulator measures. Using the short requests' share of the request *count* instead overstates alpha
whenever short requests are cheaper than average, which they are: ``drift`` reports by how much.

A request's load on a configuration is its instance-seconds at the configuration's steady-state
batch (full ``max_num_seqs`` unless the KV cache holds fewer of the mix's sequences): its prefill, which
runs at the whole instance's compute, plus its output tokens at one step per token shared by the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from extproc.fleet.instance import InstanceProfile

HOURS_PER_YEAR = 24 * 365


def steady_batch(profile: InstanceProfile, prompt: np.ndarray, output: np.ndarray) -> int:
    """Sequences an instance runs at once on this mix: max_num_seqs, or fewer when the KV cache
    cannot hold that many average sequences (each holds its prompt and, on average, half its output)."""
    mean_footprint = float(np.mean(prompt + output / 2.0)) if len(prompt) else 1.0
    return max(1, min(profile.max_num_seqs, int(profile.kv_capacity_tokens // max(mean_footprint, 1.0))))


def load_s(profile: InstanceProfile, prompt: np.ndarray, output: np.ndarray, batch: int | None = None) -> np.ndarray:
    """Instance-seconds each request costs on ``profile`` at the mix's steady batch."""
    b = batch or steady_batch(profile, prompt, output)
    kv = b * float(np.mean(prompt + output / 2.0)) if len(prompt) else 0.0
    step = profile.decode_step_s(b, int(kv))
    return profile.prefill_s(prompt.astype(float)) + output * step / b


@dataclass(frozen=True)
class CostModel:
    """alpha, rho and the savings they predict for one workload and one pair of configurations."""

    alpha_load: float  # short requests' share of the homogeneous fleet's instance-seconds (exact)
    alpha_count: float  # short requests' share of the request count (the tempting shortcut)
    rho: float  # per-instance throughput gain of the short configuration on the short requests
    short_rate_per_instance: float  # req/s one short instance sustains on the short requests
    long_rate_per_instance_short: float  # req/s one long instance sustains on the same requests
    long_rate_per_instance: float  # req/s one long instance sustains on the whole mix
    short_batch: int
    long_batch: int

    @property
    def savings(self) -> float:
        return self.alpha_load * (1.0 - 1.0 / self.rho)

    @property
    def savings_by_count(self) -> float:
        return self.alpha_count * (1.0 - 1.0 / self.rho)

    @property
    def drift(self) -> float:
        """How far the count-based formula overstates the exact one, in points of fleet share."""
        return self.savings_by_count - self.savings

    def instances(self, rate: float) -> dict:
        """Instances the load alone needs at ``rate`` req/s (100% busy, no queueing headroom)."""
        homog = rate / self.long_rate_per_instance
        short = rate * self.alpha_count / self.short_rate_per_instance if self.short_rate_per_instance else 0.0
        long = homog * (1.0 - self.alpha_load)
        return {"homogeneous": homog, "short": short, "long": long, "pooled": short + long}

    def as_dict(self) -> dict:
        return {"alpha_load": self.alpha_load, "alpha_count": self.alpha_count, "rho": self.rho,
                "savings": self.savings, "savings_by_count": self.savings_by_count, "drift": self.drift,
                "short_rate_per_instance": self.short_rate_per_instance,
                "long_rate_per_instance_short": self.long_rate_per_instance_short,
                "long_rate_per_instance": self.long_rate_per_instance,
                "short_batch": self.short_batch, "long_batch": self.long_batch}


def cost_model(short: InstanceProfile, long: InstanceProfile, prompt: np.ndarray, output: np.ndarray,
               is_short: np.ndarray) -> CostModel:
    """alpha and rho for requests split by ``is_short`` (the pool the router sends each to)."""
    prompt = np.asarray(prompt)
    output = np.asarray(output)
    is_short = np.asarray(is_short, bool)
    b_long = steady_batch(long, prompt, output)
    on_long = load_s(long, prompt, output, b_long)
    total = float(on_long.sum())
    ps, os_ = prompt[is_short], output[is_short]
    if len(ps):
        short_on_short = load_s(short, ps, os_)
        b_short = steady_batch(short, ps, os_)
        mu_s = len(ps) / float(short_on_short.sum())
        mu_l_s = len(ps) / float(on_long[is_short].sum())
        rho = mu_s / mu_l_s
    else:
        b_short, mu_s, mu_l_s, rho = steady_batch(short, prompt, output), 0.0, 0.0, 1.0
    return CostModel(
        alpha_load=float(on_long[is_short].sum()) / total if total else 0.0,
        alpha_count=float(is_short.mean()) if len(is_short) else 0.0,
        rho=rho, short_rate_per_instance=mu_s, long_rate_per_instance_short=mu_l_s,
        long_rate_per_instance=len(prompt) / total if total else 0.0,
        short_batch=b_short, long_batch=b_long,
    )


def dollars_per_year(gpus: float, price_per_gpu_hour: float) -> float:
    return gpus * price_per_gpu_hour * HOURS_PER_YEAR
