"""The draft model's side of a session: propose tokens from the committed prefix. Runs in the edge executor."""
from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from picospec.shared.backend import HFBackend
from picospec.shared.codec import Precision, quantize
from picospec.shared.rng import Stream
from picospec.shared.sampling import SamplingParams, process_logits, sample_token
from picospec.shared.rng import gumbel_noise
from picospec.shared.tree_cache import TreeKV
from picospec.shared.trees import ROOT, match_path
from picospec.shared.verify import gumbel_argmax


@dataclass(frozen=True)
class DraftTree:
    """A token tree as it travels (shared/trees.py): node i is tokens[i] under parents[i] (-1: the committed prefix)."""

    tokens: list[int]
    parents: list[int]
    steps: int        # draft-model forwards it took (the root's and one per expanded node)
    compute_s: float


TREE_WIDTH = 4  # candidates considered under each expanded node: its Gumbel-max choice and the next best


@dataclass(frozen=True)
class DraftResult:
    token_ids: list[int]
    q: torch.Tensor  # [k, V] the distributions the tokens were drawn from, as the cloud will see them
    compute_s: float


class Drafter:
    def __init__(self, model: torch.nn.Module, params: SamplingParams, device: str = "cpu",
                 precision: Precision = Precision.F32, gumbel: bool = False, logits_width: int = 0) -> None:
        self.backend = HFBackend(model, device, logits_width)  # the target's width when the draft's differs
        self.params = params
        self.precision = precision
        self.gumbel = gumbel  # coupled mode: Gumbel-max with the noise the cloud will use
        self.tree: TreeKV | None = None  # the last tree's expanded nodes, still in the cache until the verdict's path is known

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def prefill(self, prompt_ids: Sequence[int]) -> float:
        t0 = time.perf_counter()
        self.tree = None
        self.backend.reset()
        if len(prompt_ids) > 1:
            self.backend.forward(prompt_ids[:-1], num_logits=1)
        return time.perf_counter() - t0

    def _settle_tree(self, committed: Sequence[int]) -> None:
        """Keep the last tree's cached nodes along the path the committed tokens took (a gather), drop the others."""
        tree, self.tree = self.tree, None
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
        tokens, keep = self.backend.tokens, 0
        limit = min(len(tokens), len(committed) - 1)
        while keep < limit and tokens[keep] == committed[keep]:
            keep += 1
        self.backend.truncate(keep)

    @torch.inference_mode()
    def draft(self, committed: Sequence[int], k: int, stream: Stream = Stream.DRAFT) -> DraftResult:
        """Sample k tokens after `committed`; the cache rolls back to the committed prefix by itself."""
        t0 = time.perf_counter()
        self._settle_tree(committed)
        seq = list(committed)
        rows = []
        for _ in range(k):
            logits = self.backend.logits_at(seq, len(seq) - 1)[-1]
            # sample from exactly what the cloud will decode, so the maths holds at any wire precision
            q = quantize(process_logits(logits, self.params), self.precision)
            pos = len(seq)
            seq.append(gumbel_argmax(q, self.params.seed, pos) if self.gumbel else sample_token(q, self.params.seed, pos, stream))
            rows.append(q)
        q_rows = torch.stack(rows) if rows else torch.zeros(0, self.vocab_size)
        return DraftResult(seq[len(committed):], q_rows, time.perf_counter() - t0)

    def _candidates(self, logits: torch.Tensor, pos: int, accept: float) -> list[tuple[float, int]]:
        """(weight, token) of the best TREE_WIDTH tokens at `pos`: the coupled choice argmax(log q' + G) first, then the
        next best under the same noise (greedy: by the logits, G = 0). The choice's weight is the measured acceptance
        (with shared noise the cloud usually makes the same choice, however small q' of it is); the alternatives
        share the rest in proportion to q (where the two differ, the cloud's choice is most likely among them)."""
        q = self._q(logits)
        if self.params.temperature == 0.0:  # q' is one-hot: rank by the logits, which is what G = 0 does
            q_rank = torch.softmax(logits.double(), dim=-1)
            support = torch.arange(len(q_rank))
            scores = torch.log(q_rank)
        else:
            q_rank = q
            support = torch.nonzero(q > 0).flatten()
            scores = torch.log(q[support].double()) + gumbel_noise(self.params.seed, pos, support)
        best = torch.argsort(scores, descending=True)[:TREE_WIDTH]
        ids = [int(support[i]) for i in best]
        alt_mass = sum(float(q_rank[t]) for t in ids[1:]) or 1.0
        return [(accept, ids[0])] + [((1.0 - accept) * float(q_rank[t]) / alt_mass, t) for t in ids[1:]]

    @torch.inference_mode()
    def draft_tree(self, committed: Sequence[int], budget: int, max_depth: int, stop_ids: frozenset[int],
                   accept: float = 0.6) -> DraftTree:
        """Grow a token tree of up to `budget` nodes after `committed` (coupled mode): first the main chain (the
        coupled choices, ceil(budget / 2) levels), so that a tree commits at least what that chain would; then, best
        first, the alternatives and their continuations, by value: the product of the weights along the path
        (`_candidates`; `accept`: the measured acceptance), the draft's guess of how likely the cloud's walk reaches
        a node. A node is expanded (one draft forward, tree mask) only when its children are wanted, so no forward is
        spent on a leaf. The expanded nodes stay cached until the next call keeps the committed path among them."""
        t0 = time.perf_counter()
        self._settle_tree(committed)
        base, main_levels = len(committed), (budget + 1) // 2
        root_logits = self.backend.logits_at(list(committed), base - 1)[-1]  # [V]
        kv = self.tree = TreeKV(self.backend)
        tokens: list[int] = []
        parents: list[int] = []
        depth: list[int] = []
        kv_index: dict[int, int] = {}  # tree node -> its entry in `kv` (expanded nodes only)
        # entries (priority, order, parent or node, token or -1 = expand that node, value, on the main chain);
        # the main chain's entries come first (priority -inf), in order
        heap: list[tuple[float, int, int, int, float, bool]] = []
        count = itertools.count()

        def push_children(node: int, logits: torch.Tensor, value: float, main: bool) -> None:
            d = 0 if node == ROOT else depth[node] + 1
            for rank, (w, t) in enumerate(self._candidates(logits, base + d, accept)):
                on_main = main and rank == 0 and d < main_levels
                heapq.heappush(heap, (-math.inf if on_main else -value * w, next(count), node, t, value * w, on_main))

        push_children(ROOT, root_logits, 1.0, True)
        steps = 1
        while heap and len(tokens) < budget:
            _, _, node, tok, value, main = heapq.heappop(heap)
            if tok >= 0:  # add a node; its children are wanted only if it is popped again, as an expansion
                tokens.append(tok)
                parents.append(node)
                depth.append(0 if node == ROOT else depth[node] + 1)
                if depth[-1] + 1 < max_depth and tok not in stop_ids:
                    heapq.heappush(heap, (-math.inf if main else -value, next(count), len(tokens) - 1, -1, value, main))
                continue
            kv_parent = ROOT if parents[node] == ROOT else kv_index[parents[node]]
            logits = kv.extend([tokens[node]], [kv_parent])[-1]  # [V]: after this node
            kv_index[node] = len(kv.tokens) - 1
            steps += 1
            push_children(node, logits, value, main)
        return DraftTree(tokens, parents, steps, time.perf_counter() - t0)

    def _q(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's processed distribution at the wire precision (as `draft` samples from it)."""
        return quantize(process_logits(logits, self.params), self.precision)
