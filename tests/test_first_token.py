"""The first token at once (docs/design.md §4.1): the cloud decodes the first token in its prefill's own pass and
sends it in Ready; drafting starts from it. Real gRPC on loopback, the tiny pair."""
from __future__ import annotations

import pytest
import torch

from picospec.shared.rng import Stream
from picospec.shared.sampling import SamplingParams, process_logits, sample_token
from picospec.shared.verify import gumbel_argmax
from tests.conftest import edge, run, serving

SPECULATIVE = [("sync", "dense"), ("pipeline", "coupled"), ("pipeline", "split-exact"), ("early-exit", "dense"),
               ("picospec", "split-topk")]


def _greedy_reference(model, prompt_ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("mode,verify", SPECULATIVE)
def test_the_first_token_arrives_with_the_prefill_before_any_round(tiny_target, tiny_draft, mode, verify):
    prompt_ids = tiny_target.tokenizer("first things first")["input_ids"]
    ref = _greedy_reference(tiny_target.model, prompt_ids, 12)

    async def scenario():
        async with serving(tiny_target) as (_, addr), \
                edge(addr, tiny_draft, max_new_tokens=12, ignore_eos=True, verify=verify) as client:
            gen = client.generate(prompt_ids, mode=mode)
            first = await gen.__anext__()
            rounds_then, ttft = gen.stats.rounds, gen.stats.first_token_at
            rest = await gen.collect()
            return first, rounds_then, ttft, rest, gen.stats

    first, rounds_then, ttft, ids, stats = run(scenario())
    assert first == ref[:1] and rounds_then == 0 and ttft is not None  # no draft, no verdict needed for it
    assert ids == ref and stats.prefill_tokens == 1
    assert stats.rounds > 0 or stats.cloud_tokens > 0  # the rest came from speculation (or decode-ahead)


@pytest.mark.parametrize("mode,verify", SPECULATIVE[:3])
def test_a_one_token_generation_ends_with_the_ready_and_draws_the_bonus_coin(tiny_target, tiny_draft, mode, verify):
    prompt_ids = tiny_target.tokenizer("one")["input_ids"]
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=5)
    with torch.inference_mode():
        p = process_logits(tiny_target.model(torch.tensor([prompt_ids])).logits[0, -1:], params)[0]
    # the coin a bonus token at that position uses: coupled's Gumbel-max choice, else the target's own stream
    expected = (gumbel_argmax(p, 5, len(prompt_ids)) if verify == "coupled"
                else sample_token(p, 5, len(prompt_ids), Stream.TARGET))

    async def scenario():
        async with serving(tiny_target) as (_, addr), \
                edge(addr, tiny_draft, max_new_tokens=1, ignore_eos=True, verify=verify, temperature=1.0) as client:
            gen = client.generate(prompt_ids, mode=mode, seed=5)
            return await gen.collect(), gen.stats

    ids, stats = run(scenario())
    assert ids == [expected]
    assert stats.rounds == 0 and stats.drafted == 0 and stats.finish_reason == "length"


def test_resume_from_is_checked_against_the_budget(tiny_target, tiny_draft):
    async def scenario():
        async with edge("127.0.0.1:1", tiny_draft, max_new_tokens=4) as client:
            with pytest.raises(ValueError, match="nothing left"):
                client.generate([1, 2], mode="sync", resume_from=[3, 4, 5, 6])
            with pytest.raises(ValueError, match="needs the cloud"):
                client.generate([1, 2], mode="edge", resume_from=[3])
    run(scenario())
