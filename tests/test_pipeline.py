"""The asynchronous pipeline end to end on the tiny pair, over real gRPC on loopback.

Message timing is perturbed by deterministic test hooks (seeded delays before each message goes out
and after each arrives), so drafting, verification and the wire interleave differently from run to
run of the same seed list, never by sleeps in the program under test. Whatever the timing:
greedy output equals the target's own and at the end both KV caches hold exactly the committed tokens (but
the newest, which is fed with the next drafts); sampled output follows the target's law in
tests/test_law_tiny.py.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from picospec.bench.jitter import Jitter
from tests.conftest import PassBeforeDecodeAhead, edge, run, serving



def _greedy_reference(model, prompt_ids, n):
    """The target's greedy tokens by plain full forward passes (no cache). Not `generate(min_new_tokens=n)`:
    that masks end-of-sequence, while these sessions (ignore_eos) may emit it like any other token."""
    seq = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model.model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt_ids):]


@pytest.mark.parametrize("decode_ahead", ["off", "on"])
@pytest.mark.parametrize("verify", ["dense", "split-topk", "split-exact", "coupled"])
def test_greedy_pipeline_equals_target_under_jitter(tiny_target, tiny_draft, verify, decode_ahead):
    prompt_ids = tiny_target.tokenizer("hello world")["input_ids"]
    ref = _greedy_reference(tiny_target, prompt_ids, 40)

    async def scenario():
        outs, stats = [], []
        async with serving(tiny_target) as (service, addr):
            service.hooks = PassBeforeDecodeAhead(Jitter(1, 0.004))  # a pass comes first: the race is run
            async with edge(addr, tiny_draft, max_new_tokens=40, ignore_eos=True, verify=verify, decode_ahead=decode_ahead) as client:
                for seed in range(3):
                    client.hooks = Jitter(100 + seed, 0.004)
                    gen = client.generate(prompt_ids, mode="pipeline", draft_len=seed + 2 if seed < 2 else 0)
                    outs.append(await gen.collect())
                    stats.append(gen.stats.to_dict())
        return outs, stats

    outs, stats = run(scenario())
    assert all(o == ref for o in outs)
    if decode_ahead == "off":
        assert all(s["rounds"] > 0 and s["cloud_tokens"] == 0 for s in stats)
    else:  # the race was run: drafts verified beside the cloud's own tokens, not the cloud decoding everything
        assert all(s["rounds"] > 0 for s in stats) and sum(s["accepted_tokens"] for s in stats) > 0, stats


@pytest.mark.parametrize("mode", ["picospec", "sync"])
def test_greedy_picospec_and_sync_equal_target_under_jitter(tiny_target, tiny_draft, mode):
    prompt_ids = tiny_target.tokenizer("the quick brown fox")["input_ids"]
    ref = _greedy_reference(tiny_target, prompt_ids, 32)

    async def scenario():
        async with serving(tiny_target) as (service, addr):
            service.hooks = Jitter(7, 0.003)
            async with edge(addr, tiny_draft, max_new_tokens=32, ignore_eos=True) as client:
                client.hooks = Jitter(8, 0.003)
                gen = client.generate(prompt_ids, mode=mode)
                return await gen.collect(), gen.stats.to_dict()

    out, st = run(scenario())
    assert out == ref
    if mode == "picospec":
        assert st["verify_mode"] == "split-topk" and st["exact"] is False  # labelled approximate


def _check_caches(service, stats, committed):
    record = service.closed_sessions[-1]
    assert record.committed == committed
    # nothing stale: the target's cache holds committed tokens only, all of them but the newest, except where
    # the session ended on the edge's own split correction, which the target never had to run (one fewer)
    cache = record.cache_tokens
    assert cache == committed[: len(cache)], "the target's cache holds a token that was never committed"
    assert len(committed) - 2 <= len(cache) <= len(committed) - 1, (len(cache), len(committed))
    drafter = stats.drafter
    assert drafter.backend.tokens == committed[: len(drafter.backend.tokens)]
    assert len(drafter.backend.tokens) == len(committed) - 1, "the draft's cache must hold the committed tokens but the newest"


@pytest.mark.parametrize("verify", ["dense", "coupled", "split-exact"])
def test_rejection_storm_keeps_caches_at_the_committed_length(tiny_target, verify):
    """A draft that is an unrelated random model: nearly every draft is rejected, chains die constantly."""
    from picospec.shared.models import load_model

    stranger = load_model("tiny-random-b", progress=False)
    prompt_ids = tiny_target.tokenizer("storm")["input_ids"]
    ref = _greedy_reference(tiny_target, prompt_ids, 30)

    async def scenario():
        async with serving(tiny_target) as (service, addr):
            service.hooks = Jitter(5, 0.002)
            async with edge(addr, stranger, max_new_tokens=30, ignore_eos=True, verify=verify, decode_ahead="off") as client:
                client.hooks = Jitter(6, 0.002)
                gen = client.generate(prompt_ids, mode="pipeline", draft_len=6)
                out = await gen.collect()
                await asyncio.get_running_loop().run_in_executor(client.executor, lambda: None)  # drafter settled
                for _ in range(1500):  # the server releases the session once the edge has closed its side
                    if not service.active_sessions and service.closed_sessions:
                        break
                    await asyncio.sleep(0.01)
                assert not service.active_sessions, "the finished session was never released"
                _check_caches(service, gen.stats, prompt_ids + out)
                return out, gen.stats.to_dict()

    out, st = run(scenario())
    assert out == ref
    # every rejected draft, and every draft behind one, is wasted (how many chains were drafted ahead is a race)
    assert st["acceptance_rate"] < 0.3 and st["wasted_draft_tokens"] >= st["drafted_tokens"] - st["accepted_tokens"] > 0


def test_cancelled_generation_leaves_caches_at_the_committed_length(tiny_target, tiny_draft):
    prompt_ids = tiny_target.tokenizer("cancel me")["input_ids"]

    async def scenario():
        async with serving(tiny_target) as (service, addr):
            async with edge(addr, tiny_draft, max_new_tokens=200, ignore_eos=True, temperature=1.0, decode_ahead="off") as client:
                gen = client.generate(prompt_ids, mode="pipeline", draft_len=5)
                got = []
                async for chunk in gen:
                    got += chunk
                    if len(got) >= 12:
                        break
                await gen.aclose()
                await asyncio.get_running_loop().run_in_executor(client.executor, lambda: None)
                for _ in range(500):
                    if not service.active_sessions and service.closed_sessions:
                        break
                    await asyncio.sleep(0.01)
                record = service.closed_sessions[-1]
                # the cloud may have committed more than the edge saw before it hung up; the edge's view is a prefix
                assert record.committed[: len(prompt_ids) + len(got)] == prompt_ids + got
                assert record.cache_tokens == record.committed[:-1]
                drafter = gen.stats.drafter
                assert drafter.backend.tokens == (prompt_ids + got)[:-1]
                return gen.stats.finish_reason

    assert run(scenario()) == "cancelled"


class CorrectionThenCloudAlone(Jitter):
    """Forces the interleaving behind the split-mode hang: right after a rejection, while the edge holds the
    correction it sampled, the online choice says "draft nothing, let the cloud decode" (length 0)."""

    def steer_draft_len(self, chosen: int, awaiting_resolution: bool) -> int:
        return 0 if awaiting_resolution else 2

    async def before_decode_ahead(self) -> None:
        await asyncio.sleep(0.02)  # the cloud's side: let drafts arrive before it decodes alone


@pytest.mark.parametrize("verify", ["split-topk", "split-exact"])
def test_split_correction_is_sent_when_the_edge_drafts_nothing(tiny_target, tiny_draft, verify):
    """Regression: the edge chose draft length 0 holding an unsent correction and waited for decode-ahead tokens
    while the cloud, which decodes nothing until it has the correction, waited for it. Both sat idle forever."""
    prompt_ids = tiny_target.tokenizer("hello world")["input_ids"]
    ref = _greedy_reference(tiny_target, prompt_ids, 40)

    async def scenario():
        async with serving(tiny_target) as (service, addr):
            service.hooks = CorrectionThenCloudAlone(199, 0.002)
            async with edge(addr, tiny_draft, max_new_tokens=40, ignore_eos=True, verify=verify, decode_ahead="on") as client:
                outs = []
                for seed in range(3):
                    client.hooks = CorrectionThenCloudAlone(200 + seed, 0.002)
                    gen = client.generate(prompt_ids, mode="pipeline")
                    outs.append((await asyncio.wait_for(gen.collect(), 60), gen.stats.to_dict()))
                return outs

    for out, st in run(scenario()):
        assert out == ref
        assert st["residual_rejections"] > 0 and st["draft_len_chosen"].get("0", 0) > 0  # the forced path ran


def test_a_deadlock_is_reported_at_once_with_both_sides_state(tiny_target, tiny_draft, monkeypatch, caplog):
    """With the hang's cause put back (a correction goes up only when it ends the generation), the edge must not
    wait: its policy sees that neither side owes the other a message and fails at once, printing the state, and
    tells the cloud why it hangs up, which logs its own state."""
    import logging

    import picospec.edge_client.policy as policy
    from picospec.edge_client.client import EdgeError

    monkeypatch.setattr(policy, "owes_correction", lambda s: s.resolved and not s.resolved_sent and s.resolution_ends)
    prompt_ids = tiny_target.tokenizer("hello world")["input_ids"]

    async def scenario():
        async with serving(tiny_target) as (service, addr):
            service.hooks = CorrectionThenCloudAlone(199, 0.002)
            async with edge(addr, tiny_draft, max_new_tokens=40, ignore_eos=True, verify="split-exact",
                            decode_ahead="on") as client:
                client.hooks = CorrectionThenCloudAlone(200, 0.002)
                gen = client.generate(prompt_ids, mode="pipeline")
                with pytest.raises(EdgeError, match="protocol stall") as err:
                    await asyncio.wait_for(gen.collect(), 60)
                for _ in range(200):  # the cloud reads the edge's Cancel on its own task
                    if "cloud state" in caplog.text:
                        break
                    await asyncio.sleep(0.01)
                return str(err.value)

    with caplog.at_level(logging.INFO, logger="picospec.cloud"):
        message = run(scenario())
    assert "'cloud_owes': None" in message and "its correction (sampled, unsent)" in message
    assert "'awaiting_resolution': True" in message and "'draft_len': 0" in message
    assert "cloud state:" in caplog.text and "the edge's correction at position" in caplog.text


@pytest.mark.parametrize("can_pay", [True, False])
def test_at_length_zero_the_edge_shadow_drafts_only_where_speculation_could_pay(tiny_target, tiny_draft, monkeypatch,
                                                                                can_pay):
    """Length 0 with decode-ahead: the cloud decodes every token. Shadow drafts (one every SHADOW_EVERY tokens, never
    sent) measure acceptance for the choice, unless the choice says no acceptance could make speculation pay
    (DraftLenChoice.can_pay): then the draft makes nothing at all. The output is the target's either way."""
    from picospec.edge_client import session
    from picospec.edge_client.policy import SHADOW_EVERY
    from picospec.shared.perf_model import DraftLenChoice
    monkeypatch.setattr(session, "choose_draft_len", lambda *a, **k: DraftLenChoice(0, None, can_pay=can_pay))
    prompt_ids = tiny_target.tokenizer("hello world")["input_ids"]
    n = 40

    async def scenario():
        async with serving(tiny_target) as (_, addr):
            async with edge(addr, tiny_draft, max_new_tokens=n, ignore_eos=True, verify="coupled") as client:
                gen = client.generate(prompt_ids, mode="pipeline")
                return await gen.collect(), gen.stats.to_dict()

    out, st = run(scenario())
    assert out == _greedy_reference(tiny_target, prompt_ids, n)
    assert st["rounds"] == 0 and st["cloud_tokens"] == n - 1, st  # the first token comes with the prefill
    made = st["draft_tokens_made"]
    assert (made >= n // SHADOW_EVERY - 1) if can_pay else made == 0, st


@pytest.mark.parametrize("cloud_costs,probes", [({0: 0.05, 1: 0.10}, False), ({0: 1e-4, 1: 1e-4}, True)],
                         ids=["steep", "flat"])
def test_a_new_session_starts_from_the_clouds_pass_costs(tiny_target, tiny_draft, cloud_costs, probes):
    """Ready.pass_s: the cloud's pass costs over its sessions so far. Where they leave no acceptance at which
    speculation could pay (a pass over one draft costing two decode steps: and more so beside the tiny target's
    real decode steps, about a millisecond, which the edge measures itself as the cloud decodes ahead), the
    pipeline as shipped starts at length 0: no probe batch, no draft at all. Where a pass over one draft costs
    less than any real decode step, its first choice is a probe batch of one, as before. The target's tokens either
    way."""
    prompt_ids = tiny_target.tokenizer("hello world")["input_ids"]
    n = 24

    async def scenario():
        async with serving(tiny_target) as (service, addr):
            for size, seconds in cloud_costs.items():
                service.capacity.passes.add(size, seconds)
            async with edge(addr, tiny_draft, max_new_tokens=n, ignore_eos=True, verify="coupled") as client:
                gen = client.generate(prompt_ids, mode="pipeline")
                return await gen.collect(), gen.stats.to_dict()

    out, st = run(scenario())
    assert out == _greedy_reference(tiny_target, prompt_ids, n)
    # float32 on the wire; the cloud's decode step went to the anchor, which the verdicts then refresh
    assert st["estimates"]["pass_s_cloud"] == pytest.approx({n: s for n, s in cloud_costs.items() if n > 0})
    chosen = st["draft_len_chosen"]
    if probes:  # a batch of one first (whether the cloud's own token overtakes it is timing)
        assert chosen.get("1", 0) >= 1 and st["draft_tokens_made"] > 0, st
    else:
        assert set(chosen) == {"0"} and st["draft_tokens_made"] == 0 and st["rounds"] == 0, st
        assert st["estimates"]["last_choice"]["can_pay"] is False, st
