"""Distribution payload codec: round trips and hostile input."""
import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import HEADER_SIZE, Kind, PayloadError, Precision, decode_probs, encode_probs

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
    assert torch.equal(back, probs)


def test_sparse_form_is_chosen_for_one_hot_and_is_tiny():
    probs = torch.nn.functional.one_hot(torch.tensor([5, 151000]), 151936).float()
    data = encode_probs(probs, compress=False)
    assert data[1] == Kind.SPARSE and len(data) == HEADER_SIZE + 2 * 12
    dense = encode_probs(torch.full((1, 1000), 1e-3), compress=False)
    assert dense[1] == Kind.DENSE


def test_f16_is_lossy_but_close():
    probs = _dist(2, 500, 500, 0)
    back = decode_probs(encode_probs(probs, precision=Precision.F16), vocab_size=500, max_rows=2)
    assert torch.allclose(back, probs, atol=1e-3)


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
    with pytest.raises(PayloadError, match="decompressed body is over"):
        decode_probs(data, vocab_size=4, max_rows=1)


def test_declared_size_over_bound_is_refused_before_decompression():
    data = _payload(2, 1, 4, b"", body_len=10**9)
    with pytest.raises(PayloadError, match="exceeds the bound"):
        decode_probs(data, vocab_size=4, max_rows=1)
