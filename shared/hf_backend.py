"""transformers causal LMs as a model backend (shared/backend.py's interface): a DynamicCache over one sequence."""
from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from picospec.shared.backend import PrefixCache, fit_width

if TYPE_CHECKING:
    from picospec.shared.tree_cache import TreeKV


def cache_keyword(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache by: transformers 5.24 renamed `past_key_values` to `cache` (the
    old name warns until 5.40 drops it). Both the pinned version (constraints.txt) and later ones work."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFBackend(PrefixCache):
    """A transformers causal LM with a DynamicCache. Not thread-safe: one per session, one caller at a time."""

    supports_trees = True

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", logits_width: int = 0) -> None:
        """logits_width: the width the session speaks (the target's, see shared/fingerprint.py:session_logits_width)
        when this model's own differs: its logits are cut or padded with -inf to it, and an input id past its own
        width (a padding id the target emitted; the tokenizer never makes one) is fed as id 0. Only what this model
        proposes changes, never what verification accepts, so exactness does not depend on it."""
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        self.model = model
        self.device = torch.device(device)
        self.own_width = int(model.config.vocab_size)
        self.vocab_size = logits_width or self.own_width  # the logits width (may exceed the tokenizer's size)
        self.tokens: list[int] = []  # what the cache holds, position by position
        self.cache = None
        self.cache_keyword = cache_keyword(model)

    def reset(self) -> None:
        self.tokens = []
        self.cache = self._cache_cls(config=self.model.config)

    def tree(self, room: int = 0) -> "TreeKV":
        """Tree nodes after the cached tokens, in this cache (shared/tree_cache.py); room: unbounded here."""
        from picospec.shared.tree_cache import TreeKV

        return TreeKV(self)

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[int], num_logits: int = 0) -> torch.Tensor:
        """Append tokens to the cache; return float32 logits [n, V] for the last `num_logits` of them (0 = all)."""
        if self.cache is None:
            self.reset()
        n = len(token_ids)
        if n == 0:
            raise ValueError("forward needs at least one token")
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)  # [1, n]
        if self.vocab_size > self.own_width:
            ids = torch.where(ids < self.own_width, ids, 0)
        positions = torch.arange(self.length, self.length + n, device=self.device)
        out = self.model(
            input_ids=ids,
            **{self.cache_keyword: self.cache},
            use_cache=True,
            position_ids=positions.unsqueeze(0),
            cache_position=positions,
            logits_to_keep=num_logits if 0 < num_logits < n else 0,
        )
        self.tokens.extend(int(t) for t in token_ids)
        return fit_width(out.logits[0].float(), self.vocab_size)  # [n or num_logits, V]

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @contextlib.contextmanager
    def early_exit(self, layer: int, rows: int, on_logits: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """While active, every forward also computes tentative logits [rows, V] for its last `rows` positions
        from the hidden state after decoder layer `layer` (1-based) through the final norm and LM head, and
        hands them to `on_logits` before the remaining layers run. The forward's own result is unchanged."""
        if not 1 <= layer < self.num_layers:
            raise ValueError(f"exit layer {layer} outside 1..{self.num_layers - 1}")
        body = self.model.model

        def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # transformers 4 returns a tuple
            on_logits(self.model.lm_head(body.norm(hidden[0, -rows:])).float())

        handle = body.layers[layer - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _drop_after(self, length: int) -> None:
        self.cache.crop(length - self.length)  # negative = tokens to drop, in transformers 4 and 5
