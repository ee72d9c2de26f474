"""Growing a token tree on the edge (docs/design.md §3.7), without models: the draft's work comes in as a callback.

Order of growth: first the main chain (the coupled choices, `main_levels` levels), so that a tree commits at least what
that chain would; then best first by value, the product along the path of each step's weight (the measured acceptance
for a coupled choice, (1 - acceptance) x q's share for an alternative: edge_client/drafter.py:Drafter._candidates).
A node is expanded (its children's candidates computed: one draft forward) only when one of its children is wanted, so
leaves cost nothing. Nodes are listed in the order they were added, so any prefix of the list is a valid tree: the
first `budget` go up, and growth may go on while the cloud verifies them (the edge's idle time).

Expansions are memoised by path (the tokens from the root), so a tree grown past what was sent hands the next round
the subtree under the committed tokens for free (`Drafter.draft_tree` re-roots the memo and the KV entries).
"""
from __future__ import annotations

import heapq
import itertools
import math
from typing import Callable

from picospec.shared.trees import ROOT

MAX_TREE_NODES_GROWN = 128  # a tree, idle-time growth included, never holds more expanded nodes (each a KV entry)

Candidates = list[tuple[float, int]]  # (weight, token) under a node, the coupled choice first
Key = tuple[int, ...]                  # a node's path: the tokens from the root to it
# expand(kv index of the node's parent, the node's token, the position of its children) -> (its kv index, candidates)
Expand = Callable[[int, int, int], tuple[int, Candidates]]


class TreeGrower:
    def __init__(self, base: int, memo: dict[Key, tuple[int, Candidates]], main_levels: int, max_depth: int,
                 stop_ids: frozenset[int]) -> None:
        """base: the position of the root's children; memo: expansions known so far, () = the root (kv index ROOT)."""
        self.base, self.memo = base, memo
        self.main_levels, self.max_depth, self.stop_ids = main_levels, max_depth, stop_ids
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.keys: list[Key] = []
        self.expansions = 0  # draft forwards spent (memoised expansions cost none)
        self.reused = 0      # expansions the memo saved
        # (priority, order, node or parent, token or -1 = expand that node, value, on the main chain); the main
        # chain's entries first (priority -inf), in order
        self.heap: list[tuple[float, int, int, int, float, bool]] = []
        self._order = itertools.count()
        self._push_children(ROOT, (), 1.0, True)

    def _push_children(self, node: int, key: Key, value: float, main: bool) -> None:
        for rank, (w, t) in enumerate(self.memo[key][1]):
            on_main = main and rank == 0 and len(key) < self.main_levels
            heapq.heappush(self.heap, (-math.inf if on_main else -value * w, next(self._order), node, t, value * w,
                                       on_main))

    def step(self, expand: Expand) -> bool:
        """One move: add the best candidate as a node, or expand the best node. False when nothing is left."""
        if not self.heap:
            return False
        _, _, node, tok, value, main = heapq.heappop(self.heap)
        if tok >= 0:
            key = (self.keys[node] if node != ROOT else ()) + (tok,)
            self.tokens.append(tok)
            self.parents.append(node)
            self.keys.append(key)
            if len(key) < self.max_depth and tok not in self.stop_ids:  # children at depth len(key) fit the budget
                heapq.heappush(self.heap, (-math.inf if main else -value, next(self._order), len(self.tokens) - 1,
                                           -1, value, main))
            return True
        key = self.keys[node]
        if key in self.memo:
            self.reused += 1
        else:
            self.memo[key] = expand(self.memo[key[:-1]][0], key[-1], self.base + len(key))
            self.expansions += 1
        self._push_children(node, key, value, main)
        return True

    def coupled_choices(self) -> list[bool]:
        """Per node, whether it is its parent's coupled choice (the first candidate under it) or an alternative."""
        return [key[-1] == self.memo[key[:-1]][1][0][1] for key in self.keys]

    def grow(self, nodes: int, expand: Expand) -> None:
        """Grow until the tree has `nodes` nodes or nothing is left to add."""
        while len(self.tokens) < nodes and self.step(expand):
            pass

    def grow_one_expansion(self, max_nodes: int, expand: Expand) -> bool:
        """Idle-time growth: go on until one draft forward was spent (or the tree holds max_nodes, or nothing is
        left); False when there is nothing more to do."""
        spent = self.expansions
        while self.expansions == spent:
            if len(self.tokens) >= max_nodes or not self.step(expand):
                return False
        return True


def subtree_memo(memo: dict[Key, tuple[int, Candidates]], prefix: Key) -> dict[Key, tuple[int, Candidates]]:
    """The expansions under `prefix` (itself included, as the new root ()), their keys relative to it."""
    n = len(prefix)
    return {key[n:]: v for key, v in memo.items() if key[:n] == prefix}
