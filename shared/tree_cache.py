"""Tree nodes in an HFBackend's KV cache: one forward over many branches, then keep only one path.

The backend's cache holds its linear sequence (`backend.tokens`, the committed prefix as far as cached); a `TreeKV`
appends tree nodes after it with a tree attention mask (each node sees the linear part, its ancestors and itself;
its RoPE position is the linear length + its depth), and `keep` gathers the linear part plus one root-descending
path along the sequence dimension (an index_select of each layer's keys and values: no recompute), after which the
backend is an ordinary linear cache again. Exact: each kept entry is what a linear forward of that path computes
(the same inputs, positions and visible keys), up to floating-point summation order.

Only plain DynamicCache layers can be gathered (a sliding-window or quantised layer drops or packs entries); a model
with any other layer type refuses trees with a ValueError.
"""
from __future__ import annotations

from typing import Sequence

import torch

from picospec.shared.backend import fit_width
from picospec.shared.hf_backend import HFBackend
from picospec.shared.trees import ancestor_mask, depths_of, reroot_plan


class TreeKV:
    """The tree nodes appended to one backend's cache; the backend must not be used linearly until `keep`/`drop`."""

    max_nodes = 1 << 30  # bounded by memory only

    def __init__(self, backend: HFBackend) -> None:
        if backend.cache is None:
            backend.reset()
        self.backend = backend
        self.base = backend.length  # linear entries before the tree
        self.tokens: list[int] = []
        self.parents: list[int] = []

    @torch.inference_mode()
    def extend(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Append nodes (parents index all nodes, earlier or in this call; ROOT = after the linear part) in one
        forward; return float32 logits [n, V], row i after new node i."""
        b, n = self.backend, len(tokens)
        if n == 0:
            raise ValueError("extend needs at least one node")
        old = len(self.tokens)
        all_parents = self.parents + list(parents)
        depth = depths_of(all_parents)[old:]
        seen = ancestor_mask(all_parents)[old:]                    # [n, old + n]: which tree nodes each attends to
        visible = torch.cat([torch.ones(n, self.base, dtype=torch.bool), seen], dim=1)  # [n, base + old + n]
        dtype = next(b.model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        # a float mask (0 = attend, min = not) works with the sdpa and eager kernels alike; a 4D mask is used as given
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=b.device)  # [1, n]
        if b.vocab_size > b.own_width:
            ids = torch.where(ids < b.own_width, ids, 0)
        positions = torch.tensor(depth, device=b.device) + self.base       # [n]: RoPE position = base + depth
        slots = torch.arange(self.base + old, self.base + old + n, device=b.device)  # [n]: where they land in the cache
        out = b.model(input_ids=ids, **{b.cache_keyword: b.cache}, use_cache=True, position_ids=positions.unsqueeze(0),
                      cache_position=slots, attention_mask=mask[None, None].to(b.device))
        self.tokens.extend(int(t) for t in tokens)
        self.parents = all_parents
        return fit_width(out.logits[0].float(), b.vocab_size)  # [n, V]

    def keep(self, path: Sequence[int]) -> None:
        """Keep the linear part and the nodes of `path` (root-descending indices), in that order; drop the rest."""
        self.reroot(path, [])

    @torch.inference_mode()
    def reroot(self, path: Sequence[int], subtree: Sequence[int]) -> dict[int, int]:
        """Move `path` (root-descending) into the linear part and keep `subtree` (nodes under the path's end, each
        with its parent on the path's end or in `subtree`) as the new tree; drop the rest. A gather of the cache's
        entries along the sequence dimension. Returns old -> new tree index of the kept subtree nodes."""
        b = self.backend
        kept, parents = reroot_plan(self.parents, path, subtree)
        order = list(path) + kept
        if order != list(range(len(self.tokens))):  # else every node is kept in place: nothing to move
            idx = torch.cat([torch.arange(self.base), torch.tensor(order, dtype=torch.long) + self.base])
            for layer in b.cache.layers:
                if type(layer).__name__ != "DynamicLayer":
                    raise ValueError(f"token trees need plain DynamicCache layers, not {type(layer).__name__}")
                if layer.keys is not None and layer.keys.numel():
                    i = idx.to(layer.keys.device)
                    layer.keys = layer.keys.index_select(-2, i)      # [B, H, base + len(order), D]
                    layer.values = layer.values.index_select(-2, i)
        b.tokens.extend(self.tokens[i] for i in path)
        self.base, self.tokens, self.parents = b.length, [self.tokens[i] for i in kept], parents
        return {old: i for i, old in enumerate(kept)}

    def drop(self) -> None:
        """Forget every tree node: the backend holds its linear part again."""
        self.keep([])
