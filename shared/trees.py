"""Token trees in `coupled` mode (docs/design.md §3.7): pure helpers, no models, no gRPC.

A tree is a list of nodes in the order they travel: `tokens[i]` with `parents[i]`, the index of an earlier node, or
-1 for a child of the root (the committed prefix). Parents come before children, so one pass over the list knows
every node's depth. A node at depth d (0 for the root's children) sits at absolute position start + d, and its
noise is G(seed, start + d, .) whatever its branch: only one path is ever committed, so each position's noise is
used once, and the committed path is exactly the target's own Gumbel-max sample (the output law is unchanged).

The cloud's walk (`walk`): at the root, then at each node it descends into, it takes its own choice y; if a child
carries y it descends, else y is the emitted token (a correction when the node had children, a bonus at a leaf).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from picospec.shared.protocol import ProtocolError

if TYPE_CHECKING:  # the tree's mask and the cloud's walk take tensors; the edge's helpers here need no torch
    import torch

ROOT = -1  # the parent index of the root's children: the committed prefix itself


def chain_parents(n: int) -> list[int]:
    """The parents of a plain chain of n drafts: a tree of one branch is today's batch."""
    return list(range(-1, n - 1))


def check_tree(tokens: Sequence[int], parents: Sequence[int], max_nodes: int, max_depth: int) -> list[int]:
    """Validate a tree from the wire; return each node's depth. Refuses (ProtocolError, INVALID_ARGUMENT on the
    wire) anything the walk could not use unambiguously: a parent after its child, more nodes or levels than
    allowed, two siblings with the same token (the walk could take either)."""
    n = len(tokens)
    if len(parents) != n:
        raise ProtocolError(f"{len(parents)} parent indices for {n} tree nodes")
    if not 1 <= n <= max_nodes:
        raise ProtocolError(f"tree of {n} nodes; allowed 1..{max_nodes}")
    depths: list[int] = []
    seen: set[tuple[int, int]] = set()  # (parent, token): siblings must differ
    for i, (t, p) in enumerate(zip(tokens, parents)):
        if not ROOT <= p < i:
            raise ProtocolError(f"tree node {i} names parent {p}: a parent must come before its child (or be -1)")
        d = 0 if p == ROOT else depths[p] + 1
        if d >= max_depth:
            raise ProtocolError(f"tree node {i} at depth {d + 1}; at most {max_depth} levels allowed here")
        if (p, int(t)) in seen:
            raise ProtocolError(f"tree node {i} repeats token {t} under parent {p}")
        seen.add((p, int(t)))
        depths.append(d)
    return depths


def depths_of(parents: Sequence[int]) -> list[int]:
    """Depth of each node (parents already checked to come first)."""
    out: list[int] = []
    for p in parents:
        out.append(0 if p == ROOT else out[p] + 1)
    return out


def reroot_plan(parents: Sequence[int], path: Sequence[int], subtree: Sequence[int]) -> tuple[list[int], list[int]]:
    """A tree cache's re-rooting, checked: `path` (root-descending node indices) moves into the linear part and
    `subtree` (nodes under the path's end, each with its parent on the path's end or in `subtree`) becomes the new
    tree. Returns the kept nodes in expansion order and their parents renumbered (ROOT: under the path's end); a
    kept node's new index is its place in the first list. ValueError for a path or subtree that does not fit."""
    prev = ROOT
    for node in path:
        if not 0 <= node < len(parents) or parents[node] != prev:
            raise ValueError(f"path {list(path)} does not descend through the tree")
        prev = node
    kept = sorted(set(subtree))  # expansion order: parents before children
    new_index = {old: i for i, old in enumerate(kept)}
    new_parents = [ROOT if parents[old] == prev else new_index.get(parents[old], -2) for old in kept]
    if -2 in new_parents or prev in new_index:
        raise ValueError(f"subtree {kept} does not hang under the end of path {list(path)}")
    return kept, new_parents


def ancestor_mask(parents: Sequence[int]) -> "torch.Tensor":
    """[n, n] bool: entry (i, j) is True when node j is node i itself or one of its ancestors (what i attends to)."""
    import torch
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p != ROOT:
            mask[i] = mask[p]  # a node sees what its parent sees, and itself
        mask[i, i] = True
    return mask


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """Indices of the root-to-node path, node included (empty for the root)."""
    path: list[int] = []
    while node != ROOT:
        path.append(node)
        node = parents[node]
    return path[::-1]


@dataclass(frozen=True)
class TreeWalk:
    path: tuple[int, ...]  # committed nodes, root to deepest (their tokens are the accepted drafts)
    token: int             # the cloud's own choice after them
    rejected: bool         # True when the last node reached had children and none carried that choice


def walk(tokens: Sequence[int], parents: Sequence[int], choose: Callable[[int], int]) -> TreeWalk:
    """Descend from the root while a child carries the cloud's choice; `choose(node)` is that choice at a node
    (ROOT for the root), so the walk asks it only along the committed path."""
    children: dict[int, dict[int, int]] = {}
    for i, (t, p) in enumerate(zip(tokens, parents)):
        children.setdefault(p, {})[int(t)] = i
    node, path = ROOT, []
    while True:
        y = choose(node)
        below = children.get(node, {})
        if y not in below:
            return TreeWalk(tuple(path), y, rejected=bool(below))
        node = below[y]
        path.append(node)


def check_path(parents: Sequence[int], path: Sequence[int]) -> None:
    """The edge's check of a verdict's path: it must descend from the root through the tree it sent."""
    prev = ROOT
    for node in path:
        if not 0 <= node < len(parents) or parents[node] != prev:
            raise ProtocolError(f"verdict path {list(path)} does not descend through the tree sent")
        prev = node


def match_path(tokens: Sequence[int], parents: Sequence[int], sequence: Sequence[int]) -> list[int]:
    """The longest root-descending path whose tokens are a prefix of `sequence` (node indices). Used to keep a
    tree's cache entries that the committed tokens went through."""
    children: dict[int, dict[int, int]] = {}
    for i, (t, p) in enumerate(zip(tokens, parents)):
        children.setdefault(p, {})[int(t)] = i
    node, path = ROOT, []
    for t in sequence:
        nxt = children.get(node, {}).get(int(t))
        if nxt is None:
            break
        node = nxt
        path.append(node)
    return path


def verify_coupled_tree(p: "torch.Tensor", tokens: Sequence[int], parents: Sequence[int], seed: int,
                        start_pos: int) -> TreeWalk:
    """The cloud's coupled walk over a verified tree.

    p: [n+1, V] processed target distributions: row 0 after the committed prefix (position start_pos), row i+1
    after node i (position start_pos + depth(i) + 1). The choice at each position is the same Gumbel-max a chain
    (or the cloud alone) would make there, so the emitted tokens are identical to theirs at the same seed."""
    from picospec.shared.verify import gumbel_argmax  # verify imports nothing of ours: no cycle, but keep it local

    if p.shape[0] != len(tokens) + 1:
        raise ValueError(f"shape mismatch: p {tuple(p.shape)}, {len(tokens)} tree nodes")
    depth = depths_of(parents)

    def choose(node: int) -> int:
        pos = start_pos if node == ROOT else start_pos + depth[node] + 1
        return gumbel_argmax(p[node + 1], seed, pos)
    return walk(tokens, parents, choose)
