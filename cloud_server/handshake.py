"""The handshake as a pure function: a Hello, the server's limits and its target -> a session spec, or a refusal
with the gRPC status to refuse it with. No I/O, no models: unit-tested on its own (tests/test_handshake.py)."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from picospec.shared.config import CloudConfig
from picospec.shared.fingerprint import Fingerprint
from picospec.shared.protocol import PROTOCOL_VERSION, ProtocolError, SessionState
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.sampling import SamplingParams


class Refusal(Exception):
    """A request we refuse, with the gRPC status to refuse it with; `retry_after_s`: when trying again may succeed
    (sent as the call's `retry-after-ms` trailing metadata); `reason`: a short label for the metrics
    (cloud_server/metrics.py: limit, per-client, draining, shutdown), empty for the handshake's own refusals."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s
        self.reason = reason


@dataclass(frozen=True)
class TargetInfo:
    """What the handshake needs to know of the target model."""

    name: str
    vocab_size: int          # width of its logits
    fingerprint: Fingerprint  # of its tokenizer
    eos_ids: frozenset[int]
    num_layers: int
    early_exits: bool = True  # the engine can give tentative logits mid-pass (torch's can; llama.cpp's cannot)


@dataclass(frozen=True)
class SessionSpec:
    """An accepted Hello: everything a session is built from."""

    state: SessionState
    params: SamplingParams
    verify_mode: str         # "" for CloudGenerate
    residual_top_k: int
    tail_samples: int
    exit_layer: int          # 0 = no early-exit hints
    exit_threshold: float
    decode_ahead: bool
    first_token: bool        # decode the first token with the prefill and send it in Ready


def validate_hello(hello: pb.Hello, limits: CloudConfig, target: TargetInfo, *, speculative: bool) -> SessionSpec:
    """Check a Hello against the protocol, the target and the limits; every refusal says what to change."""
    _check_compatible(hello, limits, target, speculative=speculative)
    _check_options(hello, limits, target)
    try:
        s = hello.sampling
        params = SamplingParams(s.temperature, s.top_k, s.top_p, s.seed)
    except ValueError as e:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"bad sampling settings: {e}") from None
    if not 1 <= hello.max_new_tokens <= limits.max_new_tokens:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens must be in 1..{limits.max_new_tokens}")
    if not 1 <= len(hello.prompt_ids) <= limits.max_context - hello.max_new_tokens:
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"prompt of {len(hello.prompt_ids)} tokens + {hello.max_new_tokens} new exceeds the context "
            f"limit of {limits.max_context} (or the prompt is empty)",
        )
    eos = frozenset() if hello.ignore_eos else (frozenset(hello.eos_token_ids) or target.eos_ids)
    try:
        state = SessionState(list(hello.prompt_ids), hello.max_new_tokens, eos, target.vocab_size)
        state.check_ids(sorted(eos), "eos_token_ids")
    except ProtocolError as e:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    return SessionSpec(state, params, hello.verify_mode if speculative else "",
                       hello.residual_top_k or limits.residual_top_k, hello.tail_samples or limits.tail_samples,
                       hello.exit_layer, hello.exit_threshold, hello.decode_ahead and speculative,
                       hello.first_token and speculative)


def _check_compatible(hello: pb.Hello, limits: CloudConfig, target: TargetInfo, *, speculative: bool) -> None:
    """Protocol version, tokenizer, vocabulary width and verification mode: the peers must match."""
    if hello.protocol_version != PROTOCOL_VERSION:
        raise Refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"protocol version mismatch: edge speaks {hello.protocol_version}, cloud speaks {PROTOCOL_VERSION}",
        )
    edge_fp = Fingerprint(hello.tokenizer.num_tokens, hello.tokenizer.sha256)
    if edge_fp != target.fingerprint:
        raise Refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"tokenizer mismatch: edge has {edge_fp.short()}, cloud target {target.name!r} has "
            f"{target.fingerprint.short()}; draft and target must share a tokenizer",
        )
    if speculative and hello.vocab_size != target.vocab_size:
        raise Refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"vocabulary width mismatch: draft logits have {hello.vocab_size} entries, target {target.vocab_size}",
        )
    if speculative and hello.verify_mode not in limits.offered_modes:
        raise Refusal(
            grpc.StatusCode.UNIMPLEMENTED,
            f"verify mode {hello.verify_mode!r} is not offered; this cloud offers {', '.join(limits.offered_modes)}",
        )


def _check_options(hello: pb.Hello, limits: CloudConfig, target: TargetInfo) -> None:
    """Residual sizes and early-exit settings within the server's bounds."""
    if hello.residual_top_k > limits.max_residual_top_k or hello.tail_samples > limits.max_tail_samples:
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"residual_top_k <= {limits.max_residual_top_k} and tail_samples <= {limits.max_tail_samples} required",
        )
    if hello.exit_layer and not target.early_exits:
        raise Refusal(grpc.StatusCode.UNIMPLEMENTED, "early-exit hints need a torch engine on the cloud (--engine hf or "
                                                     "static); this cloud runs llama.cpp")
    if hello.exit_layer and not (1 <= hello.exit_layer < target.num_layers and 0.0 <= hello.exit_threshold <= 1.0):
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"early exit needs an exit layer in 1..{target.num_layers - 1} (got {hello.exit_layer}) and a threshold "
            f"in [0, 1] (got {hello.exit_threshold})",
        )
