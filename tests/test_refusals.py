"""Bad input gets a clear error, and the server keeps serving its other sessions."""
from __future__ import annotations

import asyncio
import math
import re

import grpc
import numpy as np
import pytest
import torch

from picospec.edge_client.client import EdgeError
from picospec.shared.codec import decode_list, decode_probs, encode_probs
from picospec.shared.fingerprint import tokenizer_fingerprint
from picospec.shared.protocol import PROTOCOL_VERSION
from picospec.shared.rng import Stream, uniform
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc
from picospec.shared.sampling import SamplingParams, process_logits
from tests.conftest import edge, run, serving


def _hello(target, **over) -> pb.Hello:
    fp = tokenizer_fingerprint(target.tokenizer)
    fields = dict(
        protocol_version=PROTOCOL_VERSION,
        tokenizer=pb.TokenizerFingerprint(num_tokens=fp.num_tokens, sha256=fp.sha256),
        vocab_size=target.model.config.vocab_size,
        sampling=pb.SamplingParams(temperature=0.0, top_p=1.0),
        verify_mode="dense",
        prompt_ids=[3, 4, 5],
        max_new_tokens=8,
    )
    fields.update(over)
    return pb.Hello(**fields)


def _draft(epoch=0, start=3, ids=(7,), vocab=64, q=None) -> pb.EdgeMessage:
    if q is None:
        q = torch.nn.functional.one_hot(torch.tensor([min(i, vocab - 1) for i in ids]), vocab).float()
    return pb.EdgeMessage(draft=pb.DraftBatch(epoch=epoch, start_pos=start, token_ids=list(ids), q_payload=encode_probs(q)))


async def _exchange(addr: str, messages: list) -> tuple[list[pb.CloudMessage], grpc.aio.AioRpcError | None]:
    """Send messages one by one on a fresh Speculate stream, reading one reply after each.

    A message may also be a function of the replies so far, to answer what the cloud sent (split modes)."""
    async with grpc.aio.insecure_channel(addr) as ch:
        call = pb_grpc.PicoSpecStub(ch).Speculate(timeout=30)
        replies = []
        try:
            for m in messages:
                await call.write(m(replies) if callable(m) else m)
                r = await call.read()
                if r is grpc.aio.EOF:
                    break
                replies.append(r)
            await call.done_writing()
            while (r := await call.read()) is not grpc.aio.EOF:  # read(), not `async for`: the two may not be mixed
                replies.append(r)
            return replies, None
        except grpc.aio.AioRpcError as e:
            return replies, e


async def _healthy(addr: str, target, draft) -> list[int]:
    async with edge(addr, draft, max_new_tokens=6, ignore_eos=True) as client:
        return await client.generate([3, 4, 5], mode="sync").collect()


# ---- split modes by hand: a rejection leaves position 3 open for the edge's resolved token --------------

def _rejection_setup(target) -> tuple[int, int]:
    """A draft token the target finds unlikely after [3, 4, 5] at temperature 1, and a seed whose accept coin
    rejects it when the edge claims q = 1 (seeds tried in order, at most 200)."""
    with torch.inference_mode():
        logits = target.model(input_ids=torch.tensor([[3, 4, 5]])).logits[0, -1]
    p_x, x = torch.min(process_logits(logits, SamplingParams(temperature=1.0)), -1)
    for seed in range(200):
        # rejected iff u * q(x) >= p(x); the margin covers last-bit differences from the server's cached forward
        if uniform(seed, 3, Stream.ACCEPT) >= 2 * float(p_x) + 1e-6:
            return int(x), seed
    raise AssertionError(f"no seed in 0..199 rejects token {int(x)} (p = {float(p_x)})")


def _split_hello(target, mode="split-exact", seed=0) -> pb.EdgeMessage:
    sampling = pb.SamplingParams(temperature=1.0, top_p=1.0, seed=seed)
    return pb.EdgeMessage(hello=_hello(target, verify_mode=mode, sampling=sampling, residual_top_k=2, tail_samples=1))


def _split_draft(epoch=0, ids=(7,), probs=(0.5,), resolved=None) -> pb.EdgeMessage:
    return pb.EdgeMessage(draft=pb.DraftBatch(epoch=epoch, start_pos=3, token_ids=list(ids), draft_probs=list(probs),
                                              resolved_token=resolved))


def _tail_request(epoch=1, position=3, have=1) -> pb.EdgeMessage:
    return pb.EdgeMessage(tail_request=pb.TailRequest(epoch=epoch, position=position, have=have))


def _rejected(target, mode="split-exact") -> list[pb.EdgeMessage]:
    """Hello, then a one-token draft that the target rejects."""
    x, seed = _rejection_setup(target)
    return [_split_hello(target, mode, seed), _split_draft(ids=(x,), probs=(1.0,))]


def _candidates(replies: list[pb.CloudMessage]) -> tuple[set[int], set[int]]:
    """The cloud's top-K and tail draws after the rejection, checking that it was one."""
    assert [r.WhichOneof("kind") for r in replies] == ["ready", "verdict"], replies
    v = replies[1].verdict
    assert v.accepted == 0 and not v.HasField("token") and v.committed_len == 3 and v.next_epoch == 1, v
    top = np.flatnonzero(decode_probs(v.residual_payload, vocab_size=64, max_rows=1)[0]).tolist()
    tail = decode_list(v.tail_payload, vocab_size=64, max_len=64)[0].tolist() if v.tail_payload else []
    return set(top), set(tail)


def _after_rejection(make):
    """A step that checks the rejection, then builds its message from the candidates (top-K | tail)."""
    return lambda replies: make(set().union(*_candidates(replies)))


def _with_resolved(m: pb.EdgeMessage, token: int) -> pb.EdgeMessage:
    m.draft.resolved_token = token
    return m


SPLIT_CASES = {
    "split: no resolved token after a rejection": (
        lambda t: _rejected(t) + [_after_rejection(lambda c: _split_draft(epoch=1))],
        grpc.StatusCode.INVALID_ARGUMENT, "ProtocolError: a resolved token is required after a split rejection"),
    "split: resolved token not among the candidates": (
        lambda t: _rejected(t) + [_after_rejection(lambda c: _split_draft(epoch=1, resolved=min(set(range(64)) - c)))],
        grpc.StatusCode.INVALID_ARGUMENT, r"ProtocolError: resolved token \d+ is not among the candidates the cloud sent"),
    "split: tail request with the wrong have": (
        lambda t: _rejected(t) + [_after_rejection(lambda c: _tail_request(have=5))],
        grpc.StatusCode.INVALID_ARGUMENT, "edge has 5 tail draws, cloud sent 1"),
    "split: tail request at another position": (
        lambda t: _rejected(t) + [_after_rejection(lambda c: _tail_request(position=4))],
        grpc.StatusCode.INVALID_ARGUMENT, "no open split-exact rejection at position 4"),
    "split-topk: tail request after a rejection": (
        lambda t: _rejected(t, "split-topk") + [_after_rejection(lambda c: _tail_request(have=0))],
        grpc.StatusCode.INVALID_ARGUMENT, "no open split-exact rejection at position 3"),
    "split: tail request without a rejection": (
        lambda t: [_split_hello(t), _tail_request(epoch=0, have=0)],
        grpc.StatusCode.INVALID_ARGUMENT, "ProtocolError: no open split-exact rejection at position 3"),
    "split: tail request from a future epoch": (
        lambda t: _rejected(t) + [_after_rejection(lambda c: _tail_request(epoch=7))],
        grpc.StatusCode.INVALID_ARGUMENT, "ProtocolError: tail request from future epoch 7 \\(current 1\\)"),
    "split: resolved token before any rejection": (
        lambda t: [_split_hello(t), _split_draft(resolved=7)],
        grpc.StatusCode.INVALID_ARGUMENT, "a resolved token is required after a split rejection, and only then"),
    "split: draft_probs missing": (
        lambda t: [_split_hello(t), _split_draft(probs=())],
        grpc.StatusCode.INVALID_ARGUMENT, "ValueError: 0 draft probabilities for 1 draft tokens"),
    "split: one draft_prob too many": (
        lambda t: [_split_hello(t), _split_draft(probs=(0.5, 0.5))],
        grpc.StatusCode.INVALID_ARGUMENT, "2 draft probabilities for 1 draft tokens"),
    **{
        f"split: draft_prob {q}": (
            lambda t, q=q: [_split_hello(t), _split_draft(probs=(q,))],
            grpc.StatusCode.INVALID_ARGUMENT, r"ValueError: draft probability \S+ of token 7 at position 3 is not in \(0, 1\]")
        for q in (0.0, -0.25, 1.5, math.nan, math.inf)
    },
    "dense: resolved token": (
        lambda t: [pb.EdgeMessage(hello=_hello(t)), _with_resolved(_draft(), 7)],
        grpc.StatusCode.INVALID_ARGUMENT, "ProtocolError: a resolved token is required after a split rejection, and only then"),
}

CASES = {
    "tokenizer mismatch": (lambda t: [pb.EdgeMessage(hello=_hello(t, tokenizer=pb.TokenizerFingerprint(num_tokens=64, sha256="0" * 64)))],
                           grpc.StatusCode.FAILED_PRECONDITION, "tokenizer mismatch"),
    "protocol version": (lambda t: [pb.EdgeMessage(hello=_hello(t, protocol_version=99))],
                         grpc.StatusCode.FAILED_PRECONDITION, "protocol version mismatch"),
    "vocab width": (lambda t: [pb.EdgeMessage(hello=_hello(t, vocab_size=65))], grpc.StatusCode.FAILED_PRECONDITION, "vocabulary width"),
    "unknown verify mode": (lambda t: [pb.EdgeMessage(hello=_hello(t, verify_mode="telepathy"))], grpc.StatusCode.UNIMPLEMENTED, "not offered"),
    "prompt id out of range": (lambda t: [pb.EdgeMessage(hello=_hello(t, prompt_ids=[3, 64]))], grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    "empty prompt": (lambda t: [pb.EdgeMessage(hello=_hello(t, prompt_ids=[]))], grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    "too many new tokens": (lambda t: [pb.EdgeMessage(hello=_hello(t, max_new_tokens=10**9))], grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    "bad sampling": (lambda t: [pb.EdgeMessage(hello=_hello(t, sampling=pb.SamplingParams(temperature=-1, top_p=1)))], grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    "draft before hello": (lambda t: [_draft()], grpc.StatusCode.INVALID_ARGUMENT, "must be a Hello"),
    "draft id out of range": (lambda t: [pb.EdgeMessage(hello=_hello(t)), _draft(ids=(99,))], grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    "wrong position": (lambda t: [pb.EdgeMessage(hello=_hello(t)), _draft(start=9)], grpc.StatusCode.INVALID_ARGUMENT, "committed length is 3"),
    "future epoch": (lambda t: [pb.EdgeMessage(hello=_hello(t)), _draft(epoch=5)], grpc.StatusCode.INVALID_ARGUMENT, "future epoch"),
    "oversized batch": (lambda t: [pb.EdgeMessage(hello=_hello(t)), _draft(ids=tuple(range(40)))], grpc.StatusCode.INVALID_ARGUMENT, "allowed 1..32"),
    "corrupt payload": (lambda t: [pb.EdgeMessage(hello=_hello(t)), pb.EdgeMessage(draft=pb.DraftBatch(start_pos=3, token_ids=[7], q_payload=b"\x01\x02garbage"))],
                        grpc.StatusCode.INVALID_ARGUMENT, "PayloadError"),
    "q rows do not sum to one": (lambda t: [pb.EdgeMessage(hello=_hello(t)), _draft(q=torch.full((1, 64), 0.5))], grpc.StatusCode.INVALID_ARGUMENT, r"outside \[0, 1\]|sum"),
    "hello twice": (lambda t: [pb.EdgeMessage(hello=_hello(t)), pb.EdgeMessage(hello=_hello(t))], grpc.StatusCode.INVALID_ARGUMENT, "unexpected hello"),
    **SPLIT_CASES,
}


async def _active_after_release(service, wait_s: float = 3.0) -> int:
    """Sessions still open once the server has had a moment to release finished ones: it lets a finished edge
    close its side of the stream before ending the call, so release lags the edge's last read slightly."""
    for _ in range(int(wait_s / 0.01)):
        if service.active_sessions == 0:
            break
        await asyncio.sleep(0.01)
    return service.active_sessions


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_is_clear_and_other_sessions_survive(tiny_target, tiny_draft, case):
    build, code, match = CASES[case]

    async def scenario():
        async with serving(tiny_target) as (service, addr):
            # a healthy session opened before the bad one, finished after it
            async with edge(addr, tiny_draft, max_new_tokens=6, ignore_eos=True) as client:
                gen = client.generate([3, 4, 5], mode="sync", draft_len=1)
                await gen.__anext__()
                replies, err = await _exchange(addr, build(tiny_target))
                tokens = await gen.collect()  # all committed ids, the first chunk included
            after = await _healthy(addr, tiny_target, tiny_draft)
            return tokens, replies, err, after, await _active_after_release(service)

    tokens, replies, err, after, active = run(scenario())
    assert err is not None, f"{case}: no error; replies {replies}"
    assert err.code() == code, (case, err.code(), err.details())

    assert re.search(match, err.details()), (case, err.details())
    assert len(tokens) == 6 and after == tokens  # greedy: the same tokens before and after
    assert active == 0


def test_split_exact_by_hand_follows_the_protocol(tiny_target, tiny_draft):
    """The control for the split cases: the same rejection, then a valid tail request and resolution, are served."""
    def resolve(replies):
        top, _ = _candidates(replies[:2])
        tail = replies[2].tail
        assert (tail.epoch, tail.position) == (1, 3)
        more, _ = decode_list(tail.payload, vocab_size=64, max_len=64)
        assert len(more) == 1 and int(more[0]) not in top  # a draw from outside the top-K
        return _split_draft(epoch=1, resolved=int(more[0]))  # a token from the requested draws is a candidate too

    async def scenario():
        async with serving(tiny_target) as (service, addr):
            steps = _rejected(tiny_target) + [_after_rejection(lambda c: _tail_request(have=1)), resolve]
            replies, err = await _exchange(addr, steps)
            return replies, err, await _healthy(addr, tiny_target, tiny_draft), await _active_after_release(service)

    replies, err, after, active = run(scenario())
    assert err is None, err
    assert [r.WhichOneof("kind") for r in replies] == ["ready", "verdict", "tail", "verdict"]
    v = replies[3].verdict
    # the verdict speaks of the drafts after the resolved token at 3
    assert (v.epoch, v.start_pos) == (1, 4) and v.committed_len >= 4 + v.accepted and not v.finished
    assert len(after) == 6 and active == 0


def test_malformed_bytes_are_refused_and_server_survives(tiny_target, tiny_draft):
    async def scenario():
        async with serving(tiny_target) as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                raw = ch.stream_stream("/picospec.v1.PicoSpec/Speculate", request_serializer=None, response_deserializer=None)
                call = raw(timeout=10)
                await call.write(b"\xff\xff\xff\xff not a protobuf")
                await call.done_writing()
                try:
                    async for _ in call:
                        pass
                    err = None
                except grpc.aio.AioRpcError as e:
                    err = e
            return err, await _healthy(addr, tiny_target, tiny_draft)

    err, after = run(scenario())
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed message" in err.details()
    assert len(after) == 6


def test_malformed_unary_requests_are_invalid_argument(tiny_target, tiny_draft):
    """Regression (found by `picospec-bench fuzz`): gRPC parses a unary request before the handler runs, and bytes
    that were not a protobuf ended Info and CloudGenerate UNKNOWN ("Unexpected DecodeError"), with a traceback in
    the server's log. Now both are INVALID_ARGUMENT "malformed message", like a malformed stream message."""
    async def scenario():
        async with serving(tiny_target) as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                errors = []
                for method, call_type in (("Info", ch.unary_unary), ("CloudGenerate", ch.unary_stream)):
                    call = call_type(f"/picospec.v1.PicoSpec/{method}")(b"\xff\xff\xff\xff not a protobuf", timeout=10)
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        if method == "Info":
                            await call
                        else:
                            async for _ in call:
                                pass
                    errors.append(e.value)
                info = await pb_grpc.PicoSpecStub(ch).Info(pb.InfoRequest(), timeout=10)  # a parsable one still works
            return errors, info, await _healthy(addr, tiny_target, tiny_draft)

    errors, info, after = run(scenario())
    for e in errors:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed message" in e.details(), e
    assert info.protocol_version == PROTOCOL_VERSION and len(after) == 6


def test_edge_vanishing_mid_stream_frees_the_session(tiny_target, tiny_draft):
    async def scenario():
        async with serving(tiny_target) as (service, addr):
            for _ in range(3):
                async with grpc.aio.insecure_channel(addr) as ch:
                    call = pb_grpc.PicoSpecStub(ch).Speculate()
                    await call.write(pb.EdgeMessage(hello=_hello(tiny_target)))
                    assert (await call.read()).WhichOneof("kind") == "ready"
                    call.cancel()  # the edge goes away without a word
            return await _active_after_release(service), await _healthy(addr, tiny_target, tiny_draft)

    active, after = run(scenario())
    assert active == 0 and len(after) == 6


def test_session_limit_is_enforced(tiny_target, tiny_draft):
    async def scenario():
        async with serving(tiny_target, max_sessions=1) as (_, addr):
            async with grpc.aio.insecure_channel(addr) as ch:
                call = pb_grpc.PicoSpecStub(ch).Speculate()
                await call.write(pb.EdgeMessage(hello=_hello(tiny_target)))
                await call.read()
                _, err = await _exchange(addr, [pb.EdgeMessage(hello=_hello(tiny_target))])
                call.cancel()
            return err

    err = run(scenario())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 1 sessions" in err.details()


def test_edge_client_reports_refusal_clearly(tiny_target, tiny_draft):
    async def scenario():
        async with serving(tiny_target) as (_, addr), edge(addr, tiny_draft, max_new_tokens=4) as client:
            client.fingerprint = type(client.fingerprint)(1, "f" * 64)
            with pytest.raises(EdgeError, match="tokenizer mismatch"):
                await client.generate([3, 4], mode="sync").collect()
            with pytest.raises(EdgeError, match="tokenizer mismatch"):
                await client.generate([3, 4], mode="cloud").collect()

    run(scenario())


def test_unreachable_cloud_is_a_clear_error(tiny_draft):
    async def scenario():
        async with edge("127.0.0.1:9", tiny_draft, max_new_tokens=4, wait_ready_s=1) as client:
            with pytest.raises(EdgeError, match="not reachable"):
                await client.generate([3, 4], mode="sync").collect()

    run(scenario())
