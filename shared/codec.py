"""Wire codec for vocabulary distributions: pure bytes <-> numpy arrays, no I/O (and no torch: the edge on llama.cpp
uses it as it is; a torch tensor is taken where an array is, and the cloud wraps what comes out with torch.from_numpy).

Layout (little-endian):
    header  = version u8 | kind u8 | precision u8 | flags u8 | rows u32 | vocab u32 | body_len u32
    body    = DENSE:  rows * vocab values
              SPARSE: nnz u32 * rows | ids u32 * sum(nnz) | values * sum(nnz)
              LIST:   ids u32 * n | values * n   (rows = n; one ordered sequence, repeats allowed)
    SPARSE ids are per row ascending and delta-coded (first absolute, then gaps >= 1), which zstd packs well.
    LIST keeps its order: split-exact's tail draws are used first to last, and sorting them would bias them.
    flags bit 0: the body is zstd-compressed (only when that makes it smaller); body_len is the uncompressed length.

The encoder picks SPARSE when it is smaller (greedy one-hot rows, top-k/top-p truncated rows).
Decoding trusts nothing: every field is range-checked, body_len must match what the header implies,
and it is bounded *before* any allocation or decompression, so a hostile peer cannot make us allocate
more than the caller's limits allow (a zstd bomb stops at body_len + 1 bytes).
"""
from __future__ import annotations

import io
import struct
from enum import IntEnum
from typing import Any

import numpy as np
import zstandard

VERSION = 1
_HEADER = struct.Struct("<BBBBIII")
HEADER_SIZE = _HEADER.size
MAX_VOCAB = 1 << 21
MAX_ROWS = 256
MAX_LIST = 1 << 16
FLAG_ZSTD = 1


class PayloadError(ValueError):
    """A payload that is malformed, out of range, or over the allowed size."""


class Kind(IntEnum):
    DENSE = 1
    SPARSE = 2
    LIST = 3


class Precision(IntEnum):
    F32 = 1  # exact: what the exact modes need
    F16 = 2  # approximate modes only

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<f4") if self is Precision.F32 else np.dtype("<f2")


def dense_payload_bound(rows: int, vocab: int, precision: Precision = Precision.F32) -> int:
    """The largest payload `encode_probs` makes for [rows, vocab]: DENSE, uncompressed (incompressible rows, e.g.
    random logits at T = 1; SPARSE and zstd are used only when smaller). What a transport limit must admit."""
    return HEADER_SIZE + rows * vocab * precision.dtype.itemsize


def host_array(x: Any, dtype: Any) -> np.ndarray:
    """An array or a tensor (on any device) as a numpy array of `dtype` in host memory."""
    if hasattr(x, "detach"):  # a torch tensor (torch stays unimported here); bfloat16 has no numpy twin
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x).astype(dtype, copy=False)


def encode_probs(
    probs: Any, *, precision: Precision = Precision.F32, compress: bool = True, level: int = 3
) -> bytes:
    """Encode [rows, V] non-negative values (an array or a tensor; zeros are free in the sparse form)."""
    values = host_array(probs, np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected [rows, vocab], got shape {tuple(values.shape)}")
    rows, vocab = values.shape
    if not (1 <= rows <= MAX_ROWS and 1 <= vocab <= MAX_VOCAB):
        raise ValueError(f"{rows} rows x {vocab} vocab is outside the codec's limits")
    nz_rows = [np.flatnonzero(r) for r in values]
    nnz = np.array([len(ix) for ix in nz_rows], dtype="<u4")
    itemsize = precision.dtype.itemsize
    sparse_len = 4 * rows + int(nnz.sum()) * (4 + itemsize)
    if sparse_len < rows * vocab * itemsize:
        kind = Kind.SPARSE
        ids = np.concatenate([np.diff(ix, prepend=0) for ix in nz_rows]).astype("<u4")
        vals = np.concatenate([r[ix] for r, ix in zip(values, nz_rows)]).astype(precision.dtype)
        body = nnz.tobytes() + ids.tobytes() + vals.tobytes()
    else:
        kind = Kind.DENSE
        body = values.astype(precision.dtype).tobytes()
    return _pack(kind, precision, rows, vocab, body, compress, level)


def encode_list(ids: Any, values: Any, vocab: int, *, precision: Precision = Precision.F32,
                compress: bool = True, level: int = 3) -> bytes:
    """An ordered sequence of (id, value) pairs, e.g. draws from a distribution, kept in draw order."""
    n = len(ids)
    if n != len(values) or not 0 <= n <= MAX_LIST or not 1 <= vocab <= MAX_VOCAB:
        raise ValueError(f"list of {n} ids / {len(values)} values over vocab {vocab} is outside the codec's limits")
    body = host_array(ids, "<u4").tobytes() + host_array(values, np.float32).astype(precision.dtype).tobytes()
    return _pack(Kind.LIST, precision, n, vocab, body, compress, level)


def decode_list(data: bytes, *, vocab_size: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode and validate a LIST payload: (ids int64 [n], values float32 [n]), ids in range, values in (0, 1]."""
    _, kind, precision, body = _open(data, vocab_size, kinds=(Kind.LIST,), max_list=max_len)
    n = len(body) // (4 + precision.dtype.itemsize)
    ids = np.frombuffer(body, dtype="<u4", count=n).astype(np.int64)
    vals = np.frombuffer(body, dtype=precision.dtype, count=n, offset=4 * n).astype(np.float32)
    if n and ids.max() >= vocab_size:
        raise PayloadError(f"token id {int(ids.max())} out of range [0, {vocab_size})")
    if not np.isfinite(vals).all() or (vals <= 0).any() or (vals > 1.0 + 1e-6).any():
        raise PayloadError("list values must be finite probabilities in (0, 1]")
    return ids, vals


def _pack(kind: Kind, precision: Precision, rows: int, vocab: int, body: bytes, compress: bool, level: int) -> bytes:
    flags, raw_len = 0, len(body)
    if compress:
        packed = zstandard.ZstdCompressor(level=level).compress(body)
        if len(packed) < len(body):  # tiny payloads (verdict hints) grow under zstd's frame overhead
            body, flags = packed, FLAG_ZSTD
    return _HEADER.pack(VERSION, kind, precision, flags, rows, vocab, raw_len) + body


def decode_probs(
    data: bytes, *, vocab_size: int, max_rows: int, max_sum_error: float | None = None
) -> np.ndarray:
    """Decode and validate a DENSE or SPARSE payload into a float32 array [rows, vocab_size].

    max_sum_error: when given, every row must sum to 1 within it (full distributions)."""
    _, kind, precision, body = _open(data, vocab_size, kinds=(Kind.DENSE, Kind.SPARSE), max_rows=max_rows)
    rows, vocab, body_len = _HEADER.unpack_from(data)[4], vocab_size, len(body)
    itemsize = precision.dtype.itemsize
    out = np.zeros((rows, vocab), dtype=np.float32)
    if kind is Kind.DENSE:
        out[:] = np.frombuffer(body, dtype=precision.dtype).reshape(rows, vocab)
    else:
        if body_len < 4 * rows:
            raise PayloadError("sparse body too short for its row counts")
        nnz = np.frombuffer(body, dtype="<u4", count=rows).astype(np.int64)
        if (nnz > vocab).any():
            raise PayloadError("a sparse row has more entries than the vocabulary")
        total = int(nnz.sum())
        if body_len != 4 * rows + total * (4 + itemsize):
            raise PayloadError(f"sparse body length {body_len} does not match {total} entries")
        gaps = np.frombuffer(body, dtype="<u4", count=total, offset=4 * rows).astype(np.int64)
        vals = np.frombuffer(body, dtype=precision.dtype, count=total, offset=4 * rows + 4 * total)
        starts = np.concatenate([[0], np.cumsum(nnz)])
        for r in range(rows):
            g = gaps[starts[r] : starts[r + 1]]
            if len(g) > 1 and (g[1:] == 0).any():
                raise PayloadError(f"row {r}: ids are not strictly increasing")
            ids = np.cumsum(g)
            if len(ids) and ids[-1] >= vocab:
                raise PayloadError(f"row {r}: token id {int(ids[-1])} out of range [0, {vocab})")
            out[r, ids] = vals[starts[r] : starts[r + 1]]
    if not np.isfinite(out).all():
        raise PayloadError("payload holds NaN or infinite values")
    if (out < 0).any() or (out > 1.0 + 1e-6).any():
        raise PayloadError("payload probabilities outside [0, 1]")
    if max_sum_error is not None:
        sums = out.sum(axis=1, dtype=np.float64)
        if (np.abs(sums - 1.0) > max_sum_error).any():
            raise PayloadError(f"payload rows sum to {sums.tolist()}, not 1")
    return out


def _open(
    data: bytes, vocab_size: int, *, kinds: tuple[Kind, ...], max_rows: int = MAX_ROWS, max_list: int = MAX_LIST
) -> tuple[int, Kind, Precision, bytes]:
    """Check the header against the caller's expectations and bounds, then return the (decompressed) body.

    Everything the caller expects (kind, rows, list length) is checked here, before decompression, so the
    body we inflate is never larger than what the caller could legitimately receive."""
    if len(data) < HEADER_SIZE:
        raise PayloadError(f"payload of {len(data)} bytes is shorter than its {HEADER_SIZE}-byte header")
    version, kind, precision, flags, rows, vocab, body_len = _HEADER.unpack_from(data)
    if version != VERSION:
        raise PayloadError(f"unsupported payload version {version} (this side speaks {VERSION})")
    try:
        kind, precision = Kind(kind), Precision(precision)
    except ValueError as e:
        raise PayloadError(f"unknown payload kind/precision: {e}") from None
    if kind not in kinds:
        raise PayloadError(f"expected a {' or '.join(k.name.lower() for k in kinds)} payload, got {kind.name.lower()}")
    if flags & ~FLAG_ZSTD:
        raise PayloadError(f"unknown payload flags {flags:#x}")
    if vocab != vocab_size:
        raise PayloadError(f"payload vocabulary {vocab} != expected {vocab_size}")
    itemsize = precision.dtype.itemsize
    if kind is Kind.LIST:
        if rows > min(max_list, MAX_LIST):
            raise PayloadError(f"list of {rows} entries; allowed at most {min(max_list, MAX_LIST)}")
        exact_len: int | None = rows * (4 + itemsize)
        max_len = exact_len
    else:
        if not 1 <= rows <= min(max_rows, MAX_ROWS):
            raise PayloadError(f"payload has {rows} rows; allowed 1..{min(max_rows, MAX_ROWS)}")
        max_len = rows * vocab * itemsize if kind is Kind.DENSE else rows * (4 + vocab * (4 + itemsize))
        exact_len = max_len if kind is Kind.DENSE else None
    if exact_len is not None and body_len != exact_len:
        raise PayloadError(f"{kind.name.lower()} body length {body_len} != {exact_len} for {rows} x {vocab} at {itemsize} bytes")
    if body_len > max_len:
        raise PayloadError(f"declared body length {body_len} exceeds the bound {max_len}")
    return version, kind, precision, _body(data[HEADER_SIZE:], body_len, flags & FLAG_ZSTD)


def _body(raw: bytes, body_len: int, compressed: int) -> bytes:
    if not compressed:
        if len(raw) != body_len:
            raise PayloadError(f"body is {len(raw)} bytes, header says {body_len}")
        return raw
    try:
        # read at most body_len + 1 bytes: a stream that inflates further is rejected, never buffered
        body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read(body_len + 1)
    except zstandard.ZstdError as e:
        raise PayloadError(f"corrupt zstd body: {e}") from None
    if len(body) != body_len:
        raise PayloadError(f"decompressed body is {'over' if len(body) > body_len else len(body)} bytes, header says {body_len}")
    return body
