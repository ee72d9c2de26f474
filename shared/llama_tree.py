"""Tree nodes in a LlamaCppBackend's context: one llama_decode over many branches, then keep only one path.

The llama.cpp counterpart of shared/tree_cache.py (transformers) and cloud_server/engine/backend.py:StaticTreeKV (the static
engine), with the same interface (`base`, `tokens`, `parents`, `extend`, `keep`, `reroot`, `drop`).

llama.cpp masks attention by sequence: a token sees the cells that carry its sequence id at positions up to its own.
So each tree node gets a sequence id of its own (1..TREE_SEQS; 0 is the backend's linear sequence), carried by the
linear part, the node's ancestors and the node itself:
  * `extend` copies the sequence of each new node's nearest ancestor already cached (`llama_memory_seq_cp`: the
    cells gain an id, no data moves) and lists each new node under its own id first (the id its query attends with)
    and then its new descendants' in the same batch;
  * a node's position is the linear length + its depth, as in a linear forward of its path;
  * `reroot`/`keep` give the kept path's cells sequence 0 (they already sit at the linear positions: nothing moves,
    unlike transformers' gather) and remove the sequences of the nodes no longer held.

Exact in the linear backend's sense: each node sees the same inputs at the same positions as a linear forward of its
path, so its logits are that forward's up to llama.cpp's batch noise (they move with the batch a position ran in and
the cells it sees, tree or not: tests/llama_reference.py:BATCH_NOISE; a node that saw a sibling would be off by far
more, which tests/test_llama_cpp.py checks).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from picospec.shared.backend import fit_width
from picospec.shared.trees import ROOT, depths_of, reroot_plan

if TYPE_CHECKING:
    from picospec.shared.llama_backend import LlamaCppBackend

TREE_SEQS = 255  # sequence ids 1..255 for nodes: llama.cpp runs at most 256 sequences in a context, 0 is the linear one


class LlamaTreeKV:
    """The tree nodes in one backend's context; the backend must not be used linearly until `keep`/`drop`."""

    max_nodes = TREE_SEQS  # nodes held at once (one sequence id each)

    def __init__(self, backend: LlamaCppBackend, room: int = 0) -> None:
        """room: the most tree nodes the caller will hold at once (the context is made large enough now)."""
        backend.open_tree(min(room, TREE_SEQS))
        self.backend = backend
        self.base = backend.length  # linear entries before the tree
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.seqs: list[int] = []   # node -> its sequence id
        self._free = list(range(TREE_SEQS, 0, -1))

    def extend(self, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        """Append nodes (parents index all nodes, earlier or in this call; ROOT = after the linear part) in one
        llama_decode; return float32 logits [n, V], row i after new node i."""
        b, n, old = self.backend, len(tokens), len(self.tokens)
        if n == 0:
            raise ValueError("extend needs at least one node")
        all_parents = self.parents + [int(p) for p in parents]
        for i in range(old, old + n):
            if not ROOT <= all_parents[i] < i:
                raise ValueError(f"node {i}'s parent {all_parents[i]} is not an earlier node")
        if n > len(self._free):
            raise ValueError(f"a llama.cpp token tree holds at most {TREE_SEQS} nodes ({old} held, {n} more asked)")
        new = [self._free.pop() for _ in range(n)]
        seqs = self.seqs + new
        seen_by = [[seqs[i]] for i in range(old, old + n)]  # each new node: its own id first, then its new descendants'
        try:
            for i in range(old, old + n):
                a = all_parents[i]
                while a >= old:  # up through this call's nodes: each is seen by node i
                    seen_by[a - old].append(seqs[i])
                    a = all_parents[a]
                b.copy_sequence(0 if a == ROOT else seqs[a], seqs[i])  # the linear part and the cached ancestors
            depth = depths_of(all_parents)[old:]
            logits = b.decode_nodes([int(t) for t in tokens], [self.base + d for d in depth], seen_by)  # [n, V_own]
        except BaseException:  # a failed decode (a full context, an interrupt): the tree stays as it was
            for s in new:
                b.remove_sequence(s)
            self._free.extend(reversed(new))
            raise
        self.tokens.extend(int(t) for t in tokens)
        self.parents, self.seqs = all_parents, seqs
        return fit_width(logits, b.vocab_size)

    def keep(self, path: Sequence[int]) -> None:
        """Keep the linear part and the nodes of `path` (root-descending indices); drop the rest."""
        self.reroot(path, [])

    def reroot(self, path: Sequence[int], subtree: Sequence[int]) -> dict[int, int]:
        """Move `path` (root-descending) into the linear part and keep `subtree` (nodes under the path's end, each
        with its parent on the path's end or in `subtree`) as the new tree; drop the rest. Returns old -> new tree
        index of the kept subtree nodes."""
        b = self.backend
        kept, parents = reroot_plan(self.parents, path, subtree)
        if path:
            b.copy_sequence(self.seqs[path[-1]], 0)  # the path's cells join the linear sequence where they are
        held = {self.seqs[i] for i in kept}
        for s in self.seqs:
            if s not in held:
                b.remove_sequence(s)
                self._free.append(s)
        b.tokens.extend(self.tokens[i] for i in path)
        self.base = b.length
        self.tokens, self.parents, self.seqs = [self.tokens[i] for i in kept], parents, [self.seqs[i] for i in kept]
        return {old: i for i, old in enumerate(kept)}

    def drop(self) -> None:
        """Forget every tree node: the backend holds its linear part again."""
        self.keep([])
