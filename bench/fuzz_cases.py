"""The hostile traffic of `picospec-bench fuzz` (bench/fuzz.py), as pure functions: (seed, case index, what the cloud
said in Info) -> one `Case`, a list of raw request messages for one call. No I/O, no gRPC: unit-tested on their own
(tests/test_fuzz.py), and any case of a run can be rebuilt from its seed and index alone.

Why raw bytes: a hostile peer is not bound by our stubs. Every message is serialized here (or is not a protobuf at
all) and sent through a generic channel with identity serializers, so the fuzzer can also send what protobuf's own
API refuses to build: negative numbers in unsigned fields, wrong wire types, truncated frames.

Kinds (each counted separately):
  random-bytes  random bytes as the request of Info or CloudGenerate, as a stream's first message, or after a Hello
  mutated       a valid session prefix (Hello, drafts continuing the chain blind) ending in one message with one
                field set hostile: every field of Hello, DraftBatch, TailRequest and Cancel, the q payload's header
                and body, and raw wire-level edits (negative varints, wrong wire types, bit flips, truncation)
  order         protocol-order violations: no Hello first, two Hellos, an empty stream, tail requests out of turn,
                a correction nobody asked for, and floods of messages after a Cancel or after the session finished
  oversized     a message just over the cloud's message limit, and large messages under it (long id lists, strings)
  zstd-bomb     small zstd frames that inflate to 64 MiB .. 1 GiB, in the q payload of dense and sparse kinds
  abandoned     a valid session cancelled by the fuzzer after some of its messages (or while a large one is being
                written, or after Ready); CloudGenerate cancelled before or after its first chunk
"""
from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass, field
from typing import Callable

import torch
import zstandard

from picospec.shared.codec import FLAG_ZSTD, HEADER_SIZE, VERSION, Kind, Precision, encode_probs
from picospec.shared.protocol import PROTOCOL_VERSION
from picospec.shared.rpc import picospec_pb2 as pb

KINDS = ("random-bytes", "mutated", "order", "oversized", "zstd-bomb", "abandoned")
KIND_WEIGHTS = (20.0, 42.0, 18.0, 0.4, 8.0, 11.6)  # oversized messages cost ~16 MiB each: a few hundred per 100k
RPCS = ("Speculate", "CloudGenerate", "Info")
U32 = (0, 1, 2**31 - 1, 2**31, 2**32 - 1)
U64 = (0, 1, 2**63 - 1, 2**63, 2**64 - 1)
HOSTILE_FLOATS = (math.nan, math.inf, -math.inf, -0.0, -1.0, 1e-45, 3.4e38, 1.0000001, 100.00001, 0.0, 2.0)
_HEADER = struct.Struct("<BBBBIII")
MiB = 1024 * 1024


@dataclass(frozen=True)
class CloudFacts:
    """What the cases are built for: the cloud's Info reply, and its message limit (known for our own cloud,
    assumed to be the default 16 MiB for another)."""

    vocab: int
    num_tokens: int
    sha256: str
    modes: tuple[str, ...]
    max_draft_len: int
    max_context: int
    max_new_tokens: int
    num_layers: int
    message_limit: int = 16 * MiB
    max_residual_top_k: int = 256  # the server's defaults; Info does not say
    max_tail_samples: int = 256

    @classmethod
    def from_info(cls, info: pb.InfoReply, message_limit: int = 16 * MiB) -> "CloudFacts":
        return cls(info.vocab_size, info.tokenizer.num_tokens, info.tokenizer.sha256, tuple(info.verify_modes),
                   info.max_draft_len, info.max_context, info.max_new_tokens, info.target_layers, message_limit)


@dataclass(frozen=True)
class Blobs:
    """Large inputs made once per run (seeded): random bytes past the message limit, and zstd bombs."""

    big: bytes
    bombs: tuple[tuple[int, bytes], ...]  # (inflated size, zstd frame)

    @classmethod
    def make(cls, facts: CloudFacts, seed: int, bomb_mib: tuple[int, ...] = (64, 1024)) -> "Blobs":
        big = random.Random(f"{seed}:big").randbytes(facts.message_limit + 8192)
        return cls(big, tuple((m * MiB, zstd_bomb(m * MiB, content_size=i % 2 == 0)) for i, m in enumerate(bomb_mib)))


def zstd_bomb(size: int, *, content_size: bool) -> bytes:
    """A zstd frame of `size` zero bytes (a few KiB for a GiB), with or without the size in its header."""
    chunk = bytes(MiB)
    c = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    obj = c.compressobj(size=size if content_size else -1)
    parts = [obj.compress(chunk) for _ in range(size // MiB)]
    return b"".join(parts) + obj.flush()


@dataclass
class Case:
    """One call: its RPC, its request messages (raw bytes), and how the fuzzer ends it."""

    index: int
    kind: str
    rpc: str
    messages: list[bytes]
    scheme: str = "-"              # the verify mode of the session it opens, "-" where none
    note: str = ""                 # which variant or field: the JSON's coverage table
    cancel_after: int | None = None  # abandoned: cancel after this many writes (None: finish writing)
    cancel_mid_write: bool = False   # abandoned: cancel while the last write is still going out
    cancel_after_replies: int | None = None  # abandoned: cancel once this many replies have arrived
    wait_at: tuple[int, int] | None = None  # (writes, replies): after that many writes, wait for that many replies

    @property
    def abandoned(self) -> bool:
        return self.cancel_after is not None or self.cancel_after_replies is not None


# ---- raw wire pieces ---------------------------------------------------------------------------------------------

def varint(n: int) -> bytes:
    """Protobuf base-128 varint of n as a 64-bit two's complement (a negative n takes 10 bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def raw_field(number: int, wire: int, payload: bytes) -> bytes:
    return varint(number << 3 | wire) + payload


def wrap(kind_field: int, inner: bytes) -> bytes:
    """An EdgeMessage whose oneof field `kind_field` (1 hello, 2 draft, 3 cancel, 4 tail_request) holds `inner`."""
    return raw_field(kind_field, 2, varint(len(inner)) + inner)


def edge(msg: pb.Hello | pb.DraftBatch | pb.TailRequest | pb.Cancel) -> bytes:
    name = {pb.Hello: "hello", pb.DraftBatch: "draft", pb.TailRequest: "tail_request", pb.Cancel: "cancel"}[type(msg)]
    return pb.EdgeMessage(**{name: msg}).SerializeToString()


# ---- valid pieces ------------------------------------------------------------------------------------------------

def valid_hello(rng: random.Random, facts: CloudFacts, scheme: str) -> pb.Hello:
    """A Hello the cloud accepts: short prompt, small budget (cheap sessions), greedy or T = 1."""
    new = rng.randint(1, min(8, facts.max_new_tokens))
    prompt = [rng.randrange(facts.vocab) for _ in range(rng.randint(1, max(1, min(12, facts.max_context - new))))]
    greedy = rng.random() < 0.5
    hello = pb.Hello(protocol_version=PROTOCOL_VERSION, vocab_size=facts.vocab, draft_model="fuzz",
                     tokenizer=pb.TokenizerFingerprint(num_tokens=facts.num_tokens, sha256=facts.sha256),
                     sampling=pb.SamplingParams(temperature=0.0 if greedy else 1.0, top_p=1.0, seed=rng.getrandbits(64)),
                     verify_mode=scheme, prompt_ids=prompt, max_new_tokens=new, ignore_eos=rng.random() < 0.5,
                     decode_ahead=rng.random() < 0.3)
    if scheme.startswith("split"):
        hello.residual_top_k, hello.tail_samples = rng.choice((0, 2, 10)), rng.choice((0, 1, 4))
    if facts.num_layers > 1 and rng.random() < 0.2:
        hello.exit_layer, hello.exit_threshold = rng.randint(1, facts.num_layers - 1), rng.random()
    return hello


def q_rows(rng: random.Random, ids: list[int], vocab: int) -> torch.Tensor:
    """Draft distributions the cloud accepts: one-hot at the draft (greedy) or a random row (float32, sums to 1)."""
    if rng.random() < 0.5:
        return torch.nn.functional.one_hot(torch.tensor(ids, dtype=torch.long), vocab).float()
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    rows = torch.rand(len(ids), vocab, generator=g, dtype=torch.float64)
    return (rows / rows.sum(-1, keepdim=True)).float()


def valid_draft(rng: random.Random, facts: CloudFacts, scheme: str, start: int, k: int, epoch: int = 0) -> pb.DraftBatch:
    ids = [rng.randrange(facts.vocab) for _ in range(k)]
    b = pb.DraftBatch(epoch=epoch, start_pos=start, token_ids=ids)
    if scheme == "dense" and k:
        b.q_payload = encode_probs(q_rows(rng, ids, facts.vocab), compress=rng.random() < 0.5)
    elif scheme.startswith("split"):
        b.draft_probs.extend(rng.uniform(0.01, 1.0) for _ in ids)
    return b


@dataclass
class Session:
    """A valid session opened blind: the Hello and drafts continuing one chain from the prompt (never waiting for a
    verdict: a rejection makes the later batches stale, which the cloud drops; that is legal too)."""

    scheme: str
    hello: pb.Hello
    drafts: list[pb.DraftBatch] = field(default_factory=list)

    @property
    def end(self) -> int:
        last = self.drafts[-1] if self.drafts else None
        return last.start_pos + len(last.token_ids) if last else len(self.hello.prompt_ids)

    @property
    def budget_end(self) -> int:
        return len(self.hello.prompt_ids) + self.hello.max_new_tokens

    def messages(self) -> list[bytes]:
        return [edge(self.hello)] + [edge(d) for d in self.drafts]


def open_session(rng: random.Random, facts: CloudFacts, scheme: str | None = None, drafts: int | None = None) -> Session:
    s = Session(scheme or rng.choice(facts.modes), pb.Hello())
    s.hello = valid_hello(rng, facts, s.scheme)
    for _ in range(rng.randint(0, 3) if drafts is None else drafts):
        room = min(facts.max_draft_len, s.budget_end - s.end)
        if room < 1:
            break
        s.drafts.append(valid_draft(rng, facts, s.scheme, s.end, rng.randint(1, room)))
    return s


# ---- hostile values ----------------------------------------------------------------------------------------------

def u32(rng: random.Random, *near: int) -> int:
    """An unsigned 32-bit value at an edge: the type's limits, or one off a limit the cloud enforces."""
    pool = list(U32) + [n + d for n in near for d in (-1, 0, 1) if 0 <= n + d < 2**32]
    return rng.choice(pool)


def u64(rng: random.Random, *near: int) -> int:
    return rng.choice(list(U64) + [n + d for n in near for d in (-1, 0, 1, 1000) if 0 <= n + d < 2**64])


def hostile_float(rng: random.Random) -> float:
    return rng.choice(HOSTILE_FLOATS) if rng.random() < 0.8 else rng.uniform(-10, 10)


def hostile_text(rng: random.Random, limit: int = 65536) -> str:
    n = rng.choice((0, 1, 64, 4096, limit))
    return "".join(chr(rng.choice((0, 0x41, 0xE9, 0x4E2D, 0x1F600, 0xFFFD))) for _ in range(n))


def hostile_ids(rng: random.Random, facts: CloudFacts, n_valid: int) -> list[int]:
    """A token id list that breaks one rule: an id out of the vocabulary, empty, or too long."""
    choice = rng.randrange(4)
    if choice == 0:
        ids = [rng.randrange(facts.vocab) for _ in range(max(1, n_valid))]
        ids[rng.randrange(len(ids))] = rng.choice((facts.vocab, facts.vocab + 1, 2**31, 2**32 - 1))
        return ids
    if choice == 1:
        return []
    length = rng.choice((facts.max_draft_len + 1, facts.max_context + 1, facts.max_context + 1, 100_000))
    pattern = [rng.randrange(facts.vocab) for _ in range(16)]  # repeated: long lists cost no time to make
    return (pattern * (length // 16 + 1))[:length]


# ---- field mutators: each sets one field of a valid message to a hostile value, in place ----------------------------

Mutator = Callable[[random.Random, CloudFacts, object], None]


def _set_ids(container, values: list[int]) -> None:
    del container[:]
    container.extend(values)


HELLO_MUTATORS: dict[str, Mutator] = {
    "protocol_version": lambda r, f, h: setattr(h, "protocol_version", u32(r, PROTOCOL_VERSION)),
    "tokenizer.num_tokens": lambda r, f, h: setattr(h.tokenizer, "num_tokens", u32(r, f.num_tokens)),
    "tokenizer.sha256": lambda r, f, h: setattr(h.tokenizer, "sha256", r.choice(("", f.sha256[:-1], f.sha256.upper(),
                                                                                  hostile_text(r)))),
    "vocab_size": lambda r, f, h: setattr(h, "vocab_size", u32(r, f.vocab)),
    "draft_model": lambda r, f, h: setattr(h, "draft_model", hostile_text(r)),
    "sampling.temperature": lambda r, f, h: setattr(h.sampling, "temperature", hostile_float(r)),
    "sampling.top_k": lambda r, f, h: setattr(h.sampling, "top_k", u32(r, 1 << 20, f.vocab)),
    "sampling.top_p": lambda r, f, h: setattr(h.sampling, "top_p", hostile_float(r)),
    "sampling.seed": lambda r, f, h: setattr(h.sampling, "seed", u64(r)),
    "verify_mode": lambda r, f, h: setattr(h, "verify_mode", r.choice(("", "DENSE", "dense ", "split", hostile_text(r)))),
    "prompt_ids": lambda r, f, h: _set_ids(h.prompt_ids, hostile_ids(r, f, len(h.prompt_ids))),
    "max_new_tokens": lambda r, f, h: setattr(h, "max_new_tokens", u32(r, f.max_new_tokens, f.max_context)),
    "eos_token_ids": lambda r, f, h: _set_ids(h.eos_token_ids, hostile_ids(r, f, 1)),
    "ignore_eos": lambda r, f, h: setattr(h, "ignore_eos", not h.ignore_eos),
    "residual_top_k": lambda r, f, h: setattr(h, "residual_top_k", u32(r, f.max_residual_top_k, f.vocab)),
    "tail_samples": lambda r, f, h: setattr(h, "tail_samples", u32(r, f.max_tail_samples)),
    "decode_ahead": lambda r, f, h: setattr(h, "decode_ahead", not h.decode_ahead),
    "exit_layer": lambda r, f, h: setattr(h, "exit_layer", u32(r, f.num_layers)),
    "exit_threshold": lambda r, f, h: (setattr(h, "exit_layer", max(1, f.num_layers - 1)),
                                       setattr(h, "exit_threshold", hostile_float(r))),
}


def _draft_probs(r: random.Random, f: CloudFacts, b: pb.DraftBatch) -> None:
    probs = [r.uniform(0.01, 1.0) for _ in b.token_ids] or [0.5]
    if r.random() < 0.5:
        probs[r.randrange(len(probs))] = hostile_float(r)
    else:
        probs = probs[:-1] if r.random() < 0.5 else probs + [0.5]  # one too few or too many
    _set_ids(b.draft_probs, probs)


DRAFT_MUTATORS: dict[str, Mutator] = {
    "epoch": lambda r, f, b: setattr(b, "epoch", u64(r, 1, 2)),
    "start_pos": lambda r, f, b: setattr(b, "start_pos", u32(r, b.start_pos, f.max_context)),
    "token_ids": lambda r, f, b: _set_ids(b.token_ids, hostile_ids(r, f, len(b.token_ids))),
    "draft_probs": _draft_probs,
    "q_payload": lambda r, f, b: setattr(b, "q_payload", mutate_payload(r, f, b)),
    "resolved_token": lambda r, f, b: setattr(b, "resolved_token", r.choice((r.randrange(f.vocab), f.vocab, 2**32 - 1))),
}

TAIL_MUTATORS: dict[str, Mutator] = {
    "tail.epoch": lambda r, f, t: setattr(t, "epoch", u64(r, 1)),
    "tail.position": lambda r, f, t: setattr(t, "position", u32(r, t.position, f.max_context)),
    "tail.have": lambda r, f, t: setattr(t, "have", u32(r, 4096, f.max_tail_samples)),
}


# ---- the codec payload: header fields, body, values --------------------------------------------------------------

def _header(payload: bytes, **fields: int) -> bytes:
    names = ("version", "kind", "precision", "flags", "rows", "vocab", "body_len")
    values = dict(zip(names, _HEADER.unpack_from(payload)))
    values.update(fields)
    return _HEADER.pack(*(values[n] for n in names)) + payload[HEADER_SIZE:]


def _poisoned_rows(r: random.Random, f: CloudFacts, k: int) -> bytes:
    """A well-formed payload whose values break a rule: NaN, negative, above 1, or rows not summing to 1."""
    rows = torch.full((k, f.vocab), 1.0 / f.vocab)
    bad = r.choice((math.nan, math.inf, -0.5, 1.5, 0.0))
    rows[r.randrange(k), r.randrange(f.vocab)] = bad
    if bad == 0.0:
        rows *= 0.5  # sums to 0.5
    body = rows.numpy().astype("<f4").tobytes()
    return _HEADER.pack(VERSION, Kind.DENSE, Precision.F32, 0, k, f.vocab, len(body)) + body


def _sparse_bad(r: random.Random, f: CloudFacts, k: int) -> bytes:
    """A SPARSE payload with repeated ids (a zero gap), an id past the vocabulary, or more entries than it has."""
    variant = r.randrange(3)
    nnz = f.vocab + 1 if variant == 2 else 2
    gaps = [0, 0] if variant == 0 else [f.vocab - 1, 5] if variant == 1 else [1] * nnz
    body = struct.pack(f"<{k}I", *([nnz] * k)) + struct.pack(f"<{nnz * k}I", *(gaps * k)) + \
        struct.pack(f"<{nnz * k}f", *([1.0 / nnz] * nnz * k))
    return _HEADER.pack(VERSION, Kind.SPARSE, Precision.F32, 0, k, f.vocab, len(body)) + body


def mutate_payload(r: random.Random, f: CloudFacts, b: pb.DraftBatch) -> bytes:
    """A hostile q payload for batch b: one header field, the body's bytes, or its values."""
    k = max(1, len(b.token_ids))
    good = b.q_payload or encode_probs(torch.full((k, f.vocab), 1.0 / f.vocab), compress=False)
    choice = r.randrange(12)
    if choice == 0:
        return _header(good, version=r.choice((0, 2, 255)))
    if choice == 1:
        return _header(good, kind=r.choice((0, Kind.LIST, 4, 255)))
    if choice == 2:
        return _header(good, precision=r.choice((0, Precision.F16, 3, 255)))
    if choice == 3:
        return _header(good, flags=r.choice((FLAG_ZSTD, 2, 0x80, 0xFF)))
    if choice == 4:
        return _header(good, rows=r.choice((0, k + 1, 257, 2**32 - 1)))
    if choice == 5:
        return _header(good, vocab=r.choice((0, f.vocab - 1, f.vocab + 1, 2**21 + 1, 2**32 - 1)))
    if choice == 6:
        body_len = _HEADER.unpack_from(good)[6]
        return _header(good, body_len=r.choice((0, body_len - 1, body_len + 1, 2**32 - 1)))
    if choice == 7:
        return good[: r.randrange(len(good))]  # truncated (the header itself, sometimes)
    if choice == 8:
        flipped = bytearray(good)
        for _ in range(r.randint(1, 8)):
            flipped[r.randrange(len(flipped))] ^= 1 << r.randrange(8)
        return bytes(flipped)
    if choice == 9:
        return _poisoned_rows(r, f, k)
    if choice == 10:
        return _sparse_bad(r, f, k)
    return _header(good, flags=FLAG_ZSTD) if r.random() < 0.5 else good + r.randbytes(r.randint(1, 64))


# ---- raw wire edits of a serialized EdgeMessage ------------------------------------------------------------------

HELLO_VARINT_FIELDS = (1, 3, 8, 10, 11, 12, 13, 14)  # protocol_version .. exit_layer; 7 and 9 are packed id lists
DRAFT_VARINT_FIELDS = (1, 2, 3, 6)                    # epoch, start_pos, a token id (unpacked), resolved_token


def raw_edit(r: random.Random, s: Session, message: bytes) -> tuple[str, bytes]:
    """A wire-level edit protobuf's API would not make: a negative (10-byte) varint in an unsigned field, a known
    field with the wrong wire type, an unknown field, bit flips, or a truncated message."""
    choice = r.randrange(5)
    if choice == 0:
        hello_side = not s.drafts or r.random() < 0.5
        inner = s.hello.SerializeToString() if hello_side else s.drafts[-1].SerializeToString()
        number = r.choice(HELLO_VARINT_FIELDS if hello_side else DRAFT_VARINT_FIELDS)
        return "raw.negative_varint", wrap(1 if hello_side else 2, inner + raw_field(number, 0, varint(-r.randint(1, 2**40))))
    if choice == 1:
        return "raw.wrong_wire_type", message + raw_field(r.choice((1, 2, 3, 4)), r.choice((1, 3, 4, 5, 6, 7)), b"\x00" * 8)
    if choice == 2:
        return "raw.unknown_field", message + raw_field(r.randint(5, 2**29 - 1), 2, varint(16) + r.randbytes(16))
    if choice == 3:
        flipped = bytearray(message)
        for _ in range(r.randint(1, 4)):
            flipped[r.randrange(len(flipped))] ^= 1 << r.randrange(8)
        return "raw.bit_flips", bytes(flipped)
    return "raw.truncated", message[: r.randrange(max(1, len(message)))]


# ---- the kinds -----------------------------------------------------------------------------------------------------

def _mutated_speculate(r: random.Random, f: CloudFacts) -> Case:
    s = open_session(r, f)
    target = r.choices(("hello", "draft", "tail", "cancel", "raw"), weights=(30, 45, 8, 3, 14))[0]
    if target == "hello":
        name, mutate = r.choice(list(HELLO_MUTATORS.items()))
        mutate(r, f, s.hello)
        return Case(0, "", "Speculate", [edge(s.hello)], s.scheme, f"hello.{name}")
    if target == "draft":
        name, mutate = r.choice(list(DRAFT_MUTATORS.items()))
        b = valid_draft(r, f, s.scheme, s.end, max(1, min(r.randint(1, 4), s.budget_end - s.end)))
        mutate(r, f, b)
        return Case(0, "", "Speculate", s.messages() + [edge(b)], s.scheme, f"draft.{name}")
    if target == "tail":
        name, mutate = r.choice(list(TAIL_MUTATORS.items()))
        t = pb.TailRequest(epoch=0, position=s.end, have=0)
        mutate(r, f, t)
        return Case(0, "", "Speculate", s.messages() + [edge(t)], s.scheme, name)
    if target == "cancel":
        return Case(0, "", "Speculate", s.messages() + [edge(pb.Cancel(reason=hostile_text(r)))], s.scheme, "cancel.reason")
    msgs = s.messages()
    name, last = raw_edit(r, s, msgs[-1])
    return Case(0, "", "Speculate", msgs[:-1] + [last], s.scheme, name)


def build_mutated(r: random.Random, f: CloudFacts, blobs: Blobs) -> Case:
    rpc = r.choices(RPCS, weights=(80, 15, 5))[0]
    if rpc == "Speculate":
        return _mutated_speculate(r, f)
    if rpc == "Info":  # InfoRequest has no fields: unknown ones must be skipped, broken ones refused
        junk = raw_field(r.randint(1, 99), r.choice((0, 2, 3, 7)), varint(r.getrandbits(32)))
        return Case(0, "", "Info", [junk], note="info.fields")
    hello = valid_hello(r, f, "")
    name, mutate = r.choice(list(HELLO_MUTATORS.items()))
    mutate(r, f, hello)
    return Case(0, "", "CloudGenerate", [hello.SerializeToString()], note=f"hello.{name}")


def _noise(r: random.Random) -> bytes:
    return r.randbytes(r.randint(0, r.choice((1, 8, 64, 512, 4096))))


def build_random_bytes(r: random.Random, f: CloudFacts, blobs: Blobs) -> Case:
    rpc = r.choices(RPCS, weights=(50, 25, 25))[0]
    if rpc != "Speculate":
        return Case(0, "", rpc, [_noise(r)], note=f"{rpc}.request")
    if r.random() < 0.5:
        return Case(0, "", rpc, [_noise(r)], note="first message")
    s = open_session(r, f)
    return Case(0, "", rpc, s.messages() + [_noise(r)], s.scheme, "after a session's messages")


def _flood(r: random.Random, f: CloudFacts, s: Session, n: int) -> list[bytes]:
    """Hostile drafts for a session that has ended: the cloud must drop each unread, whatever it holds."""
    out = []
    for _ in range(n):
        b = valid_draft(r, f, s.scheme, s.end, 1) if r.random() < 0.5 else pb.DraftBatch(start_pos=s.end, token_ids=[0])
        name, mutate = r.choice(list(DRAFT_MUTATORS.items()))
        mutate(r, f, b)
        out.append(edge(b))
    return out


def build_order(r: random.Random, f: CloudFacts, blobs: Blobs) -> Case:
    s = open_session(r, f)
    sc = s.scheme
    variant = r.choice(("draft first", "tail first", "cancel first", "empty first", "no messages", "two hellos",
                        "empty mid-stream", "tail out of turn", "tail future epoch", "correction unasked",
                        "after cancel", "after finish", "after finish", "after finish"))
    first = {"draft first": lambda: [edge(valid_draft(r, f, sc, s.end, 1))],
             "tail first": lambda: [edge(pb.TailRequest(position=s.end))],
             "cancel first": lambda: [edge(pb.Cancel(reason="fuzz"))],
             "empty first": lambda: [b""], "no messages": lambda: []}
    if variant in first:
        return Case(0, "", "Speculate", first[variant](), sc, variant)
    msgs = s.messages()
    tail = {"two hellos": lambda: [edge(valid_hello(r, f, sc))],
            "empty mid-stream": lambda: [b""],
            "tail out of turn": lambda: [edge(pb.TailRequest(epoch=0, position=s.end, have=0))],
            "tail future epoch": lambda: [edge(pb.TailRequest(epoch=r.randint(1, 9), position=s.end))],
            "correction unasked": lambda: [edge(pb.DraftBatch(start_pos=s.end, resolved_token=r.randrange(f.vocab)))],
            "after cancel": lambda: [edge(pb.Cancel(reason="fuzz"))] + _flood(r, f, s, r.randint(1, 20))}
    if variant in tail:
        return Case(0, "", "Speculate", msgs + tail[variant](), sc, variant)
    # after finish: a one-token budget and one draft, so the first verdict ends the session; then a flood the cloud
    # must drop (it waits for the edge to close its side, up to DRAIN_S)
    s.hello.max_new_tokens = 1
    s.drafts = [valid_draft(r, f, sc, len(s.hello.prompt_ids), 1)]
    return Case(0, "", "Speculate", s.messages() + _flood(r, f, s, r.randint(20, 200)), sc, variant, wait_at=(2, 2))


def build_oversized(r: random.Random, f: CloudFacts, blobs: Blobs) -> Case:
    if r.random() < 0.5:  # past the transport's limit: gRPC itself refuses it
        rpc = r.choice(RPCS)
        size = f.message_limit + r.randint(1, 4096)
        if rpc != "Speculate":
            return Case(0, "", rpc, [blobs.big[:size]], note="over the message limit")
        s = open_session(r, f, drafts=0)
        big = wrap(2, pb.DraftBatch(start_pos=s.end, token_ids=[0]).SerializeToString() +
                   raw_field(5, 2, varint(size) + blobs.big[:size]))
        return Case(0, "", rpc, [edge(s.hello), big], s.scheme, "over the message limit")
    s = open_session(r, f, drafts=0)
    n = r.choice((100_000, 1_000_000))
    variant = r.choice(("prompt_ids", "token_ids", "draft_model", "q_payload", "cloud prompt_ids"))
    if variant in ("prompt_ids", "cloud prompt_ids"):
        _set_ids(s.hello.prompt_ids, [r.randrange(f.vocab)] * n)
        rpc, msgs = ("CloudGenerate", [s.hello.SerializeToString()]) if variant.startswith("cloud") else \
            ("Speculate", [edge(s.hello)])
        return Case(0, "", rpc, msgs, s.scheme, f"large {variant}")
    if variant == "draft_model":
        s.hello.draft_model = "x" * n
        return Case(0, "", "Speculate", [edge(s.hello)], s.scheme, "large draft_model")
    b = pb.DraftBatch(start_pos=s.end, token_ids=[0] * (n if variant == "token_ids" else 1))
    if variant == "q_payload":
        b.q_payload = blobs.big[: n * 4]
    return Case(0, "", "Speculate", s.messages() + [edge(b)], s.scheme, f"large {variant}")


def build_bomb(r: random.Random, f: CloudFacts, blobs: Blobs) -> Case:
    s = open_session(r, f, scheme="dense" if "dense" in f.modes and r.random() < 0.85 else None)
    inflated, frame = r.choice(blobs.bombs)
    k = max(1, min(r.randint(1, 4), s.budget_end - s.end))
    kind = r.choice((Kind.DENSE, Kind.SPARSE))
    exact = k * f.vocab * 4 if kind is Kind.DENSE else k * (4 + f.vocab * 8)
    body_len = r.choice((exact, exact, 2**32 - 1, 16))
    b = pb.DraftBatch(start_pos=s.end, token_ids=[r.randrange(f.vocab) for _ in range(k)],
                      q_payload=_HEADER.pack(VERSION, kind, Precision.F32, FLAG_ZSTD, k, f.vocab, body_len) + frame)
    if s.scheme.startswith("split"):
        b.draft_probs.extend([0.5] * k)
    return Case(0, "", "Speculate", s.messages() + [edge(b)], s.scheme, f"{inflated // MiB} MiB {kind.name.lower()}")


def build_abandoned(r: random.Random, f: CloudFacts, blobs: Blobs) -> Case:
    if r.random() < 0.2:
        hello = valid_hello(r, f, "")
        replies = r.choice((0, 1, 2))
        case = Case(0, "", "CloudGenerate", [hello.SerializeToString()], note=f"CloudGenerate after {replies} chunks")
        case.cancel_after_replies = replies
        return case
    s = open_session(r, f, drafts=r.randint(0, 4))
    msgs = s.messages()
    variant = r.choice(("after some writes", "mid-write", "after Ready"))
    case = Case(0, "", "Speculate", msgs, s.scheme, variant)
    if variant == "after some writes":
        case.cancel_after = r.randint(0, len(msgs))
    elif variant == "mid-write":  # a large message (within the limit) still going out when the call is cancelled
        big = pb.DraftBatch(start_pos=s.end, token_ids=[0], q_payload=blobs.big[: r.randint(128, 2048) * 1024])
        case.messages = msgs + [edge(big)]
        case.cancel_after, case.cancel_mid_write = len(case.messages), True
    else:
        case.cancel_after_replies = 1
    return case


BUILDERS: dict[str, Callable[[random.Random, CloudFacts, Blobs], Case]] = {
    "random-bytes": build_random_bytes, "mutated": build_mutated, "order": build_order,
    "oversized": build_oversized, "zstd-bomb": build_bomb, "abandoned": build_abandoned,
}


def build_case(seed: int, index: int, facts: CloudFacts, blobs: Blobs) -> Case:
    """Case `index` of the run with `seed`: a pure function of them (and the cloud's facts), whatever ran before."""
    r = random.Random(f"{seed}:{index}")
    kind = r.choices(KINDS, weights=KIND_WEIGHTS)[0]
    case = BUILDERS[kind](r, facts, blobs)
    case.index, case.kind = index, kind
    return case
