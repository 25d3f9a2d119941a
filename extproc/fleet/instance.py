"""One model of a GPU instance serving one LLM with vLLM: capacity limits and batch timing.

Pure: no I/O, no clocks, no asyncio. The simulated engine (``extproc.engine``) sleeps for the
durations computed here; a discrete-event fleet simulator advances a virtual clock by the same
durations. Keep every timing formula in this module so the two can never disagree.

Timing model (per instance, continuous batching):

* prefill (time to first token) is compute-bound:
  ``prefill_base_s + n / prefill_tokens_per_s + prefill_quadratic_s * n**2``
  (the quadratic term is causal attention, which matters for 64K prompts);
* one decode step emits one token for every running sequence and is memory-bound:
  ``decode_base_s + decode_per_seq_s * batch + decode_per_kv_token_s * kv_tokens``
  (weights are read once per step; each sequence adds compute; attention reads the whole KV cache).

KV cache is counted in tokens, allocated in blocks of ``kv_block_tokens`` as vLLM's paged attention does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceProfile:
    """A GPU instance (one vLLM server) and the model it serves."""

    name: str
    model: str  # default served model name
    gpus: int  # GPUs in one instance (tensor parallel degree); a cost model prices these
    max_model_len: int  # context window: prompt + output tokens of one sequence
    max_num_seqs: int  # sequences decoded together at most (vLLM --max-num-seqs)
    kv_capacity_tokens: int  # KV-cache size of the whole instance, in tokens
    prefill_tokens_per_s: float
    prefill_base_s: float
    prefill_quadratic_s: float  # seconds per prompt-token squared
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_kv_token_s: float
    kv_block_tokens: int = 16
    max_num_batched_tokens: int = 8_192  # tokens one iteration processes at most (chunked prefill budget)

    def __post_init__(self) -> None:
        for field in ("gpus", "max_model_len", "max_num_seqs", "kv_capacity_tokens", "kv_block_tokens",
                      "max_num_batched_tokens"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field} must be >= 1, got {getattr(self, field)}")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError(f"{self.name}: prefill_tokens_per_s must be > 0")
        for field in ("prefill_base_s", "prefill_quadratic_s", "decode_base_s", "decode_per_seq_s",
                      "decode_per_kv_token_s"):
            if getattr(self, field) < 0:
                raise ValueError(f"{self.name}: {field} must be >= 0")
        # vLLM refuses to start when one full-length sequence cannot fit in the KV cache.
        if self.kv_capacity_tokens < self.max_model_len:
            raise ValueError(
                f"{self.name}: max_model_len {self.max_model_len} exceeds the KV cache "
                f"({self.kv_capacity_tokens} tokens); one full-length sequence would not fit"
            )

    # --- capacity -------------------------------------------------------------------------------

    def kv_blocks(self, tokens: int) -> int:
        """KV blocks one sequence of ``tokens`` tokens occupies."""
        return math.ceil(max(tokens, 0) / self.kv_block_tokens)

    def kv_footprint_tokens(self, tokens: int) -> int:
        """Tokens of KV cache one sequence of ``tokens`` tokens occupies (rounded up to whole blocks)."""
        return self.kv_blocks(tokens) * self.kv_block_tokens

    def max_output_tokens(self, prompt_tokens: int) -> int:
        """Most output tokens a prompt leaves room for (0 when the prompt alone fills the window)."""
        return max(self.max_model_len - prompt_tokens, 0)

    def fits(self, prompt_tokens: int, output_tokens: int) -> bool:
        """Whether vLLM accepts the request (it rejects with HTTP 400 otherwise)."""
        return prompt_tokens < self.max_model_len and prompt_tokens + output_tokens <= self.max_model_len

    # --- timing ---------------------------------------------------------------------------------

    def prefill_s(self, prompt_tokens: int) -> float:
        n = max(prompt_tokens, 0)
        return self.prefill_base_s + n / self.prefill_tokens_per_s + self.prefill_quadratic_s * n * n

    def decode_step_s(self, batch: int, kv_tokens: int = 0) -> float:
        """One decode step with ``batch`` running sequences holding ``kv_tokens`` tokens of KV cache."""
        return (self.decode_base_s + self.decode_per_seq_s * max(batch, 1)
                + self.decode_per_kv_token_s * max(kv_tokens, 0))

    def ttft_s(self, prompt_tokens: int) -> float:
        """Time to first token once admitted: the first token comes out of the prefill step."""
        return self.prefill_s(prompt_tokens)

    def itl_s(self, batch: int, kv_tokens: int = 0) -> float:
        """Inter-token latency (TPOT) at a given batch size and KV occupancy."""
        return self.decode_step_s(batch, kv_tokens)

    def service_s(self, prompt_tokens: int, output_tokens: int, batch: int, kv_tokens: int = 0) -> float:
        """Admission-to-last-token time at a constant batch size and KV occupancy."""
        steps = max(output_tokens - 1, 0)
        return self.ttft_s(prompt_tokens) + steps * self.itl_s(batch, kv_tokens)

    def with_overrides(self, **changes) -> InstanceProfile:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def kv_capacity_tokens(*, gpus: int, gpu_memory_bytes: float, memory_utilization: float,
                       weight_bytes: float, overhead_bytes: float, kv_bytes_per_token: float,
                       block_tokens: int = 16) -> int:
    """KV-cache tokens vLLM can allocate: what ``gpu_memory_utilization`` leaves after weights and
    activations, in whole blocks."""
    free = gpus * gpu_memory_bytes * memory_utilization - weight_bytes - overhead_bytes
    blocks = int(free // (kv_bytes_per_token * block_tokens))
    if blocks < 1:
        raise ValueError("the weights do not leave room for a KV cache")
    return blocks * block_tokens


# Llama-3-70B-Instruct, BF16, on 8x A100-80GB with tensor parallelism 8. The papers (arXiv 2604.09613,
# 2604.08075) name Llama-3-70B on A100 and the pool shapes below but not the per-step timings: every
# number here is an assumption derived from public hardware and model specs, not a measurement.
#   KV per token: 2 (K,V) x 80 layers x 8 KV heads x 128 dims x 2 bytes = 327,680 B.
#   Memory: 8 x 80 GB x 0.90 utilization - 141 GB weights - 20 GB activations/CUDA graphs
#     -> about 1.26M tokens, enough for both pools at full occupancy (128 x 8,192 = 16 x 65,536
#     = 1,048,576 tokens), i.e. the paper's pool shapes do not rely on preemption.
#   Prefill: 2 x 70.6 GFLOP per token over 8 x 312 TFLOP/s at ~50% MFU -> ~8,000 tokens/s;
#     causal attention adds 80 layers x 2 x 8,192 x n^2 FLOP -> ~1.05e-9 s per token^2.
#   Decode: 141 GB of weights per step over 8 x 2.0 TB/s at ~55% achieved bandwidth plus TP
#     all-reduces -> ~22 ms base; ~0.25 ms per extra sequence; KV reads 327,680 B per cached token
#     at ~8.8 TB/s -> ~3.7e-8 s per token. A full short pool (128 seqs, ~2K tokens each) steps in
#     ~64 ms, inside the papers' P99 TPOT SLO of 80 ms.
# The papers count one instance as one GPU in their cost figures ($2.21/GPU-h); ``gpus`` keeps the
# real count so a cost model can choose its accounting explicitly.
_LLAMA3_70B_A100X8 = dict(
    model="meta-llama/Meta-Llama-3-70B-Instruct",
    gpus=8,
    kv_capacity_tokens=kv_capacity_tokens(
        gpus=8, gpu_memory_bytes=80e9, memory_utilization=0.90, weight_bytes=141e9,
        overhead_bytes=20e9, kv_bytes_per_token=327_680,
    ),
    prefill_tokens_per_s=8_000.0,
    prefill_base_s=0.010,
    prefill_quadratic_s=1.05e-9,
    decode_base_s=0.022,
    decode_per_seq_s=0.00025,
    decode_per_kv_token_s=3.7e-8,
)

PROFILES: dict[str, InstanceProfile] = {
    # The paper's two pools: same hardware and model, different context window and batch limit.
    "short": InstanceProfile(name="short", max_model_len=8_192, max_num_seqs=128, **_LLAMA3_70B_A100X8),
    "long": InstanceProfile(name="long", max_model_len=65_536, max_num_seqs=16, **_LLAMA3_70B_A100X8),
}


def profile_named(name: str) -> InstanceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown instance profile {name!r}; known: {', '.join(PROFILES)}") from None
