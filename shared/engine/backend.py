"""One engine slot behind the ModelBackend interface (shared/backend.py): what a cloud session's TargetCache uses
when the cloud runs `--engine static`. Rollback is bookkeeping: truncation forgets tokens, whose keys the next
tokens at those positions overwrite."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from picospec.shared.backend import PrefixCache, _fit_width
from picospec.shared.engine.model import Row, StaticEngine


class StaticBackend(PrefixCache):
    """Not thread-safe: one per session, one caller at a time (the engine itself is driven by one thread)."""

    def __init__(self, engine: StaticEngine, slot: int, logits_width: int = 0) -> None:
        self.engine, self.slot = engine, slot
        self.own_width = engine.vocab_size
        self.vocab_size = logits_width or self.own_width  # see HFBackend: the width the session speaks
        self.tokens: list[int] = []
        self.closed = False

    def reset(self) -> None:
        self.tokens = []

    def forward(self, token_ids: Sequence[int], num_logits: int = 0) -> torch.Tensor:
        """Append tokens; return float32 logits [n or num_logits, V] for the last `num_logits` of them (0 = all)."""
        if not token_ids:
            raise ValueError("forward needs at least one token")
        if self.closed:
            raise RuntimeError(f"engine slot {self.slot} was given back")
        logits = self.engine.run([Row(self.slot, list(token_ids), self.length, num_logits)])[0]
        self.tokens.extend(int(t) for t in token_ids)
        return _fit_width(logits, self.vocab_size)

    def prefill(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Start a new sequence; return the logits after its last token [V]."""
        self.reset()
        return self.forward(token_ids, num_logits=1)[-1]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length}")
        del self.tokens[length:]

    def close(self) -> None:
        """Give the slot back (idempotent)."""
        if not self.closed:
            self.closed = True
            self.engine.release(self.slot)

    @property
    def num_layers(self) -> int:
        return int(self.engine.model.config.num_hidden_layers)

    def early_exit(self, layer: int, rows: int,
                   on_logits: Callable[[torch.Tensor], None]) -> contextlib.AbstractContextManager[None]:
        return self.engine.early_exit(layer, rows, on_logits)
