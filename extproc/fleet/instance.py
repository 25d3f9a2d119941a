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
    gpu: str = "A100-80GB"  # GPU type, for prices

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

    def prefill_s(self, prompt_tokens):
        """Prefill time of a prompt, or elementwise of a numpy array of (non-negative) prompt counts."""
        n = prompt_tokens if hasattr(prompt_tokens, "shape") else max(prompt_tokens, 0)
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
    activations, in whole blocks. ``kv_bytes_per_token`` is for the whole instance (all GPUs)."""
    free = gpus * gpu_memory_bytes * memory_utilization - weight_bytes - overhead_bytes
    blocks = int(free // (kv_bytes_per_token * block_tokens))
    if blocks < 1:
        raise ValueError("the weights do not leave room for a KV cache")
    return blocks * block_tokens


# --- profiles derived from the model and the GPU ----------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What sizes a transformer's memory and compute (from its Hugging Face config.json)."""

    name: str
    hf_id: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    params: float  # total parameters
    active_params: float  # parameters one token passes through (all of them unless MoE)
    weight_bytes: float  # checkpoint size as served
    kv_bytes_per_value: float = 2.0  # BF16 KV cache; 1.0 with --kv-cache-dtype fp8

    def kv_bytes_per_token_per_gpu(self, tp: int) -> float:
        # Tensor parallelism splits KV heads across GPUs; with fewer KV heads than GPUs vLLM
        # replicates them, one per GPU.
        heads = max(1.0, self.kv_heads / tp)
        return 2 * self.layers * heads * self.head_dim * self.kv_bytes_per_value


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    flops: float  # dense tensor FLOP/s in the dtype the matmuls run in
    attention_flops: float  # dense BF16 FLOP/s (attention runs in BF16)


@dataclass(frozen=True)
class Efficiency:
    """The fitted part: fractions of the GPU's peak vLLM reaches, each checked against a published
    figure (see the profile definitions)."""

    prefill_mfu: float
    attention_efficiency: float
    weight_bandwidth: float  # fraction of HBM bandwidth streaming weights in a decode step
    kv_bandwidth: float  # fraction of HBM bandwidth reading the KV cache
    step_overhead_s: float  # all-reduces, kernel launches, scheduler, per decode step
    per_seq_s: float  # extra decode time per running sequence (its matmul rows, sampling)
    activation_bytes_per_gpu: float = 4e9  # activations and CUDA graphs outside the KV cache
    memory_utilization: float = 0.90  # vLLM --gpu-memory-utilization


def derive_profile(name: str, model: ModelSpec, gpu: GPUSpec, tp: int, eff: Efficiency, *,
                   max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int = 8_192) -> InstanceProfile:
    """An instance of ``model`` on ``tp`` GPUs from first principles plus fitted efficiencies.

    * KV capacity: per GPU, ``memory_utilization`` of HBM minus its weight shard and activations,
      over that GPU's share of a token's K and V;
    * prefill is compute-bound: 2 x active parameters FLOP per token, and causal attention
      2 x layers x q_heads x head_dim FLOP per token pair;
    * a decode step streams the weight shard once, plus the KV cache of every running sequence."""
    per_gpu_kv = model.kv_bytes_per_token_per_gpu(tp)
    free = gpu.memory_bytes * eff.memory_utilization - model.weight_bytes / tp - eff.activation_bytes_per_gpu
    if free <= 0:
        raise ValueError(f"{name}: {model.name} does not fit on {tp} x {gpu.name}")
    block = 16
    kv = int(free // (per_gpu_kv * block)) * block
    return InstanceProfile(
        name=name, model=model.hf_id, gpus=tp, gpu=gpu.name,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        kv_capacity_tokens=kv,
        prefill_tokens_per_s=tp * gpu.flops * eff.prefill_mfu / (2 * model.active_params),
        prefill_base_s=eff.step_overhead_s + model.weight_bytes / tp / (gpu.bandwidth_bytes_per_s * eff.weight_bandwidth),
        prefill_quadratic_s=2 * model.layers * model.q_heads * model.head_dim
        / (tp * gpu.attention_flops * eff.attention_efficiency),
        decode_base_s=eff.step_overhead_s + model.weight_bytes / tp / (gpu.bandwidth_bytes_per_s * eff.weight_bandwidth),
        decode_per_seq_s=eff.per_seq_s,
        decode_per_kv_token_s=per_gpu_kv / (gpu.bandwidth_bytes_per_s * eff.kv_bandwidth),
    )


GiB = 1024 ** 3

# Architecture from each model's config.json (huggingface.co/meta-llama/Meta-Llama-3-70B-Instruct,
# huggingface.co/Qwen/Qwen3-235B-A22B-FP8).
LLAMA3_70B = ModelSpec("Llama-3-70B", "meta-llama/Meta-Llama-3-70B-Instruct", layers=80, q_heads=64, kv_heads=8,
                       head_dim=128, params=70.55e9, active_params=70.55e9, weight_bytes=141.1e9)
# 128 experts, 8 active per token; FP8 weights (~236 GB) and FP8 KV cache. Its native context is
# 32,768 tokens (max_position_embeddings 40,960): a 64K pool needs YaRN rope scaling.
QWEN3_235B_FP8 = ModelSpec("Qwen3-235B-A22B-FP8", "Qwen/Qwen3-235B-A22B-FP8", layers=94, q_heads=64, kv_heads=4,
                           head_dim=128, params=235.1e9, active_params=22.2e9, weight_bytes=236e9,
                           kv_bytes_per_value=1.0)

# Datasheet figures: NVIDIA A100 and H100 SXM, AMD MI300X (dense, no sparsity).
A100_80GB = GPUSpec("A100-80GB", 80 * GiB, 2.039e12, 312e12, 312e12)
H100_80GB = GPUSpec("H100-80GB", 80 * GiB, 3.35e12, 989.4e12, 989.4e12)
MI300X = GPUSpec("MI300X", 192 * GiB, 5.3e12, 2614.9e12, 1307.4e12)

# Efficiencies, fitted where a published measurement exists (TensorRT-LLM's Llama-70B figures are the
# reachable ones; no vLLM BF16 70B figure on 8x A100/H100 was reachable). Checks, model vs published:
#   A100: first-token latency of LLaMA-70B, TP4 FP16, TensorRT-LLM v0.5 performance.md: 128 tokens
#     47 ms (model, TP4: ~50 ms), 2,048 tokens 377 ms (model ~440 ms, +17%); BS 240, 128 in / 2,048 out:
#     525 output tok/s/GPU (model 537, +2%).
#   H100: scaled from the A100 fit by the datasheet ratios (BF16 FLOP/s 3.2x, bandwidth 1.64x);
#     TensorRT-LLM FP8 TP4 2,048-token first token 109 ms against the model's BF16 ~190 ms (FP8 ~1.7x
#     faster), consistent but not a residual.
#   MI300X Qwen3: one-stream decode 18 ms per token against 12.4 ms (SGLang, optimised, MI308) and
#     22.6 ms (vLLM 0.8.3 BF16, 8x MI300X); prefill 40K tok/s from TensorRT-LLM H100 TP8 Qwen3-235B FP8
#     (5,000 in / 500 out: >= 32K input tok/s) scaled by peak FLOP/s. Least certain of the three (+-50%).
_NVIDIA_DENSE = dict(attention_efficiency=0.5, weight_bandwidth=0.8, kv_bandwidth=0.7, step_overhead_s=0.003)
A100_EFF = Efficiency(prefill_mfu=0.45, per_seq_s=1.5e-4, **_NVIDIA_DENSE)
H100_EFF = Efficiency(prefill_mfu=0.36, per_seq_s=6e-5, **_NVIDIA_DENSE)
MI300X_MOE_EFF = Efficiency(prefill_mfu=0.085, attention_efficiency=0.35, weight_bandwidth=0.8, kv_bandwidth=0.7,
                            step_overhead_s=0.011, per_seq_s=6e-5, activation_bytes_per_gpu=6e9)

_DERIVED = {
    "llama3-70b-a100": (LLAMA3_70B, A100_80GB, 8, A100_EFF),
    "llama3-70b-h100": (LLAMA3_70B, H100_80GB, 8, H100_EFF),
    "qwen3-235b-mi300x": (QWEN3_235B_FP8, MI300X, 8, MI300X_MOE_EFF),
}

# The authors' simulator's A100 profile (vllm-sr-sim 0.1.0, fleet_sim/gpu_profiles/profiles.py), in our
# terms, to show what our simulator says under their assumptions: an iteration costs W = 8 ms plus
# H = 0.65 ms per sequence scaled by its length / 8,192, i.e. 0.65 ms / 8,192 per KV token; 65,536
# blocks of 16 tokens; prefill costs other sequences nothing (their prefill only lengthens the
# request's own service time), which we approximate with a free prefill.
AUTHORS_A100 = InstanceProfile(
    name="authors-a100", model=LLAMA3_70B.hf_id, gpus=8, gpu=A100_80GB.name, max_model_len=16, max_num_seqs=1,
    kv_capacity_tokens=65_536 * 16, prefill_tokens_per_s=1e12, prefill_base_s=0.0, prefill_quadratic_s=0.0,
    decode_base_s=0.008, decode_per_seq_s=0.0, decode_per_kv_token_s=0.00065 / 8_192,
)

HARDWARE: dict[str, InstanceProfile] = {
    **{name: derive_profile(name, *spec, max_model_len=16, max_num_seqs=1) for name, spec in _DERIVED.items()},
    "authors-a100": AUTHORS_A100,
}


def hardware_profile(hardware: str, *, max_model_len: int, max_num_seqs: int | None = None,
                     name: str | None = None, max_seqs_cap: int = 512) -> InstanceProfile:
    """A profile of ``hardware`` configured for ``max_model_len``. Without ``max_num_seqs``, the largest
    power of two whose full-length sequences the KV cache holds (the papers' 8K x 128 and 64K x 16 on
    8x A100), capped at ``max_seqs_cap``."""
    try:
        base = HARDWARE[hardware]
    except KeyError:
        raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}") from None
    if max_num_seqs is None:
        fit = max(1, base.kv_capacity_tokens // max_model_len)
        max_num_seqs = min(max_seqs_cap, 1 << (fit.bit_length() - 1))
    return dataclasses.replace(base, name=name or hardware, max_model_len=max_model_len, max_num_seqs=max_num_seqs)


# Per-GPU prices for the cost model: the papers' A100 and MI300X figures; H100 has no paper figure.
GPU_PRICE_PER_HOUR = {"A100-80GB": 2.21, "MI300X": 3.67, "H100-80GB": 2.99}

PROFILES: dict[str, InstanceProfile] = {
    # The paper's two pools (arXiv 2604.09613): Llama-3-70B on 8x A100-80GB, same hardware, different
    # context window and batch limit. The simulated engine serves these by default.
    "short": hardware_profile("llama3-70b-a100", max_model_len=8_192, name="short"),
    "long": hardware_profile("llama3-70b-a100", max_model_len=65_536, name="long"),
}


def profile_named(name: str) -> InstanceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown instance profile {name!r}; known: {', '.join(PROFILES)}") from None
