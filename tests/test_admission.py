"""Admission and backpressure: a cloud at --max-sessions refuses with RESOURCE_EXHAUSTED and a retry hint
(`retry-after-ms` trailing metadata, cloud_server/slots.py); the edge asks again at that interval for up to
--admission-wait-s, counting it in the statistics, and its output is unchanged. Pure parts first, then a real
cloud on loopback with the tiny pair."""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from picospec.cloud_server.handshake import Refusal
from picospec.cloud_server.target import TargetCache
from picospec.cloud_server import slots as slots_module
from picospec.cloud_server.slots import RETRY_AFTER_BOUNDS_S, SessionSlots, retry_after_s, worth_waiting
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


def test_a_new_session_waits_only_where_every_limit_that_stops_it_has_a_slot_ending():
    assert not worth_waiting(full=False, any_ending=True, client_full=False, client_ending=True)  # not stopped
    assert worth_waiting(full=True, any_ending=True, client_full=False, client_ending=False)
    assert not worth_waiting(full=True, any_ending=False, client_full=False, client_ending=False)
    assert worth_waiting(full=False, any_ending=False, client_full=True, client_ending=True)
    assert not worth_waiting(full=True, any_ending=True, client_full=True, client_ending=False)  # its own won't free


def test_a_session_at_the_limit_waits_for_a_slot_that_is_ending_and_is_refused_at_once_otherwise(monkeypatch):
    """A slot whose session is past its last message frees within a settling's time: a new session waits for it
    (a client's next generation right after its last one), bounded by ENDING_WAIT_S, after which the refusal hints
    the shortest retry. A slot that is not ending refuses at once, hinting from the sessions' mean duration."""
    async def refusal(slots: SessionSlots, client: str) -> float:
        with pytest.raises(Refusal) as refused:
            async with slots.hold(client):
                pass
        return refused.value.retry_after_s

    async def admitted(slots: SessionSlots, client: str) -> bool:
        async with slots.hold(client):
            return True

    async def scenario():
        slots = SessionSlots(1)
        slots.session_s.add(40.0)  # sessions have lasted 40 s: the usual hint is 5 s
        async with slots.hold("a") as held:
            usual = await refusal(slots, "b")
            held.ending()
            held.ending()  # idempotent
            waiting = asyncio.ensure_future(admitted(slots, "b"))
            await asyncio.sleep(0)
            assert not waiting.done()  # it waits for the ending slot ...
        took_it = await waiting       # ... and takes it once given back
        monkeypatch.setattr(slots_module, "ENDING_WAIT_S", 0.05)
        async with slots.hold("a") as held:
            held.ending()
            soon = await refusal(slots, "b")  # the slot never came back within the bound
        per_client = SessionSlots(4, per_client=1)
        per_client.session_s.add(40.0)
        async with per_client.hold("a") as held:
            other_client = await admitted(per_client, "b")  # the server's limit is not reached: no wait
            held.ending()
            mine = await refusal(per_client, "a")
        return usual, took_it, soon, other_client, mine, dict(slots.ending), dict(per_client.ending), slots.active

    usual, took_it, soon, other_client, mine, left, left_per_client, active = run(scenario())
    assert usual == RETRY_AFTER_BOUNDS_S[1] and took_it and other_client and soon == mine == RETRY_AFTER_BOUNDS_S[0]
    assert left == left_per_client == {} and active == 0  # released with the slot


def test_a_drain_ends_the_wait_for_an_ending_slot_with_unavailable():
    async def scenario():
        slots = SessionSlots(1)
        async with slots.hold("a") as held:
            held.ending()
            waiting = asyncio.ensure_future(slots.hold("b").__aenter__())
            await asyncio.sleep(0)
            slots.drain()
        with pytest.raises(Refusal) as refused:
            await waiting
        return refused.value

    refused = run(scenario())
    assert refused.code == grpc.StatusCode.UNAVAILABLE and refused.reason == "draining"


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
    """A client's next generation waits (bounded) for its previous call's status, which the cloud sends once it has
    freed that session, so it never meets its own previous session at --max-sessions 1: with --admission-wait-s 0 a
    refusal would fail the generation. Before, the next Hello could win the race with the cloud's settling and was
    refused (one CI run in a few)."""
    prompt = list(tiny_target.tokenizer("again and again")["input_ids"])

    async def scenario():
        async with serving(tiny_target, max_sessions=1) as (service, addr), \
                edge(addr, tiny_draft, ignore_eos=True, max_new_tokens=6, admission_wait_s=0) as client:
            outputs = [await client.generate(prompt, mode=mode).collect()
                       for mode in ("sync", "pipeline", "picospec", "sync", "cloud", "pipeline") * 2]
            return outputs

    assert all(out == _greedy(tiny_target.model, prompt, 6) for out in run(scenario()))


@pytest.mark.parametrize("mode", ["sync", "cloud"])
def test_a_generation_returns_at_its_last_token_while_the_cloud_still_settles_it(tiny_target, tiny_draft, mode,
                                                                                 monkeypatch):
    """The user's generation ends at its last token, not at the call's status: here the cloud is held in its settling
    (its last job on the model worker, before it frees the slot) until the test lets go. The client's next
    generation, at --max-sessions 1, waits at the cloud for that slot instead of being refused for its own previous
    session. In cloud mode the edge cancels its call after the last token: the slot still waits for the job."""
    prompt = list(tiny_target.tokenizer("settle down")["input_ids"])
    let_go, close = threading.Event(), TargetCache.close

    def held_close(cache):  # the session's last job on the model worker, before its slot is given back
        let_go.wait(60)
        close(cache)

    monkeypatch.setattr(TargetCache, "close", held_close)

    async def scenario():
        async with serving(tiny_target, max_sessions=1) as (service, addr):
            async with edge(addr, tiny_draft, ignore_eos=True, max_new_tokens=6, admission_wait_s=0) as client:
                first = await asyncio.wait_for(client.generate(prompt, mode=mode).collect(), 30)
                still_held = service.active_sessions
                second = asyncio.ensure_future(client.generate(prompt, mode=mode).collect())
                # it cannot end while the first session is held: a Hello sent now would be refused in milliseconds
                done, _ = await asyncio.wait({second}, timeout=0.5)
                first_still_ending = sum(service.slots.ending.values())
                let_go.set()
                assert not done, second.exception() or "the second generation ran while the first held the slot"
                assert first_still_ending == 1, "the first session's slot was given back before its last job ended"
                outputs = [first, await asyncio.wait_for(second, 60)]
            return outputs, still_held, await service.slots.wait_idle(10)  # the cloud settles on its own

    outputs, still_held, settled = run(scenario())
    assert still_held == 1, "the generation waited for the cloud's settling"
    assert outputs == [_greedy(tiny_target.model, prompt, 6)] * 2 and settled
