"""Handshake validation as a pure function: every refusal, with its status and message. No gRPC, no models."""
from __future__ import annotations

import grpc
import pytest

from picospec.cloud_server.handshake import Refusal, TargetInfo, validate_hello
from picospec.shared.config import CloudConfig
from picospec.shared.fingerprint import Fingerprint
from picospec.shared.protocol import PROTOCOL_VERSION
from picospec.shared.rpc import picospec_pb2 as pb

TARGET = TargetInfo(name="t", vocab_size=64, fingerprint=Fingerprint(60, "ab" * 32), eos_ids=frozenset({2}), num_layers=4)
LIMITS = CloudConfig(target="t", max_context=64, max_new_tokens=32, verify_modes="dense,coupled",
                     max_residual_top_k=16, max_tail_samples=8)


def hello(**over) -> pb.Hello:
    fields = dict(protocol_version=PROTOCOL_VERSION, tokenizer=pb.TokenizerFingerprint(num_tokens=60, sha256="ab" * 32),
                  vocab_size=64, sampling=pb.SamplingParams(temperature=0.0, top_p=1.0), verify_mode="dense",
                  prompt_ids=[3, 4, 5], max_new_tokens=8)
    fields.update(over)
    return pb.Hello(**fields)


def test_the_first_token_at_once_is_for_speculate_streams_only():
    assert validate_hello(hello(first_token=True), LIMITS, TARGET, speculative=True).first_token
    assert not validate_hello(hello(first_token=True), LIMITS, TARGET, speculative=False).first_token
    assert not validate_hello(hello(), LIMITS, TARGET, speculative=True).first_token


def test_an_acceptable_hello_becomes_a_session_spec():
    spec = validate_hello(hello(residual_top_k=0, decode_ahead=True), LIMITS, TARGET, speculative=True)
    assert spec.state.tokens == [3, 4, 5] and spec.state.eos_ids == {2} and spec.verify_mode == "dense"
    assert spec.residual_top_k == LIMITS.residual_top_k and spec.decode_ahead   # 0 = the server's default
    assert validate_hello(hello(ignore_eos=True), LIMITS, TARGET, speculative=True).state.eos_ids == frozenset()
    assert validate_hello(hello(eos_token_ids=[7]), LIMITS, TARGET, speculative=True).state.eos_ids == {7}
    cloud_only = validate_hello(hello(verify_mode="", vocab_size=1, decode_ahead=True), LIMITS, TARGET, speculative=False)
    assert cloud_only.verify_mode == "" and not cloud_only.decode_ahead  # neither mode nor width matter there


REFUSALS = {
    "protocol version": (dict(protocol_version=PROTOCOL_VERSION + 1), grpc.StatusCode.FAILED_PRECONDITION,
                         "protocol version mismatch"),
    "tokenizer": (dict(tokenizer=pb.TokenizerFingerprint(num_tokens=60, sha256="cd" * 32)),
                  grpc.StatusCode.FAILED_PRECONDITION, "tokenizer mismatch: .*draft and target must share a tokenizer"),
    "vocab width": (dict(vocab_size=65), grpc.StatusCode.FAILED_PRECONDITION, "vocabulary width mismatch"),
    "mode not offered": (dict(verify_mode="split-exact"), grpc.StatusCode.UNIMPLEMENTED,
                         "'split-exact' is not offered; this cloud offers dense, coupled"),
    "residual top-k": (dict(residual_top_k=17), grpc.StatusCode.INVALID_ARGUMENT, "residual_top_k <= 16"),
    "tail samples": (dict(tail_samples=9), grpc.StatusCode.INVALID_ARGUMENT, "tail_samples <= 8"),
    "exit layer": (dict(exit_layer=4, exit_threshold=0.5), grpc.StatusCode.INVALID_ARGUMENT, "exit layer in 1..3"),
    "exit threshold": (dict(exit_layer=2, exit_threshold=1.5), grpc.StatusCode.INVALID_ARGUMENT, "threshold in"),
    "temperature": (dict(sampling=pb.SamplingParams(temperature=-1.0, top_p=1.0)), grpc.StatusCode.INVALID_ARGUMENT,
                    "bad sampling settings"),
    # regression (picospec-bench fuzz): a denormal temperature made every row NaN and decode-ahead end UNKNOWN
    "denormal temperature": (dict(sampling=pb.SamplingParams(temperature=1.4e-45, top_p=1.0)),
                             grpc.StatusCode.INVALID_ARGUMENT, r"temperature must be 0 \(greedy\) or in \[0.0001, 100\]"),
    "top-p": (dict(sampling=pb.SamplingParams(temperature=1.0, top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT,
              "bad sampling settings"),
    "no tokens": (dict(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, r"max_new_tokens must be in 1..32"),
    "too many tokens": (dict(max_new_tokens=33), grpc.StatusCode.INVALID_ARGUMENT, r"max_new_tokens must be in 1..32"),
    "empty prompt": (dict(prompt_ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "or the prompt is empty"),
    "context": (dict(prompt_ids=[1] * 57), grpc.StatusCode.INVALID_ARGUMENT, "prompt of 57 tokens \\+ 8 new exceeds"),
    "prompt id": (dict(prompt_ids=[3, 64]), grpc.StatusCode.INVALID_ARGUMENT, "prompt holds token id 64 outside"),
    "eos id": (dict(eos_token_ids=[99]), grpc.StatusCode.INVALID_ARGUMENT, "eos_token_ids holds token id 99"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_every_refusal_says_what_to_change(case):
    over, code, message = REFUSALS[case]
    with pytest.raises(Refusal, match=message) as err:
        validate_hello(hello(**over), LIMITS, TARGET, speculative=True)
    assert err.value.code == code


def test_session_slots_refuse_past_the_limit_and_free_on_exit():
    import asyncio

    from picospec.cloud_server.slots import SessionSlots

    async def scenario():
        slots = SessionSlots(1)
        async with slots.hold():
            assert slots.active == 1
            with pytest.raises(Refusal, match="limit of 1 sessions") as err:
                async with slots.hold():
                    pass
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(RuntimeError):
            async with slots.hold():
                raise RuntimeError("a session failed")
        return slots.active

    assert asyncio.run(scenario()) == 0
