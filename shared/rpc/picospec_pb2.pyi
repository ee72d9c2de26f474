from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenizerFingerprint(_message.Message):
    __slots__ = ("num_tokens", "sha256")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    sha256: str
    def __init__(self, num_tokens: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("protocol_version", "target_model", "vocab_size", "tokenizer", "verify_modes", "max_draft_len", "max_context", "max_new_tokens", "eos_token_ids", "device", "target_layers", "default_exit_layer")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MODES_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    target_model: str
    vocab_size: int
    tokenizer: TokenizerFingerprint
    verify_modes: _containers.RepeatedScalarFieldContainer[str]
    max_draft_len: int
    max_context: int
    max_new_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    device: str
    target_layers: int
    default_exit_layer: int
    def __init__(self, protocol_version: _Optional[int] = ..., target_model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer: _Optional[_Union[TokenizerFingerprint, _Mapping]] = ..., verify_modes: _Optional[_Iterable[str]] = ..., max_draft_len: _Optional[int] = ..., max_context: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ..., target_layers: _Optional[int] = ..., default_exit_layer: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "tokenizer", "vocab_size", "draft_model", "sampling", "verify_mode", "prompt_ids", "max_new_tokens", "eos_token_ids", "ignore_eos", "residual_top_k", "tail_samples", "decode_ahead", "exit_layer", "exit_threshold", "first_token")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_TOP_K_FIELD_NUMBER: _ClassVar[int]
    TAIL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DECODE_AHEAD_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    EXIT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    tokenizer: TokenizerFingerprint
    vocab_size: int
    draft_model: str
    sampling: SamplingParams
    verify_mode: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    residual_top_k: int
    tail_samples: int
    decode_ahead: bool
    exit_layer: int
    exit_threshold: float
    first_token: bool
    def __init__(self, protocol_version: _Optional[int] = ..., tokenizer: _Optional[_Union[TokenizerFingerprint, _Mapping]] = ..., vocab_size: _Optional[int] = ..., draft_model: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., verify_mode: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., residual_top_k: _Optional[int] = ..., tail_samples: _Optional[int] = ..., decode_ahead: _Optional[bool] = ..., exit_layer: _Optional[int] = ..., exit_threshold: _Optional[float] = ..., first_token: _Optional[bool] = ...) -> None: ...

class DraftBatch(_message.Message):
    __slots__ = ("epoch", "start_pos", "token_ids", "draft_probs", "q_payload", "resolved_token", "next_batch_in_s", "parent_index")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    Q_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_BATCH_IN_S_FIELD_NUMBER: _ClassVar[int]
    PARENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    start_pos: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: _containers.RepeatedScalarFieldContainer[float]
    q_payload: bytes
    resolved_token: int
    next_batch_in_s: float
    parent_index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, epoch: _Optional[int] = ..., start_pos: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Iterable[float]] = ..., q_payload: _Optional[bytes] = ..., resolved_token: _Optional[int] = ..., next_batch_in_s: _Optional[float] = ..., parent_index: _Optional[_Iterable[int]] = ...) -> None: ...

class TailRequest(_message.Message):
    __slots__ = ("epoch", "position", "have")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HAVE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    position: int
    have: int
    def __init__(self, epoch: _Optional[int] = ..., position: _Optional[int] = ..., have: _Optional[int] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("hello", "draft", "cancel", "tail_request")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    TAIL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    draft: DraftBatch
    cancel: Cancel
    tail_request: TailRequest
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., draft: _Optional[_Union[DraftBatch, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., tail_request: _Optional[_Union[TailRequest, _Mapping]] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("session_id", "target_model", "prompt_len", "prefill_s", "eos_token_ids", "first_token", "pass_s")
    class PassSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PASS_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    target_model: str
    prompt_len: int
    prefill_s: float
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token: int
    pass_s: _containers.ScalarMap[int, float]
    def __init__(self, session_id: _Optional[str] = ..., target_model: _Optional[str] = ..., prompt_len: _Optional[int] = ..., prefill_s: _Optional[float] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., first_token: _Optional[int] = ..., pass_s: _Optional[_Mapping[int, float]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("epoch", "start_pos", "accepted", "token", "committed_len", "next_epoch", "finished", "finish_reason", "verify_s", "residual_payload", "tail_mass", "tail_payload", "rejected", "verified", "idle_s", "waited_s", "path", "decode_step_s", "others_load", "capped")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    VERIFY_S_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TAIL_MASS_FIELD_NUMBER: _ClassVar[int]
    TAIL_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    WAITED_S_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_S_FIELD_NUMBER: _ClassVar[int]
    OTHERS_LOAD_FIELD_NUMBER: _ClassVar[int]
    CAPPED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    start_pos: int
    accepted: int
    token: int
    committed_len: int
    next_epoch: int
    finished: bool
    finish_reason: str
    verify_s: float
    residual_payload: bytes
    tail_mass: float
    tail_payload: bytes
    rejected: bool
    verified: int
    idle_s: float
    waited_s: float
    path: _containers.RepeatedScalarFieldContainer[int]
    decode_step_s: float
    others_load: float
    capped: int
    def __init__(self, epoch: _Optional[int] = ..., start_pos: _Optional[int] = ..., accepted: _Optional[int] = ..., token: _Optional[int] = ..., committed_len: _Optional[int] = ..., next_epoch: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., verify_s: _Optional[float] = ..., residual_payload: _Optional[bytes] = ..., tail_mass: _Optional[float] = ..., tail_payload: _Optional[bytes] = ..., rejected: _Optional[bool] = ..., verified: _Optional[int] = ..., idle_s: _Optional[float] = ..., waited_s: _Optional[float] = ..., path: _Optional[_Iterable[int]] = ..., decode_step_s: _Optional[float] = ..., others_load: _Optional[float] = ..., capped: _Optional[int] = ...) -> None: ...

class Hint(_message.Message):
    __slots__ = ("epoch", "start_pos", "verified", "expected_accepted", "expected_token", "confidence")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    start_pos: int
    verified: int
    expected_accepted: int
    expected_token: int
    confidence: float
    def __init__(self, epoch: _Optional[int] = ..., start_pos: _Optional[int] = ..., verified: _Optional[int] = ..., expected_accepted: _Optional[int] = ..., expected_token: _Optional[int] = ..., confidence: _Optional[float] = ...) -> None: ...

class TailSamples(_message.Message):
    __slots__ = ("epoch", "position", "payload")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    position: int
    payload: bytes
    def __init__(self, epoch: _Optional[int] = ..., position: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("ready", "verdict", "tail", "hint")
    READY_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    ready: Ready
    verdict: Verdict
    tail: TailSamples
    hint: Hint
    def __init__(self, ready: _Optional[_Union[Ready, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., tail: _Optional[_Union[TailSamples, _Mapping]] = ..., hint: _Optional[_Union[Hint, _Mapping]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "committed_len", "finished", "finish_reason", "decode_s", "prefill_s")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    committed_len: int
    finished: bool
    finish_reason: str
    decode_s: float
    prefill_s: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., committed_len: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., decode_s: _Optional[float] = ..., prefill_s: _Optional[float] = ...) -> None: ...
