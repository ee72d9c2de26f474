"""End to end over real gRPC on loopback with a tiny randomly initialised pair (no download).

Greedy equality, statistics and labels; the sampling law of every mode is tests/test_law_tiny.py's.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import edge, run, serving

PROMPT = "the cat"


@pytest.mark.parametrize("verify", ["dense", "split-topk", "split-exact", "coupled"])
def test_greedy_sync_equals_cloud_equals_target_generate(tiny_target, tiny_draft, verify):
    prompt_ids = tiny_target.tokenizer("hello world")["input_ids"]
    with torch.inference_mode():
        ref = tiny_target.model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=40,
                                         min_new_tokens=40, pad_token_id=0)[0, len(prompt_ids):].tolist()

    async def scenario():
        async with serving(tiny_target) as (_, addr), edge(addr, tiny_draft, max_new_tokens=40, ignore_eos=True, verify=verify) as client:
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
    assert st["prefill_tokens"] == 1  # the first token at once, with the cloud's prefill; the rest from rounds
    assert st["mean_accepted_len"] == pytest.approx(15 / st["rounds"])
    assert st["accepted_tokens"] + st["rounds"] >= 15  # each round commits accepted + 1 (last may be cut)
    for key in ("tokens_per_s", "ttft_s", "itl_p50_s", "itl_p95_s", "acceptance_rate", "bytes_up_per_token",
                "bytes_down_per_token", "edge_busy_fraction", "cloud_busy_fraction"):
        assert st[key] is not None, key
    # each figure against what it is computed from, so that a wrong or zeroed figure fails
    assert 0 < st["ttft_s"] <= st["wall_s"] and st["tokens_per_s"] == pytest.approx(16 / st["wall_s"])
    assert 0 <= st["itl_p50_s"] <= st["itl_p95_s"] <= st["wall_s"]
    assert st["drafted_tokens"] > 0 and st["acceptance_rate"] == pytest.approx(st["accepted_tokens"] / st["drafted_tokens"])
    assert 0 < st["acceptance_rate"] < 1  # T=1 with the 1-layer draft: some accepted, some rejected
    assert st["bytes_up"] > 0 and st["bytes_up_per_token"] == pytest.approx(st["bytes_up"] / 16)
    assert st["bytes_down"] > 0 and st["bytes_down_per_token"] == pytest.approx(st["bytes_down"] / 16)
    assert 0 < st["edge_busy_fraction"] <= 1 and 0 < st["cloud_busy_fraction"] <= 1


def test_split_topk_is_labelled_approximate_and_sends_little(tiny_target, tiny_draft):
    """The paper's sampler runs end to end; its statistics say it is not exact, and it sends what the paper says.
    (How far its law is from the target's: tests/test_verify_modes.py, where the tail is heavy.)"""
    prompt_ids = tiny_target.tokenizer(PROMPT)["input_ids"]

    async def scenario():
        async with serving(tiny_target) as (_, addr), edge(addr, tiny_draft, max_new_tokens=24, verify="split-topk",
                                                           temperature=1.0, ignore_eos=True) as client:
            gen = client.generate(prompt_ids, mode="sync", seed=3)
            await gen.collect()
            exact_gen = client.generate(prompt_ids, mode="sync", seed=3, verify="coupled")
            await exact_gen.collect()
            return gen.stats.to_dict(), exact_gen.stats.to_dict()

    st, exact = run(scenario())
    assert st["exact"] is False and exact["exact"] is True
    assert st["generated_tokens"] == 24 and st["residual_rejections"] > 0
    assert st["residual_bytes_per_rejection"] < 100  # top-10 at half precision: the paper's "< 100 bytes"
    assert exact["bytes_up_per_token"] < st["bytes_up_per_token"]  # ids only beat ids + q(x)


def test_cloud_refuses_a_mode_it_does_not_offer(tiny_target, tiny_draft):
    from picospec.edge_client.client import EdgeError

    async def scenario():
        async with serving(tiny_target, verify_modes="dense,coupled") as (_, addr), \
                edge(addr, tiny_draft, max_new_tokens=4, verify="split-exact") as client:
            with pytest.raises(EdgeError, match="'split-exact' is not offered; this cloud offers dense, coupled"):
                await client.generate([3, 4, 5], mode="sync").collect()
            info = await client.connect()
            return list(info.verify_modes)

    assert run(scenario()) == ["dense", "coupled"]
