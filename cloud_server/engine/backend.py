"""One engine slot behind the ModelBackend interface (shared/backend.py): what a cloud session's TargetCache uses
when the cloud runs the static engine. Rollback is bookkeeping: truncation forgets tokens, whose keys the next
tokens at those positions overwrite. Input longer than PREFILL_CHUNK goes in pieces, each its own pass, so that
with batching a long prompt's prefill lets other sessions' passes run between its pieces."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Sequence

import torch

from picospec.cloud_server.engine.model import PREFILL_CHUNK, ExitHook, Row, StaticEngine
from picospec.shared.backend import PrefixCache, fit_width


class StaticBackend(PrefixCache):
    """Not thread-safe: one per session, one caller at a time. `passes` runs one row: the engine at once, or a
    Batcher that runs it with other sessions' rows (cloud_server/engine/batcher.py)."""

    supports_trees = True

    def __init__(self, engine: StaticEngine, slot: int, logits_width: int = 0,
                 passes: Callable[[Row], tuple[torch.Tensor, float]] | None = None) -> None:
        """passes: runs a row, gives its logits and the seconds of model time charged to it (Batcher.submit)."""
        self.engine, self.slot = engine, slot
        self.passes = passes or self._run_alone
        self.own_width = engine.vocab_size
        self.vocab_size = logits_width or self.own_width  # see HFBackend: the width the session speaks
        self.tokens: list[int] = []
        self.closed = False
        self._exit: ExitHook | None = None

    def _run_alone(self, row: Row) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        logits = self.engine.run([row])[0]
        return logits, time.perf_counter() - t0

    def run_row(self, row: Row) -> torch.Tensor:
        """One row's pass; the time spent in it beyond the row's own share goes to `waited_s`."""
        t0 = time.perf_counter()
        logits, charged_s = self.passes(row)
        self.waited_s += max(0.0, time.perf_counter() - t0 - charged_s)
        return logits

    def reset(self) -> None:
        self.tokens = []

    def forward(self, token_ids: Sequence[int], num_logits: int = 0) -> torch.Tensor:
        """Append tokens; return float32 logits [n or num_logits, V] for the last `num_logits` of them (0 = all)."""
        ids = [int(t) for t in token_ids]
        k = num_logits or len(ids)
        if not ids:
            raise ValueError("forward needs at least one token")
        if self.closed:
            raise RuntimeError(f"engine slot {self.slot} was given back")
        if k > PREFILL_CHUNK:
            raise ValueError(f"a pass returns at most {PREFILL_CHUNK} rows of logits, not {k}")
        for s in range(0, len(ids), PREFILL_CHUNK):
            piece = ids[s:s + PREFILL_CHUNK]
            logits = self.run_row(Row(self.slot, piece, self.length, min(k, len(piece)), self._exit))
            self.tokens.extend(piece)
        if k > len(piece):  # the logits wanted reach back into an earlier piece: recompute them (same keys)
            self.truncate(len(self.tokens) - k)
            logits = self.run_row(Row(self.slot, ids[-k:], self.length, k, self._exit))
            self.tokens.extend(ids[-k:])
        return fit_width(logits, self.vocab_size)

    def _drop_after(self, length: int) -> None:
        """Nothing: keys past `length` are never read and the next tokens there overwrite them."""

    def tree(self, room: int = 0) -> "StaticTreeKV":
        """A tree row's nodes after the slot's tokens, extended once per pass (StaticTreeKV)."""
        return StaticTreeKV(self)

    def close(self) -> None:
        """Give the slot back (idempotent)."""
        if not self.closed:
            self.closed = True
            self.engine.release(self.slot)

    @property
    def num_layers(self) -> int:
        return int(self.engine.model.config.num_hidden_layers)

    @contextlib.contextmanager
    def early_exit(self, layer: int, rows: int, on_logits: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """As HFBackend.early_exit: while active, each pass also hands tentative logits [rows, V] from after decoder
        layer `layer` (1-based) to `on_logits` before the remaining layers run (that pass runs eager, alone)."""
        if not 1 <= layer < self.num_layers:
            raise ValueError(f"exit layer {layer} outside 1..{self.num_layers - 1}")
        self._exit = (layer, rows, on_logits)
        try:
            yield
        finally:
            self._exit = None


class StaticTreeKV:
    """shared/tree_cache.py's TreeKV for an engine slot: tree nodes appended after the backend's tokens in one pass
    (a tree row: rotary position = depth, each node sees the prefix, its ancestors and itself), then `keep` moves one
    root-descending path into line (StaticEngine.compact) and forgets the rest. The pass goes through the backend's
    `passes`, so with batching a tree shares its pass with other sessions' rows."""

    max_nodes = 1 << 30  # bounded by the pass's rows, not by the cache

    def __init__(self, backend: StaticBackend) -> None:
        self.backend = backend
        self.base = backend.length
        self.tokens: list[int] = []

    def extend(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Logits [n, V], row i after node i (parents index this call's nodes; ROOT = after the backend's tokens)."""
        if self.tokens:
            raise ValueError("a static tree is extended once per pass")
        b = self.backend
        logits = b.run_row(Row(b.slot, [int(t) for t in tokens], self.base, 0, None, list(parents)))
        self.tokens = [int(t) for t in tokens]
        return fit_width(logits, b.vocab_size)

    def keep(self, path: Sequence[int]) -> None:
        """Keep the nodes of `path` (root-descending indices) after the backend's tokens; drop the rest."""
        b = self.backend
        if list(path) != list(range(len(path))):  # nodes already in place need no move
            b.engine.compact(b.slot, [self.base + i for i in path], self.base)
        b.tokens.extend(self.tokens[i] for i in path)
        self.tokens = []
