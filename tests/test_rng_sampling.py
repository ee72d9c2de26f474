"""Counter-based randomness and logits processing."""
import math

import pytest
import torch
from scipy import stats

from shared.rng import Stream, fmix32, gumbel_noise, hash32, uniform
from shared.sampling import SamplingParams, process_logits, sample_from


def _fmix32_reference(x: int) -> int:
    """murmur3 fmix32 with plain Python big-int arithmetic."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_fmix32_matches_reference_for_ints_and_tensors():
    xs = [0, 1, 2, 0xFFFF, 0x10000, 0xDEADBEEF, 0xFFFFFFFF, 123456789]
    for x in xs:
        assert fmix32(x) == _fmix32_reference(x)
    t = fmix32(torch.tensor(xs, dtype=torch.int64))
    assert t.tolist() == [_fmix32_reference(x) for x in xs]
    assert fmix32(0x12345678) == 0xE37CD1BC  # known murmur3 fmix32 value


def test_hash_is_pure_and_identical_for_int_and_tensor():
    tokens = torch.arange(0, 1000, dtype=torch.int64)
    t = hash32(2**63 + 5, 77, int(Stream.GUMBEL), tokens)
    assert t.tolist() == [hash32(2**63 + 5, 77, int(Stream.GUMBEL), i) for i in range(1000)]
    assert uniform(1, 2, Stream.ACCEPT) == uniform(1, 2, Stream.ACCEPT)
    assert uniform(1, 2, Stream.ACCEPT) != uniform(1, 2, Stream.RESIDUAL) != uniform(1, 3, Stream.ACCEPT)


def test_uniforms_are_uniform_and_independent_across_positions():
    us = [uniform(seed=9, position=p, stream=Stream.DRAFT) for p in range(20000)]
    assert all(0.0 < u < 1.0 for u in us)
    assert stats.kstest(us, "uniform").pvalue > 1e-3
    # lag-1 correlation near 0
    r = stats.pearsonr(us[:-1], us[1:]).statistic
    assert abs(r) < 0.03


def test_gumbel_noise_distribution():
    g = gumbel_noise(3, 10, torch.arange(50000))
    assert g.dtype == torch.float64 and torch.isfinite(g).all()
    assert stats.kstest(g.numpy(), "gumbel_r").pvalue > 1e-3


def test_process_logits_greedy_is_one_hot_at_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 5.0, 1.0]])
    p = process_logits(logits, SamplingParams())
    assert p.tolist() == [[0, 1, 0], [1, 0, 0]]  # ties go to the first index, on both sides


def test_process_logits_temperature_topk_topp():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = process_logits(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=1e-6)
    p = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    p = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    # keep tokens until the mass before them reaches 0.8: 0.5, 0.3 (mass before 0.5), drop 0.15 (before 0.8)
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    p = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert (p > 0).tolist() == [True, True, True, False]
    p = process_logits(logits, SamplingParams(temperature=0.5))
    expected = torch.softmax(logits / 0.5, -1)
    assert torch.allclose(p, expected, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=math.nan), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1)])
def test_sampling_params_validate(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sample_from_never_picks_zero_mass_and_follows_cdf():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    assert sample_from(probs, 1e-12) == 1
    assert sample_from(probs, 0.2499) == 1
    assert sample_from(probs, 0.2501) == 3
    assert sample_from(probs, 1.0 - 1e-16) == 3
    with pytest.raises(ValueError):
        sample_from(torch.zeros(4), 0.5)
