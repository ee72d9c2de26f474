"""Admission and backpressure: a cloud at --max-sessions refuses with RESOURCE_EXHAUSTED and a retry hint
(`retry-after-ms` trailing metadata, cloud_server/slots.py); the edge asks again at that interval for up to
--admission-wait-s, counting it in the statistics, and its output is unchanged. Pure parts first, then a real
cloud on loopback with the tiny pair."""
from __future__ import annotations

import asyncio

import pytest
import torch

from picospec.cloud_server.handshake import Refusal
from picospec.cloud_server.slots import RETRY_AFTER_BOUNDS_S, SessionSlots, retry_after_s
from picospec.edge_client.client import EdgeError
from picospec.edge_client.waiting import admission_delay_s
from picospec.shared.connection import RETRY_AFTER_KEY
from picospec.shared.connection import retry_hint_s
from tests.conftest import edge, run, serving


def test_the_hint_is_when_the_next_of_the_running_sessions_should_end():
    assert retry_after_s(None, 4) == 1.0                  # no session has ended yet
    assert retry_after_s(10.0, 4) == pytest.approx(2.0)   # D / (limit + 1)
    assert retry_after_s(0.01, 4) == RETRY_AFTER_BOUNDS_S[0] and retry_after_s(600.0, 1) == RETRY_AFTER_BOUNDS_S[1]


def test_the_edge_waits_the_hint_or_its_own_backoff_spread_and_never_past_its_budget():
    assert admission_delay_s(1, 2.0, left_s=30.0, jitter=1.1) == pytest.approx(2.2)
    assert admission_delay_s(1, None, left_s=30.0, jitter=1.0) == 0.25 and admission_delay_s(9, None, 30.0, 1.0) == 2.0
    assert admission_delay_s(1, 2.0, left_s=0.5, jitter=1.2) == 0.5


def test_the_hint_is_read_off_the_trailing_metadata_and_garbage_is_ignored():
    assert retry_hint_s(((RETRY_AFTER_KEY, "1500"),)) == 1.5
    assert retry_hint_s((("other", "1"),)) is None and retry_hint_s(None) is None
    for bad in ("soon", "-5", "1e12"):
        assert retry_hint_s(((RETRY_AFTER_KEY, bad),)) is None


def test_a_refusal_while_the_slot_it_waits_for_is_ending_says_retry_at_once():
    """A client's next generation right after one it cancelled can reach the cloud before the cancelled session
    has settled: refused, but told to retry in the shortest hint, not in a session's mean duration."""
    async def refusal(slots: SessionSlots, client: str) -> float:
        with pytest.raises(Refusal) as refused:
            async with slots.hold(client):
                pass
        return refused.value.retry_after_s

    async def scenario():
        slots = SessionSlots(1)
        slots.session_s.add(40.0)  # sessions have lasted 40 s: the usual hint is 5 s
        async with slots.hold("a") as held:
            usual = await refusal(slots, "b")
            held.ending()
            held.ending()  # idempotent
            soon = await refusal(slots, "b")
        per_client = SessionSlots(4, per_client=1)
        per_client.session_s.add(40.0)
        async with per_client.hold("a") as held:
            held.ending()
            mine = await refusal(per_client, "a")
        return usual, soon, mine, dict(slots.ending), dict(per_client.ending)

    usual, soon, mine, left, left_per_client = run(scenario())
    assert usual == RETRY_AFTER_BOUNDS_S[1] and soon == mine == RETRY_AFTER_BOUNDS_S[0]
    assert left == left_per_client == {}  # released with the slot


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_a_full_cloud_refuses_with_a_hint_and_the_edge_gets_in_once_a_slot_frees(tiny_target, tiny_draft):
    first_prompt, late_prompt = [5, 6, 7], list(tiny_target.tokenizer("let me in")["input_ids"])

    async def scenario():
        async with serving(tiny_target, max_sessions=1) as (service, addr), \
                edge(addr, tiny_draft, ignore_eos=True) as client:
            holder = client.generate(first_prompt, mode="sync", max_new_tokens=4000)
            await holder.__anext__()  # the only slot is taken
            with pytest.raises(EdgeError) as refused:  # no waiting: the refusal and its hint, at once
                await client.generate(late_prompt, mode="cloud", max_new_tokens=8, admission_wait_s=0).collect()
            late = client.generate(late_prompt, mode="pipeline", max_new_tokens=16)
            waiting = asyncio.ensure_future(late.collect())
            while late.stats.admission_retries < 2:  # refused twice meanwhile, asking again each time
                await asyncio.sleep(0.05)
            assert not waiting.done()
            await holder.aclose()  # the slot frees: the late one gets in at its next try
            return refused.value, await asyncio.wait_for(waiting, 30), late.stats

    refusal, tokens, stats = run(scenario())
    assert refusal.status == "RESOURCE_EXHAUSTED" and refusal.retry_after_s is not None
    assert "server is at its limit of 1 sessions; retry in about" in str(refusal)
    assert tokens == _greedy(tiny_target.model, late_prompt, 16)  # waiting changed nothing in the output
    assert stats.admission_retries >= 2 and stats.admission_wait_s > 0 and stats.finish_reason == "length"


def test_back_to_back_generations_find_the_slot_their_last_one_freed(tiny_target, tiny_draft):
    """A generation returns once the cloud has freed its session (the call's status came), so a client's next one
    never meets its own previous session at --max-sessions 1: no refusal, no wait. Before, the next Hello could win
    the race with the cloud's settling and was refused (one CI run in a few)."""
    prompt = list(tiny_target.tokenizer("again and again")["input_ids"])

    async def scenario():
        async with serving(tiny_target, max_sessions=1) as (service, addr), \
                edge(addr, tiny_draft, ignore_eos=True, max_new_tokens=6, admission_wait_s=0) as client:
            outputs = []
            for mode in ("sync", "pipeline", "picospec", "sync", "cloud", "pipeline") * 2:
                gen = client.generate(prompt, mode=mode)
                outputs.append(await gen.collect())
                assert service.active_sessions == 0, f"{mode}: the generation returned before its slot came back"
            return outputs

    outputs = run(scenario())
    assert all(out == _greedy(tiny_target.model, prompt, 6) for out in outputs)
