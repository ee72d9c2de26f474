"""Counter-based randomness: every random number is a pure function of (seed, position, stream[, token]).

Why not a stateful RNG: edge and cloud must agree on randomness without exchanging it, results must not
depend on how tokens were batched or how often a position was re-drafted after a rollback, and the same
bits must come out on CPU and CUDA. A stateless integer hash gives all three.

The hash is murmur3's 32-bit finaliser chained over the inputs. Multiplication is done on 16-bit halves
so no intermediate exceeds 2**48: no signed overflow in int64 tensors, identical results for Python ints
and for torch tensors on any device. A CPU tensor of tokens (a whole vocabulary's Gumbel noise, every coupled
token at T > 0) takes a numpy uint32 path whose multiplications wrap mod 2**32 natively: the same bits, about 8x
faster than the 16-bit halves in int64 (tests/test_rng_sampling.py checks they agree).

torch is imported only by the functions that return tensors (`uniforms`, `gumbel_noise`, the cloud's): an edge on
llama.cpp takes the numpy ones (`uniforms_array`, `gumbel_noise_array`) and never loads it.
"""
from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

_M32 = 0xFFFFFFFF
IntLike = TypeVar("IntLike", int, Any)  # a Python int or an int64 tensor


class Stream(IntEnum):
    """Independent random streams; one draw per (seed, position, stream)."""

    DRAFT = 1      # edge: sampling a draft token
    ACCEPT = 2     # cloud: the accept/reject coin
    RESIDUAL = 3   # cloud: sampling the correction from the residual
    TARGET = 4     # cloud: sampling from p itself (bonus token, cloud-only decoding)
    GUMBEL = 5     # coupled mode: per-token noise
    TAIL = 6       # cloud: draws from p outside its top-K (split-exact)
    PROPOSAL = 7   # edge: proposals of the split-exact residual sampler


def _mul32(x: IntLike, c: int) -> IntLike:
    """(x * c) mod 2**32 for 0 <= x, c < 2**32, without intermediate values above 2**48."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def fmix32(x: IntLike) -> IntLike:
    """murmur3 finaliser: a bijection on 32-bit values with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _fmix32_u32(x: np.ndarray) -> np.ndarray:
    """fmix32 on a uint32 array: numpy's uint32 products wrap mod 2**32, which is what _mul32 computes."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _prefix(seed: int, position: IntLike, stream: int) -> IntLike:
    """The hash chained over everything but the token word, which hash32 mixes in last."""
    h = fmix32((seed & _M32) ^ 0x9E3779B9)
    h = fmix32(h ^ ((seed >> 32) & _M32))
    h = fmix32(h ^ (stream & _M32))
    return fmix32(h ^ (position & _M32))


def hash32(seed: int, position: IntLike, stream: int, token: IntLike | int = 0) -> IntLike:
    """32 random bits for one (seed, position, stream, token). Inputs are reduced to 32 bits each
    (positions and token ids are far below 2**32; the seed keeps 64 bits through two words)."""
    h = _prefix(seed, position, stream)
    if isinstance(h, int) and getattr(getattr(token, "device", None), "type", None) == "cpu":  # a CPU tensor
        import torch
        return torch.from_numpy(_with_tokens_u32(h, token.numpy().astype(np.uint32)).astype(np.int64))
    return fmix32(h ^ (token & _M32) ^ 0x27D4EB2F)


def _with_tokens_u32(h: int, token_ids: np.ndarray) -> np.ndarray:
    """hash32's last step, the token word mixed into the prefix `h`, for a uint32 array of token ids."""
    return _fmix32_u32(token_ids ^ np.uint32((h ^ 0x27D4EB2F) & _M32))


def vocab_bits(seed: int, position: int, stream: int, vocab: int) -> np.ndarray:
    """hash32(seed, position, stream, t) for every token t in [0, vocab), as a uint32 array [vocab]: the numpy path
    of hash32 without building a tensor of token ids first."""
    return _with_tokens_u32(_prefix(seed, position, stream), np.arange(vocab, dtype=np.uint32))


def uniform(seed: int, position: int, stream: int, index: int = 0) -> float:
    """The index-th uniform in the open interval (0, 1) for (seed, position, stream), with 53 random bits."""
    hi = hash32(seed, position, stream, 2 * index) >> 5        # 27 bits
    lo = hash32(seed, position, stream, 2 * index + 1) >> 6    # 26 bits
    return ((hi << 26 | lo) + 0.5) / float(1 << 53)


def uniforms_array(seed: int, position: int, stream: int, start: int, count: int) -> np.ndarray:
    """uniform(seed, position, stream, i) for i in [start, start + count), as a float64 array [count]."""
    prefix = _prefix(seed, position, stream)
    idx = np.arange(start, start + count, dtype=np.uint64)
    hi = _with_tokens_u32(prefix, (2 * idx).astype(np.uint32)).astype(np.uint64) >> np.uint64(5)
    lo = _with_tokens_u32(prefix, (2 * idx + 1).astype(np.uint32)).astype(np.uint64) >> np.uint64(6)
    return ((hi << np.uint64(26) | lo).astype(np.float64) + 0.5) / float(1 << 53)


def uniforms(seed: int, position: int, stream: int, start: int, count: int) -> "torch.Tensor":
    """uniforms_array as a float64 tensor (the cloud's)."""
    import torch
    return torch.from_numpy(uniforms_array(seed, position, stream, start, count))


def gumbel_noise_array(seed: int, position: int, token_ids: np.ndarray) -> np.ndarray:
    """Gumbel(0, 1) noise for each token id [n] at one position, float64 [n], from 32-bit uniforms (enough: Gumbel-max
    only needs ties to be negligible)."""
    bits = _with_tokens_u32(_prefix(seed, position, int(Stream.GUMBEL)), np.asarray(token_ids).astype(np.uint32))
    u = (bits.astype(np.float64) + 0.5) / 4294967296.0
    return -np.log(-np.log(u))


def gumbel_noise(seed: int, position: int, token_ids: "torch.Tensor") -> "torch.Tensor":
    """gumbel_noise_array's noise as a float64 tensor on token_ids' device (the cloud's scoring on a GPU)."""
    import torch
    h = hash32(seed, position, int(Stream.GUMBEL), token_ids.to(torch.int64))
    u = (h.to(torch.float64) + 0.5) / 4294967296.0
    return -torch.log(-torch.log(u))
