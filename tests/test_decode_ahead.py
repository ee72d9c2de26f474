"""Decode-ahead never delays a verification (cloud_server/ahead.py): the pure schedule, then a real cloud."""
from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
import torch

from picospec.cloud_server.ahead import batch_due_at, check_next_batch_in, decode_hold_s
from picospec.cloud_server.target import TargetCache
from picospec.shared.fingerprint import tokenizer_fingerprint
from picospec.shared.protocol import PROTOCOL_VERSION
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc
from tests.conftest import run, serving


def test_a_step_that_ends_before_the_batch_is_due_starts_now():
    assert decode_hold_s(now=10.0, due_at=10.5, step_s=0.4) == 0.0
    assert decode_hold_s(now=10.0, due_at=10.4, step_s=0.4) == 0.0  # ends exactly as it arrives


def test_a_step_that_would_still_run_when_the_batch_arrives_waits_for_it():
    assert decode_hold_s(now=10.0, due_at=10.3, step_s=0.4) == pytest.approx(0.7)  # till the batch, or its lapse
    assert decode_hold_s(now=10.5, due_at=10.3, step_s=0.4) == pytest.approx(0.2)  # late, not yet a step late


def test_the_expectation_lapses_a_whole_step_after_the_batch_was_due():
    assert decode_hold_s(now=10.75, due_at=10.3, step_s=0.4) == 0.0


def test_nothing_due_or_no_step_measured_yet_decodes_now():
    assert decode_hold_s(now=10.0, due_at=None, step_s=0.4) == 0.0
    assert decode_hold_s(now=10.0, due_at=10.1, step_s=None) == 0.0


def test_due_time_from_the_announcement_and_its_bounds():
    assert batch_due_at(5.0, 0.25) == 5.25 and batch_due_at(5.0, 0.0) is None
    assert check_next_batch_in(0.0) == 0.0 and check_next_batch_in(2.5) == 2.5
    for bad in (-0.1, math.inf, math.nan, 1e9):
        with pytest.raises(ValueError, match="next_batch_in_s"):
            check_next_batch_in(bad)


# ---- on a real cloud: a decode-ahead step made slow (STEP_S) and two batches GAP_S apart ---------------------------
# each decode-ahead step, slowed down on purpose (the tiny target decodes in a millisecond); the cloud holds for an
# announced batch until it is due and at most a step longer, so B may come up to a second late on a loaded machine
STEP_S = 1.0
GAP_S = 0.1   # batch B follows batch A by this much: within a step's time


async def _two_batches(addr: str, target, prompt: list[int], ref: list[int], announce: bool) -> list[pb.Verdict]:
    """Batch A (announcing B GAP_S later, or announcing nothing), then B; the verdicts from A's on, up to B's."""
    fp = tokenizer_fingerprint(target.tokenizer)
    hello = pb.Hello(protocol_version=PROTOCOL_VERSION, prompt_ids=prompt, max_new_tokens=len(ref), ignore_eos=True,
                     tokenizer=pb.TokenizerFingerprint(num_tokens=fp.num_tokens, sha256=fp.sha256),
                     vocab_size=target.model.config.vocab_size, sampling=pb.SamplingParams(temperature=0.0, top_p=1.0),
                     verify_mode="coupled", decode_ahead=True, first_token=True)
    p = len(prompt)
    async with grpc.aio.insecure_channel(addr) as ch:
        call = pb_grpc.PicoSpecStub(ch).Speculate(timeout=30)
        await call.write(pb.EdgeMessage(hello=hello))
        assert (await call.read()).ready.first_token == ref[0]
        assert (await call.read()).verdict.token == ref[1]  # one step alone: measures the step time
        a = pb.DraftBatch(epoch=0, start_pos=p + 2, token_ids=ref[2:6], next_batch_in_s=GAP_S if announce else 0.0)
        await call.write(pb.EdgeMessage(draft=a))
        sent_a = time.perf_counter()
        verdicts = [(await call.read()).verdict]
        while verdicts[-1].verified == 0:  # a step already under way when A came: its token, then A's verdict
            verdicts = [(await call.read()).verdict]
        await asyncio.sleep(max(0.0, GAP_S - (time.perf_counter() - sent_a)))
        await call.write(pb.EdgeMessage(draft=pb.DraftBatch(epoch=0, start_pos=p + 6, token_ids=ref[6:10])))
        verdicts.append((await call.read()).verdict)
        while verdicts[-1].verified == 0:
            verdicts.append((await call.read()).verdict)
        call.cancel()
    return verdicts


@pytest.mark.parametrize("announce", [True, False], ids=["announced", "unannounced"])
def test_a_batch_announced_within_a_step_is_verified_before_any_step(tiny_target, monkeypatch, announce):
    prompt = list(tiny_target.tokenizer("ahead of time")["input_ids"])
    with torch.inference_mode():
        ref = tiny_target.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                         pad_token_id=0)[0, len(prompt):].tolist()
    decode_next = TargetCache.decode_next

    def slow_decode_next(self, committed):
        time.sleep(STEP_S)
        return decode_next(self, committed)
    monkeypatch.setattr(TargetCache, "decode_next", slow_decode_next)

    async def scenario():
        async with serving(tiny_target) as (_, addr):
            return await _two_batches(addr, tiny_target, prompt, ref, announce)

    verdicts = run(scenario())
    after_a = verdicts[1:]  # what came between A's verdict and B's, then B's
    assert after_a[-1].verified > 0 and all(v.token in ref for v in verdicts if v.HasField("token"))
    if announce:  # nothing started in between, and nothing waited
        assert len(after_a) == 1 and after_a[0].waited_s == 0.0, after_a
    else:         # the control: a step started at once, and B waited behind it
        assert len(after_a) == 2 and after_a[0].verified == 0 and after_a[0].waited_s >= GAP_S / 2, after_a
