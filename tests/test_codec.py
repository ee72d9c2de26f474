"""Distribution payload codec: round trips and hostile input."""
import struct
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from picospec.shared import codec
from picospec.shared.codec import (
    FLAG_ZSTD,
    HEADER_SIZE,
    MAX_LIST,
    Kind,
    PayloadError,
    Precision,
    decode_list,
    decode_probs,
    encode_list,
    encode_probs,
)

pytestmark = pytest.mark.parallel  # make test runs these two at a time (pyproject.toml: markers)

HDR = struct.Struct("<BBBBIII")


def _dist(rows, vocab, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(rows, vocab)
    for r in range(rows):
        ids = torch.randperm(vocab, generator=g)[:nnz]
        out[r, ids] = torch.rand(nnz, generator=g) + 1e-3
    return out / out.sum(-1, keepdim=True)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 3000), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31), compress=st.booleans())
def test_round_trip_is_exact_in_f32(rows, vocab, frac, seed, compress):
    probs = _dist(rows, vocab, max(1, int(frac * vocab)), seed)
    data = encode_probs(probs, compress=compress)
    back = decode_probs(data, vocab_size=vocab, max_rows=rows, max_sum_error=1e-3)
    assert np.array_equal(back, probs.numpy())


def test_sparse_form_is_chosen_for_one_hot_and_is_tiny():
    probs = torch.nn.functional.one_hot(torch.tensor([5, 151000]), 151936).float()
    data = encode_probs(probs, compress=False)
    assert data[1] == Kind.SPARSE and len(data) == HEADER_SIZE + 2 * 12
    dense = encode_probs(torch.full((1, 1000), 1e-3), compress=False)
    assert dense[1] == Kind.DENSE


def test_f16_is_lossy_but_close():
    probs = _dist(2, 500, 500, 0)
    back = decode_probs(encode_probs(probs, precision=Precision.F16), vocab_size=500, max_rows=2)
    assert np.allclose(back, probs.numpy(), atol=1e-3)


def _payload(kind, rows, vocab, body, precision=1, flags=0, body_len=None, version=1):
    return HDR.pack(version, kind, precision, flags, rows, vocab, len(body) if body_len is None else body_len) + body


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x01\x01", "shorter than"),
        (_payload(1, 1, 4, np.full(4, 0.25, "<f4").tobytes(), version=9), "version"),
        (_payload(7, 1, 4, b""), "kind"),
        (_payload(1, 1, 4, np.full(4, 0.25, "<f4").tobytes(), flags=4), "flags"),
        (_payload(1, 1, 5, np.full(5, 0.2, "<f4").tobytes()), "vocabulary"),
        (_payload(1, 0, 4, b""), "rows"),
        (_payload(1, 9, 4, np.full(36, 0.25, "<f4").tobytes()), "rows"),
        (_payload(1, 1, 4, np.full(3, 0.25, "<f4").tobytes()), "dense body length 12 != 16"),
        (_payload(1, 1, 4, np.full(4, 0.25, "<f4").tobytes()[:-2], body_len=16), "body is 14 bytes"),
        (_payload(1, 1, 4, np.array([np.nan, 0.5, 0.25, 0.25], "<f4").tobytes()), "NaN"),
        (_payload(1, 1, 4, np.array([np.inf, 0, 0, 0], "<f4").tobytes()), "NaN or infinite"),
        (_payload(1, 1, 4, np.array([-0.5, 1.5, 0, 0], "<f4").tobytes()), r"outside \[0, 1\]"),
        (_payload(1, 1, 4, np.array([0.5, 0.1, 0, 0], "<f4").tobytes()), "sum"),
        # sparse: ids 1 then gap 0 (repeat) -> not increasing
        (_payload(2, 1, 4, np.array([2], "<u4").tobytes() + np.array([1, 0], "<u4").tobytes() + np.array([0.5, 0.5], "<f4").tobytes()), "strictly increasing"),
        (_payload(2, 1, 4, np.array([1], "<u4").tobytes() + np.array([4], "<u4").tobytes() + np.array([1.0], "<f4").tobytes()), "out of range"),
        (_payload(2, 1, 4, np.array([5], "<u4").tobytes() + b"\0" * 28), "more entries"),
        (_payload(2, 2, 4, np.array([1], "<u4").tobytes()), "too short for its row counts"),
        (_payload(2, 1, 4, np.array([2], "<u4").tobytes() + np.array([1], "<u4").tobytes() + np.array([1.0], "<f4").tobytes()), "does not match"),
        (_payload(1, 1, 4, b"\x28\xb5\x2f\xfdgarbage", flags=1, body_len=16), "corrupt zstd"),
    ],
)
def test_hostile_payloads_get_clear_errors(data, match):
    with pytest.raises(PayloadError, match=match):
        decode_probs(data, vocab_size=4, max_rows=8, max_sum_error=1e-3)


def test_zstd_bomb_is_stopped_at_the_declared_size():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))  # 64 MiB of zeros, ~2 KB compressed
    data = _payload(1, 1, 4, bomb, flags=1, body_len=16)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="decompressed body is over"):
            decode_probs(data, vocab_size=4, max_rows=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the error alone is not enough: reading the whole 64 MiB and then comparing sizes raises it too
    assert peak < 1 << 20, f"decoding a 16-byte body allocated {peak} bytes: the bomb was inflated"


def test_declared_size_over_bound_is_refused_before_decompression():
    data = _payload(2, 1, 4, b"", body_len=10**9)
    with pytest.raises(PayloadError, match="exceeds the bound"):
        decode_probs(data, vocab_size=4, max_rows=1)


# ---- LIST payloads: ordered (id, value) sequences ----------------------------------------------------

@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    vocab=st.integers(1, 5000),
    pairs=st.lists(st.tuples(st.integers(0, 2**21), st.floats(0.0, 1.0, exclude_min=True, width=32)), max_size=300),
    compress=st.booleans(),
)
@example(vocab=10, pairs=[(5, 0.5), (1, 0.25), (5, 0.5), (3, 1.0), (1, 0.25)], compress=False)
def test_list_round_trip_keeps_order_and_repeats_exactly(vocab, pairs, compress):
    ids = torch.tensor([i % vocab for i, _ in pairs], dtype=torch.int64)
    vals = torch.tensor([v for _, v in pairs], dtype=torch.float32)
    data = encode_list(ids, vals, vocab, compress=compress)
    assert data[1] == Kind.LIST and (data[3] & FLAG_ZSTD == 0 or compress)
    back_ids, back_vals = decode_list(data, vocab_size=vocab, max_len=len(pairs))
    assert back_ids.dtype == np.int64 and back_vals.dtype == np.float32
    assert back_ids.tolist() == ids.tolist()  # same order, repeats kept: no sorting, no dedup
    assert np.array_equal(back_vals, vals.numpy())       # f32 is exact


# ---- fuzzing: arbitrary and mutated bytes only ever raise PayloadError ---------------------------------

FUZZ_VOCAB, FUZZ_ROWS, FUZZ_LIST = 64, 4, 300
_g = torch.Generator().manual_seed(0)
VALID_PAYLOADS = [
    encode_probs(torch.nn.functional.one_hot(torch.tensor([1, 63]), FUZZ_VOCAB).float()),                 # sparse, raw
    encode_probs(_dist(3, FUZZ_VOCAB, 20, 1)),                                                             # sparse, zstd
    encode_probs(_dist(2, FUZZ_VOCAB, 3, 2), precision=Precision.F16),                                     # sparse f16, raw
    encode_probs(torch.full((2, FUZZ_VOCAB), 1 / FUZZ_VOCAB)),                                             # dense, zstd
    encode_probs(torch.full((2, FUZZ_VOCAB), 1 / FUZZ_VOCAB), compress=False),                             # dense, raw
    encode_probs(torch.softmax(torch.randn(3, FUZZ_VOCAB, generator=_g), -1), precision=Precision.F16),   # dense f16, raw
    encode_list(torch.tensor([1, 2, 2, 63]), torch.tensor([0.5, 0.25, 0.25, 1.0]), FUZZ_VOCAB),           # list, raw
    encode_list(torch.tensor([1, 2, 2, 63] * 50), torch.tensor([0.5, 0.25, 0.25, 1.0] * 50), FUZZ_VOCAB),  # list, zstd
    encode_list(torch.tensor([7] * 40), torch.full((40,), 0.125), FUZZ_VOCAB, precision=Precision.F16),    # list f16, zstd
    encode_list(torch.zeros(0, dtype=torch.long), torch.zeros(0), FUZZ_VOCAB),                             # empty list
]
# interesting 4-byte words for "word" mutations: special floats (f32, and f16 pairs) and boundary ids/counts
_WORDS = [struct.pack("<f", x) for x in (np.nan, np.inf, -np.inf, -0.5, 0.0, 1.5, 1.0000005, 1e-45)] \
    + [struct.pack("<ee", x, 0.5) for x in (np.nan, np.inf, -0.5, 0.0, 1.5)] \
    + [struct.pack("<I", x) for x in (0, 1, FUZZ_VOCAB - 1, FUZZ_VOCAB, FUZZ_VOCAB + 1, 2**31, 2**32 - 1)]
_MUTATION = st.tuples(st.sampled_from(["flip", "truncate", "extend", "overwrite", "word"]), st.integers(0, 1 << 16),
                      st.integers(0, 7), st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from(_WORDS)))


def _mutate(data: bytes, mutations, fix_len: bool = False) -> bytes:
    """Apply byte mutations; fix_len then makes a raw body's declared length agree, to get past that check."""
    d = bytearray(data)
    for op, at, bit, blob in mutations:
        i = at % max(len(d), 1)
        if op == "flip" and d:
            d[i] ^= 1 << bit
        elif op == "truncate":
            del d[i:]
        elif op == "extend":
            d += blob
        elif op == "overwrite" and d:
            d[i : i + len(blob)] = blob
        elif op == "word" and len(d) >= HEADER_SIZE + 4:  # a 4-byte aligned word of the body
            j = HEADER_SIZE + 4 * (at % ((len(d) - HEADER_SIZE) // 4))
            d[j : j + 4] = (blob * 4)[:4]
    if fix_len and len(d) >= HEADER_SIZE and not d[3] & FLAG_ZSTD:
        d[12:16] = struct.pack("<I", len(d) - HEADER_SIZE)
    return bytes(d)


def _decode_everything(data: bytes) -> None:
    """Feed one payload to every decoder; anything but PayloadError escapes, and every success is checked."""
    for max_sum_error in (None, 1e-3):
        try:
            out = decode_probs(data, vocab_size=FUZZ_VOCAB, max_rows=FUZZ_ROWS, max_sum_error=max_sum_error)
        except PayloadError:
            pass
        else:
            assert out.dtype == np.float32 and out.ndim == 2
            assert 1 <= out.shape[0] <= FUZZ_ROWS and out.shape[1] == FUZZ_VOCAB
            assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1 + 1e-6).all()  # the codec's rounding slack
            if max_sum_error is not None:
                assert np.abs(out.sum(-1, dtype=np.float64) - 1).max() <= max_sum_error
    try:
        ids, vals = decode_list(data, vocab_size=FUZZ_VOCAB, max_len=FUZZ_LIST)
    except PayloadError:
        pass
    else:
        assert ids.dtype == np.int64 and vals.dtype == np.float32
        assert ids.ndim == vals.ndim == 1 and len(ids) == len(vals) <= FUZZ_LIST
        assert ((ids >= 0) & (ids < FUZZ_VOCAB)).all()
        assert np.isfinite(vals).all() and (vals > 0).all() and (vals <= 1 + 1e-6).all()


def test_fuzz_seeds_decode():
    """The unmutated seeds of the fuzzer decode (so mutations start from payloads that reach deep checks)."""
    assert {(d[1], d[3] & FLAG_ZSTD) for d in VALID_PAYLOADS} == {(k, z) for k in Kind for z in (0, FLAG_ZSTD)}
    for data in VALID_PAYLOADS:
        if data[1] == Kind.LIST:
            decode_list(data, vocab_size=FUZZ_VOCAB, max_len=FUZZ_LIST)
        else:
            decode_probs(data, vocab_size=FUZZ_VOCAB, max_rows=FUZZ_ROWS)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_only_raise_payload_error(data):
    _decode_everything(data)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(base=st.sampled_from(VALID_PAYLOADS), mutations=st.lists(_MUTATION, min_size=1, max_size=4), fix_len=st.booleans())
def test_fuzz_mutated_payloads_only_raise_payload_error(base, mutations, fix_len):
    _decode_everything(_mutate(base, mutations, fix_len))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(base=st.sampled_from(VALID_PAYLOADS), field=st.sampled_from([0, 1, 2, 3, 4, 8, 12]), value=st.integers(0, 2**32 - 1))
def test_fuzz_header_fields_only_raise_payload_error(base, field, value):
    """Each header field set to any value (u8 fields get the low byte), body left as it was."""
    d = bytearray(base)
    if field < 4:
        d[field] = value & 0xFF
    else:
        d[field : field + 4] = struct.pack("<I", value)
    _decode_everything(bytes(d))


def _poke(data: bytes, at: int, word: bytes) -> bytes:
    """Overwrite one 4-byte aligned word of the (decompressed) body, recompressing if it was compressed."""
    zstd = data[3] & FLAG_ZSTD
    body = bytearray(zstandard.ZstdDecompressor().decompress(data[HEADER_SIZE:]) if zstd else data[HEADER_SIZE:])
    j = 4 * (at % (len(body) // 4))
    body[j : j + 4] = word
    return data[:HEADER_SIZE] + (zstandard.ZstdCompressor().compress(bytes(body)) if zstd else bytes(body))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(base=st.sampled_from([d for d in VALID_PAYLOADS if struct.unpack_from("<I", d, 12)[0] >= 4]),
       at=st.integers(0, 1 << 10), word=st.sampled_from(_WORDS))
def test_fuzz_special_values_in_bodies_only_raise_payload_error(base, at, word):
    """NaN, infinities, negatives, >1, boundary ids and counts at any aligned spot of a well-formed body."""
    _decode_everything(_poke(base, at, word))


def _list(ids, vals, vocab=4, precision=1, **kw):
    itemsize = 4 if precision == 1 else 2
    body = np.array(ids, "<u4").tobytes() + np.array(vals, "<f4" if itemsize == 4 else "<f2").tobytes()
    return _payload(3, len(ids), vocab, body, precision=precision, **kw)


@pytest.mark.parametrize(
    "data, match",
    [
        (_list([1, 4], [0.5, 0.5]), r"token id 4 out of range \[0, 4\)"),
        (_list([1, 2], [0.5, 0.0]), r"finite probabilities in \(0, 1\]"),
        (_list([1, 2], [0.5, -0.25]), r"finite probabilities in \(0, 1\]"),
        (_list([1, 2], [np.nan, 0.5]), r"finite probabilities in \(0, 1\]"),
        (_list([1, 2], [np.inf, 0.5]), r"finite probabilities in \(0, 1\]"),
        (_list([1, 2], [0.5, 1.5]), r"finite probabilities in \(0, 1\]"),
        (_list([3], [np.inf], precision=2), r"finite probabilities in \(0, 1\]"),
        (_payload(3, MAX_LIST + 1, 4, b""), "list of 65537 entries; allowed at most 8"),
        (_list([0] * 9, [0.1] * 9), "list of 9 entries; allowed at most 8"),
        (_payload(3, 2, 4, np.array([1, 2], "<u4").tobytes() + np.array([0.5], "<f4").tobytes()), "list body length 12 != 16"),
        (_list([1, 2], [0.5, 0.5], body_len=12), "list body length 12 != 16"),
        (_list([1, 2], [0.5, 0.5], version=2), "version"),
        (_list([1, 2], [0.5, 0.5], vocab=5), "vocabulary 5 != expected 4"),
        (_list([1], [0.5], precision=3), "kind/precision"),
        (_list([1, 2], [0.5, 0.5], flags=1), "corrupt zstd"),
        (_payload(2, 1, 4, np.array([1], "<u4").tobytes() + np.array([2], "<u4").tobytes() + np.array([1.0], "<f4").tobytes()),
         "expected a list payload, got sparse"),
        (_payload(1, 1, 4, np.full(4, 0.25, "<f4").tobytes()), "expected a list payload, got dense"),
    ],
)
def test_hostile_list_payloads_get_clear_errors(data, match):
    with pytest.raises(PayloadError, match=match):
        decode_list(data, vocab_size=4, max_len=8)


def test_list_payload_is_not_a_distribution():
    data = encode_list(torch.tensor([1, 2]), torch.tensor([0.5, 0.5]), 4)
    with pytest.raises(PayloadError, match="expected a dense or sparse payload, got list"):
        decode_probs(data, vocab_size=4, max_rows=8)


def test_compression_only_when_it_shrinks_the_payload():
    one_hot = torch.nn.functional.one_hot(torch.tensor([5]), 64).float()
    tiny = encode_probs(one_hot, compress=True)
    assert tiny[3] & FLAG_ZSTD == 0 and tiny == encode_probs(one_hot, compress=False)  # zstd's frame would grow it
    short = encode_list(torch.tensor([3]), torch.tensor([1.0]), 64, compress=True)
    assert short[3] & FLAG_ZSTD == 0
    uniform = torch.full((1, 5000), 1 / 5000)
    packed, raw = encode_probs(uniform, compress=True), encode_probs(uniform, compress=False)
    assert raw[1] == packed[1] == Kind.DENSE and raw[3] & FLAG_ZSTD == 0
    assert packed[3] & FLAG_ZSTD and len(packed) < len(raw) // 10
    assert packed[12:16] == raw[12:16]  # body_len is the uncompressed length either way
    assert np.array_equal(decode_probs(packed, vocab_size=5000, max_rows=1, max_sum_error=1e-3), uniform.numpy())


def test_decode_list_inflates_no_more_than_its_own_limits(monkeypatch):
    """decode_list bounds what it inflates by the caller's max_len: a list longer than that is refused before any
    decompression, and a zstd stream that inflates past its declared size is cut there."""
    max_len, vocab = 4096, 151936
    bound = max_len * (4 + 4)  # ids u32 + f32 values
    calls: list[tuple[int, int | None]] = []  # (declared body_len, bytes that came back; None when refused)
    real_body = codec._body

    def spy(raw, body_len, compressed):
        assert compressed, "these payloads are all zstd-compressed"
        try:
            body = real_body(raw, body_len, compressed)
        except PayloadError:
            calls.append((body_len, None))
            raise
        calls.append((body_len, len(body)))
        return body

    monkeypatch.setattr(codec, "_body", spy)

    def decode(data: bytes) -> str:
        try:
            ids, _ = decode_list(data, vocab_size=vocab, max_len=max_len)
        except PayloadError as e:
            return str(e)
        return f"decoded {len(ids)} entries"

    def zlist(n: int) -> bytes:
        data = encode_list(torch.arange(n) % vocab, torch.full((n,), 0.5), vocab, compress=True)
        assert data[1] == Kind.LIST and data[3] & FLAG_ZSTD  # a real compressed list payload
        return data

    # a valid compressed list at the limit: inflated, exactly its declared size
    assert decode(zlist(max_len)) == f"decoded {max_len} entries"
    # a real compressed list of MAX_LIST entries (declared and decompressed 512 KiB): over the caller's bound
    too_long = zlist(MAX_LIST)
    assert struct.unpack_from("<I", too_long, 12)[0] == MAX_LIST * 8 > bound
    outcome_long = decode(too_long)
    # a bomb: the header declares max_len entries, the zstd stream inflates to 64 MiB
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x01" * (64 << 20))
    outcome_bomb = decode(_payload(3, max_len, vocab, bomb, flags=1, body_len=bound))
    # a dense bomb's header sent where a list is expected (155 MB declared): refused by kind, nothing inflated
    outcome_dense = decode(_payload(1, 256, vocab, bomb, flags=1, body_len=256 * vocab * 4))

    assert len(calls) >= 2, f"the spy saw {len(calls)} inflation calls: the payloads never reached decompression"
    assert all(n <= bound for n, _ in calls), f"inflation asked for up to {max(n for n, _ in calls)} bytes; bound {bound}"
    assert all(got is None or got <= n for n, got in calls), calls
    assert calls == [(bound, bound), (bound, None)], calls  # the valid list, then the bomb cut at its declared size
    assert f"list of {MAX_LIST} entries; allowed at most {max_len}" in outcome_long
    assert "decompressed body is over" in outcome_bomb
    assert "expected a list payload, got dense" in outcome_dense
