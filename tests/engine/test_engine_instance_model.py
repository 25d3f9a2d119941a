"""The GPU-instance model the engine (and the fleet simulator) take their limits and timings from."""

from __future__ import annotations

import pytest

from extproc.fleet.instance import PROFILES, InstanceProfile, kv_capacity_tokens, profile_named


def test_paper_pools():
    short, long = profile_named("short"), profile_named("long")
    assert (short.max_model_len, short.max_num_seqs) == (8_192, 128)
    assert (long.max_model_len, long.max_num_seqs) == (65_536, 16)
    # Both pools hold a full batch of full-length sequences without preemption.
    for p in (short, long):
        assert p.max_num_seqs * p.max_model_len <= p.kv_capacity_tokens
        assert p.kv_capacity_tokens % p.kv_block_tokens == 0


def test_prefill_grows_faster_than_linearly():
    p = PROFILES["long"]
    assert p.ttft_s(1_000) < p.ttft_s(8_000) < p.ttft_s(65_536)
    assert p.prefill_s(65_536) > 8 * (p.prefill_s(8_192) - p.prefill_base_s)


def test_decode_step_grows_with_batch_and_kv():
    p = PROFILES["short"]
    assert p.decode_step_s(1) < p.decode_step_s(16) < p.decode_step_s(128)
    assert p.itl_s(16, 0) < p.itl_s(16, 500_000)
    assert p.decode_step_s(0) == p.decode_step_s(1)
    # Inside the papers' P99 TPOT SLO (80 ms) for a full short pool of typical 2K-token sequences.
    assert p.itl_s(128, 128 * 2_048) < 0.080


def test_service_time_composes_ttft_and_decode_steps():
    p = PROFILES["short"]
    assert p.service_s(500, 1, 8) == pytest.approx(p.ttft_s(500))
    assert p.service_s(500, 101, 8, 4_000) == pytest.approx(p.ttft_s(500) + 100 * p.itl_s(8, 4_000))


def test_fits_mirrors_the_engines_400():
    p = PROFILES["short"]
    assert p.fits(8_000, 192) and not p.fits(8_000, 193)
    assert not p.fits(8_192, 0)
    assert p.max_output_tokens(8_000) == 192 and p.max_output_tokens(9_000) == 0


def test_blocks_round_up():
    p = PROFILES["short"]
    assert p.kv_blocks(1) == 1 and p.kv_blocks(16) == 1 and p.kv_blocks(17) == 2
    assert p.kv_footprint_tokens(17) == 32


def test_invalid_profiles_are_refused():
    with pytest.raises(ValueError, match="KV cache"):
        PROFILES["short"].with_overrides(max_model_len=2_000_000)
    with pytest.raises(ValueError):
        PROFILES["short"].with_overrides(max_num_seqs=0)
    with pytest.raises(ValueError, match="unknown instance profile"):
        profile_named("huge")
    with pytest.raises(ValueError):
        kv_capacity_tokens(gpus=1, gpu_memory_bytes=80e9, memory_utilization=0.9, weight_bytes=141e9,
                           overhead_bytes=0, kv_bytes_per_token=327_680)
    assert isinstance(PROFILES["short"], InstanceProfile)
    with pytest.raises(AttributeError):
        PROFILES["short"].max_num_seqs = 1  # frozen: shared safely between engine and simulator
