"""End to end over real gRPC on loopback with a tiny randomly initialised pair (no download).

The sampling test is the contract of SPEC 2: `sync` emits token sequences distributed exactly as the
target's own sampling. It is a chi-square goodness-of-fit test over the joint distribution of the first
two generated tokens, with seeds 0..N-1, so it is deterministic; its false-alarm rate is ALPHA.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from shared.sampling import SamplingParams, process_logits
from tests.conftest import edge, run, serving
from tests.stat_util import pooled_chisquare

ALPHA = 1e-3
PROMPT = "the cat"


def _target_joint(target, prompt_ids, params):
    """Exact P(t1, t2) under the target alone: plain forward passes, no cache, no speculative code."""
    with torch.inference_mode():
        p1 = process_logits(target.model(torch.tensor([prompt_ids])).logits[0, -1], params).double()
        joint = {}
        for t1 in torch.nonzero(p1 > 0).flatten().tolist():
            logits = target.model(torch.tensor([prompt_ids + [t1]])).logits[0, -1]
            p2 = process_logits(logits, params).double()
            for t2 in torch.nonzero(p2 > 0).flatten().tolist():
                joint[(t1, t2)] = float(p1[t1] * p2[t2])
    return joint


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sync_sampling_matches_target_distribution(tiny_target, tiny_draft, temperature, top_p):
    prompt_ids = tiny_target.tokenizer(PROMPT)["input_ids"]
    params = SamplingParams(temperature=temperature, top_p=top_p)
    expected = _target_joint(tiny_target, prompt_ids, params)
    n = 3000

    async def scenario():
        seen: Counter = Counter()
        accepted = drafted = 0
        async with serving(tiny_target) as (_, addr), edge(addr, tiny_draft, max_new_tokens=2, draft_len=2,
                                                           temperature=temperature, top_p=top_p, ignore_eos=True) as client:
            for seed in range(n):
                gen = client.generate(prompt_ids, mode="sync", seed=seed)
                ids = await gen.collect()
                seen[tuple(ids)] += 1
                accepted += gen.stats.accepted
                drafted += gen.stats.drafted
        return seen, accepted / drafted

    seen, acceptance = run(scenario())
    pvalue, cells = pooled_chisquare(seen, expected, n)
    assert pvalue > ALPHA, f"sync output deviates from the target (p={pvalue:.2e}, {cells} cells)"
    # the pair is genuinely different, so the test exercises rejections and corrections
    assert 0.2 < acceptance < 0.95


def test_greedy_sync_equals_cloud_equals_target_generate(tiny_target, tiny_draft):
    prompt_ids = tiny_target.tokenizer("hello world")["input_ids"]
    with torch.inference_mode():
        ref = tiny_target.model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=40,
                                         min_new_tokens=40, pad_token_id=0)[0, len(prompt_ids):].tolist()

    async def scenario():
        async with serving(tiny_target) as (_, addr), edge(addr, tiny_draft, max_new_tokens=40, ignore_eos=True) as client:
            out = {}
            for mode in ("sync", "cloud"):
                out[mode] = await client.generate(prompt_ids, mode=mode).collect()
            sync_gen = client.generate(prompt_ids, mode="sync", draft_len=7)
            out["sync7"] = await sync_gen.collect()
            return out, sync_gen.stats.to_dict()

    out, st = run(scenario())
    assert out["sync"] == ref
    assert out["cloud"] == ref
    assert out["sync7"] == ref
    assert st["rounds"] >= 1 and st["bytes_up"] > 0 and st["bytes_down"] > 0
    assert st["generated_tokens"] == 40 and st["finish_reason"] == "length"


def test_edge_mode_is_the_draft_alone(tiny_target, tiny_draft):
    prompt_ids = tiny_target.tokenizer("abc")["input_ids"]
    with torch.inference_mode():
        ref = tiny_draft.model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=12,
                                        min_new_tokens=12, pad_token_id=0)[0, len(prompt_ids):].tolist()

    async def scenario():
        async with edge("127.0.0.1:1", tiny_draft, max_new_tokens=12, ignore_eos=True) as client:  # no server needed
            return await client.generate(prompt_ids, mode="edge").collect()

    assert run(scenario()) == ref


def test_stats_are_complete(tiny_target, tiny_draft):
    prompt_ids = tiny_target.tokenizer("stats")["input_ids"]

    async def scenario():
        async with serving(tiny_target) as (_, addr), edge(addr, tiny_draft, max_new_tokens=16, temperature=1.0, ignore_eos=True) as client:
            gen = client.generate(prompt_ids, mode="sync")
            chunks = [c async for c in gen]
            return chunks, gen.stats.to_dict()

    chunks, st = run(scenario())
    assert sum(len(c) for c in chunks) == 16 == st["generated_tokens"]
    assert st["rounds"] == sum(st["accepted_len_hist"].values())
    assert st["mean_accepted_len"] == pytest.approx(16 / st["rounds"])
    assert st["accepted_tokens"] + st["rounds"] >= 16  # each round commits accepted + 1 (last may be cut)
    for key in ("tokens_per_s", "ttft_s", "itl_p50_s", "itl_p95_s", "acceptance_rate", "bytes_up_per_token",
                "bytes_down_per_token", "edge_busy_fraction", "cloud_busy_fraction"):
        assert st[key] is not None and st[key] >= 0, key
