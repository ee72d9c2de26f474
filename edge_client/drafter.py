"""The draft model's side of a session: propose tokens from the committed prefix. Runs in the edge executor.

Whatever engine runs the draft, its logits become numpy rows here and everything after (q, the draws, the wire) is
numpy (shared/draws.py): an edge drafting on llama.cpp never imports torch. Token trees live in the engine's own cache
(`backend.tree()`: transformers' in shared/tree_cache.py, llama.cpp's sequences in shared/llama_tree.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from picospec.shared.backend import make_backend
from picospec.shared.codec import Precision, host_array
from picospec.shared.draws import gumbel_argmax, process_logits, quantize, sample_token
from picospec.shared.rng import Stream, gumbel_noise_array
from picospec.shared.sampling import SamplingParams
from picospec.edge_client.tree_builder import MAX_TREE_NODES_GROWN, TreeGrower, subtree_memo
from picospec.shared.trees import ROOT, match_path


@dataclass(frozen=True)
class DraftTree:
    """A token tree as it travels (shared/trees.py): node i is tokens[i] under parents[i] (-1: the committed prefix)."""

    tokens: list[int]
    parents: list[int]
    steps: int        # draft-model forwards it took (the root's and one per expanded node)
    compute_s: float
    reused: int = 0   # expansions taken from the last tree's growth (no forward)
    coupled: list[bool] = field(default_factory=list)  # per node: its parent's coupled choice (else an alternative)

    def took_alternative(self, path: Sequence[int]) -> bool:
        """Whether a verdict's path went through an alternative: what a chain of the coupled choices could not commit."""
        return not all(self.coupled[i] for i in path)


TREE_WIDTH = 4  # candidates considered under each expanded node: its Gumbel-max choice and the next best


@dataclass(frozen=True)
class DraftResult:
    token_ids: list[int]
    q: np.ndarray  # [k, V] float32: the distributions the tokens were drawn from, as the cloud will see them
    compute_s: float


class Drafter:
    def __init__(self, model: Any, params: SamplingParams, device: str = "cpu",
                 precision: Precision = Precision.F32, gumbel: bool = False, logits_width: int = 0,
                 n_ctx: int = 0) -> None:
        # the target's width when the draft's differs; n_ctx: the tokens a llama.cpp draft's context is sized for
        self.backend = make_backend(model, device, logits_width, n_ctx)
        self.params = params
        self.precision = precision
        self.gumbel = gumbel  # coupled mode: Gumbel-max with the noise the cloud will use
        self.tree: Any = None  # the last tree's expanded nodes (backend.tree()), cached until the verdict's path is known
        self.grower: TreeGrower | None = None  # ... and its growth (the memo of expansions, by path)
        self.accept = 0.6  # the acceptance the tree's weights use (set by the session from its estimate)

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def supports_trees(self) -> bool:
        """Token trees need a cache that masks per node and keeps one path: transformers' or llama.cpp's."""
        return self.backend.supports_trees

    def prefill(self, prompt_ids: Sequence[int]) -> float:
        t0 = time.perf_counter()
        self.tree, self.grower = None, None
        self.backend.reset()
        if len(prompt_ids) > 1:
            self.backend.forward(prompt_ids[:-1], num_logits=1)
        return time.perf_counter() - t0

    def _settle_tree(self, committed: Sequence[int]) -> None:
        """Keep the last tree's cached nodes along the path the committed tokens took (a gather), drop the others."""
        tree, self.tree, self.grower = self.tree, None, None
        if tree is None:
            return
        if list(committed[: tree.base]) != self.backend.tokens:
            tree.drop()  # the prefix itself moved (cannot happen in one session; a new prefill resets anyway)
            return
        tree.keep(match_path(tree.tokens, tree.parents, committed[tree.base:]))

    def settle(self, committed: Sequence[int]) -> None:
        """Keep only the cached tokens that agree with `committed`, but its newest (at the end of a generation).
        Cutting by length alone is not enough: a rejected draft sits at a committed position until the next draft
        crops it, and when the generation ends right after the rejection no next draft comes."""
        self._settle_tree(committed)
        self.backend.keep_shared(committed, len(committed) - 1)

    def draft(self, committed: Sequence[int], k: int, stream: Stream = Stream.DRAFT) -> DraftResult:
        """Sample k tokens after `committed`; the cache rolls back to the committed prefix by itself."""
        t0 = time.perf_counter()
        self._settle_tree(committed)
        seq = list(committed)
        rows = []
        for _ in range(k):
            logits = host_array(self.backend.logits_at(seq, len(seq) - 1)[-1], np.float32)  # [V]
            # sample from exactly what the cloud will decode, so the maths holds at any wire precision
            q = quantize(process_logits(logits, self.params), self.precision)
            pos = len(seq)
            seq.append(gumbel_argmax(q, self.params.seed, pos) if self.gumbel else sample_token(q, self.params.seed, pos, stream))
            rows.append(q)
        q_rows = np.stack(rows) if rows else np.zeros((0, self.vocab_size), dtype=np.float32)  # [k, V]
        return DraftResult(seq[len(committed):], q_rows, time.perf_counter() - t0)

    def _candidates(self, logits: np.ndarray, pos: int, accept: float) -> list[tuple[float, int]]:
        """(weight, token) of the best TREE_WIDTH tokens at `pos`: the coupled choice argmax(log q' + G) first, then the
        next best under the same noise (greedy: by the logits, G = 0). The choice's weight is the measured acceptance
        (with shared noise the cloud usually makes the same choice, however small q' of it is); the alternatives
        share the rest in proportion to q (where the two differ, the cloud's choice is most likely among them)."""
        q = self._q(logits)
        if self.params.temperature == 0.0:  # q' is one-hot: rank by the logits, which is what G = 0 does
            shifted = np.exp(logits.astype(np.float64) - logits.max())
            q_rank = shifted / shifted.sum()                                     # [V] float64 softmax
            support = np.arange(len(q_rank))
            scores = np.log(q_rank)
        else:
            q_rank = q
            support = np.flatnonzero(q > 0)                                      # [S]
            scores = np.log(q[support].astype(np.float64)) + gumbel_noise_array(self.params.seed, pos, support)
        best = np.argsort(-scores, kind="stable")[:TREE_WIDTH]
        ids = [int(support[i]) for i in best]
        alt_mass = sum(float(q_rank[t]) for t in ids[1:]) or 1.0
        return [(accept, ids[0])] + [((1.0 - accept) * float(q_rank[t]) / alt_mass, t) for t in ids[1:]]

    def draft_tree(self, committed: Sequence[int], budget: int, max_depth: int, stop_ids: frozenset[int],
                   accept: float = 0.6) -> DraftTree:
        """A token tree of up to `budget` nodes after `committed` (coupled mode), grown as edge_client/tree_builder.py
        says: the main chain for ceil(budget / 2) levels, then alternatives best first. When the last tree grew past
        the committed tokens (idle-time growth), its expansions under them are reused: no forward for those."""
        t0 = time.perf_counter()
        self.accept = accept
        memo = self._reroot(committed)
        fresh = memo is None
        if fresh:  # start afresh from the committed prefix
            self._settle_tree(committed)
            root_logits = host_array(self.backend.logits_at(list(committed), len(committed) - 1)[-1], np.float32)  # [V]
            self.tree = self.backend.tree(room=MAX_TREE_NODES_GROWN)
            memo = {(): (ROOT, self._candidates(root_logits, len(committed), accept))}
        g = self.grower = TreeGrower(len(committed), memo, (budget + 1) // 2, max_depth, stop_ids)
        g.grow(budget, self._expand)
        return DraftTree(list(g.tokens), list(g.parents), fresh + g.expansions, time.perf_counter() - t0, g.reused,
                         g.coupled_choices())

    def grow_tree(self, max_nodes: int) -> tuple[bool, float]:
        """Idle time, while the cloud verifies the tree sent: grow it by one draft forward, past what was sent, so that
        the next tree starts from expansions already made. (False when there is nothing to grow; seconds spent.)"""
        t0 = time.perf_counter()
        grew = self.grower is not None and self.grower.grow_one_expansion(max_nodes, self._expand)
        return grew, time.perf_counter() - t0

    def _reroot(self, committed: Sequence[int]) -> dict | None:
        """If the last tree expanded the node the committed tokens end on, keep its subtree (memo and KV entries) as
        the start of the next tree; None when it did not."""
        g, kv = self.grower, self.tree
        if g is None or kv is None or list(committed[: kv.base]) != self.backend.tokens:
            return None
        suffix = tuple(committed[kv.base:])
        if not suffix or suffix not in g.memo:
            return None
        path = [g.memo[suffix[:i]][0] for i in range(1, len(suffix) + 1)]  # every ancestor of an expanded node was
        memo = subtree_memo(g.memo, suffix)                                  # expanded too
        if len(memo) - 1 + MAX_TREE_NODES_GROWN > kv.max_nodes:  # a bounded cache (llama.cpp's sequences) could not
            return None                                          # hold the kept nodes and a new tree's: start afresh
        moved = kv.reroot(path, [kv_i for key, (kv_i, _) in memo.items() if key])
        return {key: (moved[kv_i] if key else ROOT, cands) for key, (kv_i, cands) in memo.items()}

    def _expand(self, kv_parent: int, token: int, children_pos: int) -> tuple[int, list[tuple[float, int]]]:
        """One draft forward of a tree node (tree mask): its KV entry index and its children's candidates."""
        logits = host_array(self.tree.extend([token], [kv_parent])[-1], np.float32)  # [V]: after this node
        return len(self.tree.tokens) - 1, self._candidates(logits, children_pos, self.accept)

    def _q(self, logits: np.ndarray) -> np.ndarray:
        """The draft's processed distribution at the wire precision (as `draft` samples from it)."""
        return quantize(process_logits(logits, self.params), self.precision)

