"""One session's target-side model work: prefill, verify a draft run, decode one token, settle the cache.

Every method that touches the model or the KV cache runs on the model worker's thread (cloud_server/worker.py);
the session (cloud_server/session.py) calls them only through the worker. Knows nothing about gRPC or the queue.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from picospec.cloud_server.drafts import DraftRun
from picospec.cloud_server.early_exit import ExpectedOutcome, expected_outcome
from picospec.shared.backend import PrefixCache, make_backend
from picospec.shared.protocol import ProtocolError
from picospec.shared.rng import Stream
from picospec.shared.sampling import SamplingParams, process_logits, sample_token
from picospec.shared.schemes import OpenRejection, scheme
from picospec.shared.trees import ROOT, verify_coupled_tree
from picospec.shared.verify import gumbel_argmax, verify_greedy

log = logging.getLogger("picospec.cloud")


@dataclass(frozen=True)
class PassOutcome:
    """The verification of one draft run, before it is committed (that happens on the event loop)."""

    accepted: int
    token: int | None        # correction, or bonus when every draft was accepted; None after a split rejection
    rejected: bool
    compute_s: float  # the session's own model time (its share of a pass batched with others: TargetCache._clock)
    rejection: "OpenRejection | None" = None  # split modes: what goes down, kept open until the correction arrives
    path: tuple[int, ...] = ()  # a token tree: the committed nodes, root to deepest


def on_cpu(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The verification maths (sampling, the schemes, the codec) runs on the CPU, as tested, whatever device ran
    the pass: one copy of the pass's logits [n, V] (0.6 MB a row for Qwen), small beside a GPU pass. llama.cpp's
    logits come as a numpy array, taken as a tensor without a copy."""
    if isinstance(logits, np.ndarray):
        return torch.from_numpy(logits)
    return logits if logits.device.type == "cpu" else logits.cpu()


class TargetCache:
    """The target model over one session's KV cache, with the split modes' open residual."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: SamplingParams,
        verify_mode: str,
        device: str = "cpu",
        residual_top_k: int = 10,
        tail_samples: int = 4,
        exit_layer: int = 0,
        exit_threshold: float = 1.0,
        backend: PrefixCache | None = None,
        n_ctx: int = 0,
    ) -> None:
        # a slot of the static engine (--engine static), else a cache over `model` of its own: transformers', or a
        # llama.cpp context sized to the session's n_ctx tokens (--engine llama.cpp)
        self.backend = backend if backend is not None else make_backend(model, device, n_ctx=n_ctx)
        self.exit_layer = exit_layer          # early-exit hints after this layer (0 = none)
        self.exit_threshold = exit_threshold  # ... when the tentative confidence reaches this
        self.params = params
        self.residual_top_k = residual_top_k
        self.tail_samples = tail_samples
        self.scheme = scheme(verify_mode) if verify_mode else None  # None: cloud-only decoding
        self.open_rejection: OpenRejection | None = None

    def _clock(self) -> float:
        """Seconds on this session's model clock: wall time less what its forwards spent on other sessions' model
        work (queued behind them, their rows of a shared pass), so a pass's compute_s is its own share."""
        return time.perf_counter() - self.backend.waited_s

    def prefill(self, prompt: list[int]) -> float:
        """Cache the prompt but its last token (that one is fed with the first drafts)."""
        t0 = self._clock()
        self.backend.reset()
        if len(prompt) > 1:
            self.backend.forward(prompt[:-1], num_logits=1)
        return self._clock() - t0

    def prefill_with_first_token(self, prompt: list[int]) -> tuple[int, float]:
        """The first token at once: the whole prompt cached and the first token decoded from its last position, in
        one pass; the cache then holds the committed tokens but the newest, as `settle` leaves it."""
        self.backend.reset()
        return self.decode_next(prompt)

    def close(self) -> None:
        """Give back what the backend holds (the static engine's slot); on the model worker, after the last pass."""
        self.backend.close()

    def check_resolved(self, token: int) -> None:
        """Split modes: the edge's correction must come from what we sent (top-K or tail draws)."""
        if self.open_rejection is None:
            raise ProtocolError(f"resolved token {token} is not among the candidates the cloud sent")
        self.open_rejection.check(token)
        self.open_rejection = None

    @torch.inference_mode()
    def verify_run(self, committed: list[int], run: DraftRun,
                   on_hint: Callable[[ExpectedOutcome], None] | None = None) -> PassOutcome:
        """Verify a run of drafts at committed_len.. in one forward pass. Runs in the model executor and
        touches only the KV cache: `committed` is a snapshot, and the commit happens on the event loop.
        With an exit layer, `on_hint` gets the tentative outcome mid-pass when it is confident enough."""
        t0 = self._clock()
        draft_ids, seed, start = run.token_ids, self.params.seed, run.start_pos
        if start != len(committed):
            raise ProtocolError(f"internal: run at {start}, committed length {len(committed)}")
        if run.parents is not None:
            return self._verify_tree(committed, run, t0)
        hinting = contextlib.nullcontext()
        if self.exit_layer and on_hint is not None and draft_ids:
            def tentative(logits: torch.Tensor) -> None:  # [k+1, V] after the exit layer
                try:
                    e = expected_outcome(on_cpu(logits), self.params, self.scheme, draft_ids, run.extras, seed, start)
                except ValueError as bad:  # the edge's input (e.g. a q(x) outside (0, 1]): the pass's own decide
                    log.debug("no early-exit hint: %s", bad)  # refuses it (INVALID_ARGUMENT); no traceback per batch
                    return
                except Exception:  # noqa: BLE001 - a hint is advice: never let it break the pass
                    log.exception("early-exit hint failed")
                    return
                if e.confidence >= self.exit_threshold:
                    on_hint(e)
            hinting = self.backend.early_exit(self.exit_layer, len(draft_ids) + 1, tentative)
        with hinting:
            logits = self.backend.logits_at(committed + draft_ids, len(committed) - 1)  # [k+1, V]
        if self.params.greedy and self.scheme.own_token_is_verdicts:  # coupled at T=0: every row's p is one-hot
            v = verify_greedy(logits.argmax(-1).tolist(), draft_ids)      # [k+1] argmaxes, on the pass's device
            return PassOutcome(v.accepted, v.token, v.rejected, self._clock() - t0)
        p = process_logits(on_cpu(logits), self.params)
        d = self.scheme.decide(p, run.extras, draft_ids, seed, start)
        opened = None
        if d.rejected and d.token is None:  # a split rejection: the edge samples the correction from what we send
            opened = self.scheme.open_rejection(p[d.accepted], start + d.accepted, seed, self.residual_top_k,
                                                self.tail_samples)
        return PassOutcome(d.accepted, d.token, d.rejected, self._clock() - t0, opened)

    @property
    def supports_trees(self) -> bool:
        """Token trees need a cache that can mask per node and keep a path: transformers' DynamicCache
        (shared/tree_cache.py), a static engine slot (cloud_server/engine/backend.py) or llama.cpp's sequences
        (shared/llama_tree.py)."""
        return self.backend.supports_trees

    def _verify_tree(self, committed: list[int], run: DraftRun, t0: float) -> PassOutcome:
        """A token tree in one forward pass (tree attention mask), the coupled walk, then the cache keeps only the
        committed path: a gather of its entries (shared/tree_cache.py), no recompute."""
        b = self.backend
        keep = b.keep_shared(committed, len(committed) - 1)  # as logits_at: the newest committed token is fed again
        rest = committed[keep:]  # >= 1 token: a chain ahead of the tree, whose last one the tree's roots hang on
        parents = [ROOT] + list(range(len(rest) - 1)) + [len(rest) - 1 if p == ROOT else p + len(rest)
                                                         for p in run.parents]
        kv = b.tree(room=len(rest) + len(run.token_ids))
        logits = kv.extend(rest + run.token_ids, parents)[len(rest) - 1:]  # [n+1, V]: the root's row, then each node's
        walk = verify_coupled_tree(process_logits(on_cpu(logits), self.params), run.token_ids, run.parents, self.params.seed,
                                   run.start_pos)
        kv.keep(list(range(len(rest))) + [i + len(rest) for i in walk.path])
        return PassOutcome(len(walk.path), walk.token, walk.rejected, self._clock() - t0, path=walk.path)

    @torch.inference_mode()
    def decode_next(self, committed: list[int]) -> tuple[int, float]:
        """One token from p after `committed` (decode-ahead): the same coin a bonus token there would use."""
        t0 = self._clock()
        logits = self.backend.logits_at(committed, len(committed) - 1)  # [1, V], on the pass's device
        if self.params.greedy:  # p is one-hot at the argmax, so every draw from it is that token: no V-wide work
            return int(logits[0].argmax()), self._clock() - t0
        p = process_logits(on_cpu(logits), self.params)[0]
        if self.scheme is not None and self.scheme.own_token_is_verdicts:  # coupled: the Gumbel-max token a pass emits
            return gumbel_argmax(p, self.params.seed, len(committed)), self._clock() - t0
        return sample_token(p, self.params.seed, len(committed), Stream.TARGET), self._clock() - t0

    def settle(self, committed_len: int) -> None:
        """Keep exactly the committed tokens but the newest (it is fed with the next drafts): O(1)."""
        self.backend.truncate(min(self.backend.length, max(0, committed_len - 1)))

    def more_tail(self, pos: int, have: int, committed_len: int) -> bytes:
        """split-exact: further tail draws at the open rejection, which must be at the committed length."""
        if self.open_rejection is None or pos != committed_len:
            raise ProtocolError(f"no open split-exact rejection at position {pos}")
        return self.scheme.more_tail(self.open_rejection, pos, have, self.params.seed, self.tail_samples)
