"""llama.cpp as a batched cloud engine: every session a sequence of one llama.cpp context, and one llama_decode runs
the rows of many sessions (the Batcher's pass, cloud_server/engine/batcher.py), as the static engine does for torch.

Terms as in cloud_server/engine/__init__.py: a slot is one session's sequence id in the context; a row is one slot's tokens
in a pass. The cache is unified (sessions share the context's cells, sized slots x max_len): each token sees only
its own sequence's cells at positions up to its own (llama.cpp's mask), so a session's logits are the ones it would
get alone, up to llama.cpp's batch noise (a position's logits move with the batch it ran in, tests/llama_reference.py).

llama.cpp's context is not thread-safe and only the engine's thread (the Batcher's) decodes: a crop (a rejection's
rollback, a slot given back) asked for on a session's thread is done by the engine's thread before its next pass.
A session's next tokens always go through a pass, so they never see a cell the crop removes.

    engine = LlamaEngine(gguf_model, slots=8, max_len=8192)
    backend = engine.backend(passes=Batcher(engine).submit)   # .close() gives the slot back
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

from picospec.cloud_server.engine.backend import StaticBackend
from picospec.cloud_server.engine.model import PREFILL_CHUNK, Row, SlotPool
from picospec.shared.llama_backend import N_BATCH, GgufModel, LlamaCppBackend, LlamaCppError, decode
from picospec.shared.llama_tree import TREE_SEQS

SHARED_ROW = 32  # rows longer than this (a prompt's piece) run in a pass of their own: a decode row waits for no prompt


class LlamaEngine:
    """Sessions' sequences in one llama.cpp context; `run` decodes rows of several of them in one call."""

    def __init__(self, model: GgufModel, slots: int, max_len: int) -> None:
        if not 1 <= slots <= TREE_SEQS + 1:
            raise ValueError(f"a llama.cpp engine holds 1 to {TREE_SEQS + 1} sessions, not {slots}")
        from llama_cpp import _internals

        self.model, self.slots, self.max_len = model, slots, max_len
        self.vocab_size = model.config.vocab_size
        self.max_shared_row = SHARED_ROW
        self._ctx = model.new_context(slots * max_len)
        self._batch = _internals.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1, verbose=False)
        self.slot_pool = SlotPool(slots, "llama.cpp engine slots")
        self._lock = threading.Lock()      # crops: asked for on session threads, done on the engine's
        self._crops: dict[int, int] = {}   # slot -> the length its sequence is cut to before the next pass

    def acquire(self) -> int:
        return self.slot_pool.acquire()

    @property
    def slots_in_use(self) -> int:
        return self.slot_pool.in_use

    def release(self, slot: int) -> None:
        """Give the slot back; its sequence is emptied before the next pass, so a new session finds it clean."""
        self.slot_pool.release(slot, before_free=lambda s: self.crop(s, 0))

    def crop(self, slot: int, length: int) -> None:
        """Cut the slot's sequence to `length` tokens before the next pass (the shortest asked for since the last)."""
        with self._lock:
            self._crops[slot] = min(length, self._crops.get(slot, length))

    def backend(self, logits_width: int = 0,
                passes: Callable[[Row], tuple[np.ndarray, float]] | None = None) -> LlamaSlotBackend:
        """A backend over a free slot; `passes` runs its rows (a Batcher's submit; default: this engine, at once)."""
        return LlamaSlotBackend(self, self.acquire(), logits_width, passes)

    def run(self, rows: Sequence[Row]) -> list[np.ndarray]:
        """Each row's logits [num_logits or len(token_ids), V], float32, from one llama_decode over all rows (in
        several when their tokens pass the context's batch size)."""
        for r in rows:
            self._check(r)
        if len(rows) > 1 and sum(len(r.token_ids) for r in rows) > N_BATCH:
            return [self.run([r])[0] for r in rows]
        with self._lock:
            crops, self._crops = self._crops, {}
        for slot, length in crops.items():
            if not self._ctx.kv_cache_seq_rm(slot, length, -1):
                raise LlamaCppError(f"llama.cpp could not cut sequence {slot} to {length} tokens")
        tokens, positions, seqs, wanted, counts = [], [], [], [], []
        for r in rows:
            n, k = len(r.token_ids), r.num_logits or len(r.token_ids)
            tokens += [t if 0 <= t < self.vocab_size else 0 for t in r.token_ids]  # a padding id: as HF
            positions += range(r.start, r.start + n)
            seqs += [[r.slot]] * n
            wanted += [i >= n - k for i in range(n)]
            counts.append(k)
        logits = decode(self._ctx, self._batch, tokens, positions, seqs, wanted, self.vocab_size)  # [sum k, V]
        return list(np.split(logits, np.cumsum(counts)[:-1]))

    def _check(self, r: Row) -> None:
        if not 0 <= r.slot < self.slots:
            raise ValueError(f"row slot {r.slot} is not a session slot")
        if not r.token_ids or r.start < 0 or r.start + len(r.token_ids) > self.max_len:
            raise ValueError(f"row of {len(r.token_ids)} tokens at {r.start}: outside the engine's max_len {self.max_len}")
        if len(r.token_ids) > PREFILL_CHUNK or not 0 <= r.num_logits <= len(r.token_ids):
            raise ValueError(f"a row of {len(r.token_ids)} tokens (at most {PREFILL_CHUNK}) cannot give logits for "
                             f"{r.num_logits}")
        if r.exit is not None or r.parents is not None:
            raise ValueError("the llama.cpp engine runs chains: no early-exit hooks, no token trees")


class LlamaSlotBackend(StaticBackend):
    """One engine slot behind the ModelBackend interface, as StaticBackend (its pieces and passes), with llama.cpp's
    rollback: a crop removes the sequence's cells past the kept length (done before the slot's next pass)."""

    supports_trees = False  # tree nodes would need sequences of their own beside every session's: refused clearly

    def reset(self) -> None:
        super().reset()
        self.engine.crop(self.slot, 0)

    def _drop_after(self, length: int) -> None:
        self.engine.crop(self.slot, length)

    early_exit = LlamaCppBackend.early_exit  # refused: llama.cpp runs the layers as one graph

    def tree(self, room: int = 0) -> None:
        raise ValueError("token trees on llama.cpp need --batching off (each session its own context)")
