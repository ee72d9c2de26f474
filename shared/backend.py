"""Model backends behind one small interface: a KV cache over one token sequence.

`prefill` starts a sequence, `forward` appends tokens and returns their logits, `truncate` rolls the
cache back (a view slice: O(1), no recompute). `logits_at` is the one call the protocol code needs: it
reuses the longest cached prefix of the sequence it is given, so a rollback after a rejection costs only
the truncation plus the forward of the tokens that really are new.

Logits are [n, V] float32: numpy arrays from llama.cpp (shared/llama_backend.py), torch tensors from transformers
(shared/hf_backend.py, imported only when a torch model is used, so an edge on llama.cpp never loads torch).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

Logits = Any  # [n, V] float32: a numpy array or a torch tensor, as the backend's engine makes them


class ModelBackend(Protocol):
    vocab_size: int

    @property
    def length(self) -> int: ...
    def prefill(self, token_ids: Sequence[int]) -> Logits: ...
    def forward(self, token_ids: Sequence[int], num_logits: int = 0) -> Logits: ...
    def truncate(self, length: int) -> None: ...


class PrefixCache:
    """What every backend shares: `tokens`, the sequence its cache holds; `logits_at` and `keep_shared` over it;
    `prefill`; the checks of `truncate`. A backend supplies `reset`, `forward` and `_drop_after`."""

    tokens: list[int]
    supports_trees = False  # a cache that masks per node and gathers a path (token trees: shared/tree_cache.py)
    # seconds this cache's forwards spent on others' model work: queued behind other sessions, and their rows of the
    # passes it shared with them (cloud_server/engine/batcher.py); 0 for a cache whose passes are its own alone
    waited_s: float = 0.0

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        raise NotImplementedError

    def forward(self, token_ids: Sequence[int], num_logits: int = 0) -> Logits:
        raise NotImplementedError

    def _drop_after(self, length: int) -> None:
        """Forget the cache's entries from `length` on (`tokens` is cut by `truncate`)."""
        raise NotImplementedError

    def prefill(self, token_ids: Sequence[int]) -> Logits:
        """Start a new sequence; return the logits after its last token [V]."""
        self.reset()
        return self.forward(token_ids, num_logits=1)[-1]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length}")
        if length < self.length:
            self._drop_after(length)
            del self.tokens[length:]

    def close(self) -> None:
        """Give back what the backend holds beyond itself (an engine slot); nothing here."""

    def tree(self, room: int = 0) -> Any:
        """Token-tree nodes after the cached tokens (where `supports_trees`): an object with `base`, `tokens`,
        `parents`, `max_nodes`, `extend(tokens, parents) -> logits [n, V]`, `keep(path)`, `reroot(path, subtree)` and
        `drop()` (shared/tree_cache.py's TreeKV is the reference). room: the most nodes the caller will hold at once."""
        raise ValueError(f"{type(self).__name__} cannot hold token trees")

    def keep_shared(self, sequence: Sequence[int], limit: int) -> int:
        """Truncate to the longest cached prefix of `sequence`, at most `limit` tokens long; its length."""
        keep, limit = 0, min(self.length, limit)
        while keep < limit and self.tokens[keep] == sequence[keep]:
            keep += 1
        self.truncate(keep)
        return keep

    def logits_at(self, sequence: Sequence[int], first: int) -> Logits:
        """Logits [len(sequence) - first, V] at positions first .. len(sequence)-1 of `sequence`.

        Row j predicts the token at position first + j + 1. Reuses the cached prefix shared with
        `sequence`, truncating any divergent (stale) suffix first."""
        if not 0 <= first < len(sequence):
            raise ValueError(f"first={first} outside a {len(sequence)}-token sequence")
        keep = self.keep_shared(sequence, first)
        return self.forward(sequence[keep:], num_logits=len(sequence) - first)


def make_backend(model: object, device: Any = "cpu", logits_width: int = 0, n_ctx: int = 0) -> PrefixCache:
    """A KV cache over `model`: llama.cpp's for a GGUF (n_ctx: the most tokens it will hold), else transformers'."""
    from picospec.shared.llama_backend import GgufModel  # imports llama_cpp only when a GGUF is loaded

    if isinstance(model, GgufModel):
        return model.backend(logits_width, n_ctx)
    from picospec.shared.hf_backend import HFBackend
    return HFBackend(model, device, logits_width)


def fit_width(logits: Logits, width: int) -> Logits:
    """logits [n, V_own] (an array or a tensor) cut or padded with -inf to [n, width]."""
    own = logits.shape[-1]
    if own == width:
        return logits
    if own > width:
        return logits[..., :width]
    if isinstance(logits, np.ndarray):
        pad = np.full((*logits.shape[:-1], width - own), -np.inf, dtype=logits.dtype)
        return np.concatenate([logits, pad], axis=-1)
    import torch
    pad = torch.full((*logits.shape[:-1], width - own), float("-inf"), dtype=logits.dtype, device=logits.device)
    return torch.cat([logits, pad], dim=-1)
