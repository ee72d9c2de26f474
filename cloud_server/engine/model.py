"""The static engine's forward pass: a transformers Llama/Qwen2 model's own modules over a preallocated slot cache.

See cloud_server/engine/__init__.py for the terms (slot, row, bucket, eager). Shapes: B rows, n tokens per row,
H hidden size, h query heads, kvh key/value heads, hd head size, L = the cache's length per slot, V the vocab.
"""
from __future__ import annotations

from dataclasses import dataclass
import threading
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from picospec.cloud_server.engine.graphs import CapturedPass, capture_all
from picospec.shared.trees import ancestor_mask, depths_of

SUPPORTED_TYPES = ("llama", "qwen2")
PREFILL_CHUNK = 512  # eager passes longer than this run in pieces: the scores of one piece are [h, 512, L]


@dataclass(frozen=True)
class EngineOptions:
    slots: int = 2                                   # sequences held at once, the scratch slot included
    max_len: int = 4096                              # most tokens (prompt + generated) of one sequence
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # pass sizes captured as graphs (CUDA)
    batch_buckets: tuple[int, ...] = (1,)            # rows per captured pass (CUDA)
    graphs: bool = True                              # capture CUDA graphs; ignored on the CPU
    min_kv_bucket: int = 512                         # graphs read keys 0..K-1, K a power of two from this (or L)
    max_graph_tokens: int = 0                        # no graph for rows x bucket past this (0 = no cap): eager


ExitHook = tuple[int, int, Callable[[torch.Tensor], None]]  # (layer, rows, on_logits): see StaticEngine.early_exit


class Row(NamedTuple):
    """One sequence's part of a pass: tokens at cache positions start.., logits for the last `num_logits` (0 = all);
    `exit`: early-exit logits wanted from this row (the pass then runs eager, this row alone).
    `parents`: a token tree (shared/trees.py: ROOT = a child of what is cached before `start`): token i still goes
    to cache position start + i, but its rotary position is start + its depth, and it sees the cached prefix, its
    ancestors and itself. StaticEngine.compact then keeps one path."""

    slot: int
    token_ids: Sequence[int]
    start: int
    num_logits: int = 0
    exit: ExitHook | None = None
    parents: Sequence[int] | None = None


class PassInputs(NamedTuple):
    ids: torch.Tensor        # [B, n] token ids
    pos: torch.Tensor        # [B, n] rotary positions (a tree node's: the row's start + its depth)
    cache_pos: torch.Tensor  # [B, n] where each token's key and value go in its row's slot: start + i
    visible: torch.Tensor    # [B, n, n] bool: which of its row's own tokens each token sees (causal, or ancestors)
    slots: torch.Tensor      # [B] each row's slot


class SlotCache:
    """keys and values, one pair per layer, each [slots, kvh, L, hd]; L leaves room for a bucket's padding."""

    def __init__(self, layers: int, slots: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = length

    def write_and_read(self, layer: int, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n, kvh, hd] at (slot, position) and return each row's keys and values [B, kvh, kv_len, hd].

        Index writes and an index_select: no host sync, so the same code runs inside a captured graph."""
        ck, cv = self.keys[layer], self.values[layer]
        ck[slots[:, None], :, pos] = k  # advanced indices first: the target is [B, n, kvh, hd]
        cv[slots[:, None], :, pos] = v
        if kv_len < self.length:
            ck, cv = ck[:, :, :kv_len], cv[:, :, :kv_len]
        return ck.index_select(0, slots), cv.index_select(0, slots)


class SlotPool:
    """An engine's session slots 0..n-1: taken on the event loop, given back on job threads."""

    def __init__(self, n: int, what: str) -> None:
        self.n, self.what = n, what  # what: the slots' name in the error a full pool raises
        self._free = list(range(n))
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError(f"all {self.n} {self.what} are in use")
            return self._free.pop(0)

    @property
    def in_use(self) -> int:
        return self.n - len(self._free)

    @property
    def free(self) -> list[int]:
        """The slots not held, in the order they will be taken."""
        return list(self._free)

    def release(self, slot: int, before_free: Callable[[int], None] | None = None) -> None:
        """Give `slot` back; `before_free(slot)` runs once it is known held and before anyone can take it again."""
        with self._lock:
            if not 0 <= slot < self.n or slot in self._free:
                raise ValueError(f"slot {slot} is not held")
            if before_free is not None:
                before_free(slot)
            self._free.append(slot)


def check_row(r: Row, options: EngineOptions, scratch: int) -> None:
    """A clear ValueError for a row the cache cannot take."""
    if not 0 <= r.slot < options.slots or r.slot == scratch:
        raise ValueError(f"row slot {r.slot} is not a session slot")
    if not r.token_ids or r.start < 0 or r.start + len(r.token_ids) > options.max_len:
        raise ValueError(f"row of {len(r.token_ids)} tokens at {r.start}: outside the engine's max_len {options.max_len}")
    if len(r.token_ids) > PREFILL_CHUNK:
        raise ValueError(f"a row holds at most {PREFILL_CHUNK} tokens, not {len(r.token_ids)}")
    if not 0 <= r.num_logits <= len(r.token_ids):
        raise ValueError(f"a row of {len(r.token_ids)} tokens cannot give logits for {r.num_logits}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions, transformers' convention: x [B, heads, n, hd], cos/sin [B, 1, n, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StaticEngine:
    """The target's passes over a slot cache; on CUDA with graphs on, passes that fit a bucket replay a graph."""

    def __init__(self, model: nn.Module, options: EngineOptions = EngineOptions()) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"the static engine runs {', '.join(SUPPORTED_TYPES)} models, not {config.model_type!r}")
        if options.slots < 2:
            raise ValueError("the static engine needs at least 2 slots (one is scratch)")
        body = model.model
        self.model, self.body, self.options = model, body, options
        self.device = body.embed_tokens.weight.device
        self.dtype = body.embed_tokens.weight.dtype
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab_size = int(config.vocab_size)
        self.scratch = options.slots - 1
        margin = max(options.buckets, default=1)
        self.cache = SlotCache(config.num_hidden_layers, options.slots, config.num_key_value_heads,
                               options.max_len + margin, self.head_dim, self.dtype, self.device)
        self._key_index = torch.arange(self.cache.length, device=self.device)                 # [L]
        self._inv_freq = body.rotary_emb.inv_freq.to(self.device, torch.float32)              # [hd / 2]
        self._rope_scale = float(getattr(body.rotary_emb, "attention_scaling", 1.0))
        self.slot_pool = SlotPool(self.scratch, "engine slots")
        self._exit: ExitHook | None = None  # the running pass's early-exit hook (eager, one row)
        self.graphs: dict[tuple[int, int, int], CapturedPass] = {}  # (rows, bucket, keys read) -> its graph
        if self.device.type == "cuda":
            # cuDNN's attention failed ("mha_graph.execute ... is_good()", then a device-side assert) on an H100 for
            # a batch of prefill and decode rows under a boolean mask; the memory-efficient and math kernels take
            # any mask. Process-wide: the cloud process runs one engine.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if options.graphs and self.device.type == "cuda":
            self.graphs = capture_all(self)

    # ------------------------------------------------------------------------------------------------ slots
    def acquire(self) -> int:
        return self.slot_pool.acquire()

    @property
    def slots_in_use(self) -> int:
        """Session slots held now (each an open session's cache)."""
        return self.slot_pool.in_use

    @property
    def max_shared_row(self) -> int:
        """Rows longer than the largest graph bucket run in a pass of their own (cloud_server/engine/batcher.py:alone)."""
        return max(self.options.buckets, default=1)

    def release(self, slot: int) -> None:
        self.slot_pool.release(slot)

    def backend(self, logits_width: int = 0,
                passes: "Callable[[Row], tuple[torch.Tensor, float]] | None" = None) -> "StaticBackend":
        """A backend over a free slot; `passes` runs its rows (a Batcher's submit; default: this engine, at once)."""
        from picospec.cloud_server.engine.backend import StaticBackend
        return StaticBackend(self, self.acquire(), logits_width, passes)

    # ------------------------------------------------------------------------------------------------ passes
    @torch.inference_mode()
    def run(self, rows: Sequence[Row]) -> list[torch.Tensor]:
        """Each row's logits [num_logits or len(token_ids), V_own], float32, from one pass over all rows: a graph
        when one fits, else eager. Rows hold at most PREFILL_CHUNK tokens (StaticBackend cuts longer input)."""
        n = max(len(r.token_ids) for r in rows)
        for r in rows:
            check_row(r, self.options, self.scratch)
        hooks = [r.exit for r in rows if r.exit is not None]
        if hooks and len(rows) > 1:
            raise ValueError("a row with an early-exit hook runs alone")
        keys = max(r.start for r in rows) + n  # keys the pass reads: through the furthest row's padded end
        if len(rows) > 1 and keys > self.cache.length:  # padding would run off a slot
            return [self.run([r])[0] for r in rows]
        graph = None if hooks else self._graph_for(len(rows), n, keys)
        if graph is not None:
            return self._cut(rows, graph(self._padded(rows, graph.rows, graph.size)), graph.size)
        inputs = self._padded(rows, len(rows), n)
        if sum(len(r.token_ids) for r in rows) < len(rows) * n:  # rows of unequal length: leave the padding out
            real, wanted = self._packed(rows, n)
            logits = self.forward(inputs, keys, real=real, wanted=wanted)  # [K, V]
            per_row = [r.num_logits or len(r.token_ids) for r in rows]
            return [t.to(torch.float32, copy=True) for t in logits.split(per_row)]
        self._exit = hooks[0] if hooks else None
        try:
            logits = self.forward(inputs, keys, self._keep(rows))
        finally:
            self._exit = None
        return self._cut(rows, logits, n)

    def _graph_for(self, rows: int, n: int, keys: int) -> CapturedPass | None:
        """The smallest captured pass with room for `rows` rows of `n` tokens whose last position is keys - 1; a
        row's padding runs up to start + bucket - 1, so the keys read must cover that too."""
        fits = [k for k, g in self.graphs.items() if k[0] >= rows and k[1] >= n and k[2] >= keys - n + k[1]]
        return self.graphs[min(fits, key=lambda k: (k[1], k[2], k[0]))] if fits else None

    def kv_buckets(self) -> list[int]:
        """Key counts graphs are captured for: powers of two from min_kv_bucket, then the whole cache length."""
        out, k = [], self.options.min_kv_bucket
        while k < self.cache.length:
            out.append(k)
            k *= 2
        return out + [self.cache.length]

    def _padded(self, rows: Sequence[Row], height: int, width: int) -> PassInputs:
        """Each row's tokens then padding (id 0, positions running on, seeing what comes before); rows past the real
        ones are scratch. A tree row's rotary positions are its depths and its visibility its ancestors."""
        ids = torch.zeros(height, width, dtype=torch.long)
        cache_pos = torch.arange(width).repeat(height, 1)
        pos = cache_pos.clone()
        visible = torch.ones(width, width, dtype=torch.bool).tril().repeat(height, 1, 1)
        slots = torch.full((height,), self.scratch, dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.token_ids)
            ids[b, :n] = torch.tensor(list(r.token_ids), dtype=torch.long)
            cache_pos[b] += r.start
            pos[b] += r.start
            if r.parents is not None:
                depth = torch.tensor(depths_of(r.parents))
                pos[b, :n] = r.start + depth
                pos[b, n:] = r.start + int(depth.max()) + 1 + torch.arange(width - n)
                visible[b, :n, :n] = ancestor_mask(r.parents)
            slots[b] = r.slot
        ids = torch.where(ids < self.vocab_size, ids, 0)  # an id past the model's own width (padding) is fed as 0
        to = self.device
        return PassInputs(ids.to(to), pos.to(to), cache_pos.to(to), visible.to(to), slots.to(to))

    def _packed(self, rows: Sequence[Row], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices into a [B * n] padded pass: every row's real tokens [T], and the positions whose logits
        the rows want [K], row by row (a row's last num_logits, or all of its tokens)."""
        real, wanted = [], []
        for b, r in enumerate(rows):
            length = len(r.token_ids)
            real.extend(range(b * n, b * n + length))
            wanted.extend(range(b * n + length - (r.num_logits or length), b * n + length))
        return (torch.tensor(real, dtype=torch.long, device=self.device),
                torch.tensor(wanted, dtype=torch.long, device=self.device))

    @staticmethod
    def _keep(rows: Sequence[Row]) -> int:
        """Trailing positions whose logits some row needs (0 = all); rows are left-aligned, so count from the end."""
        n = max(len(r.token_ids) for r in rows)
        need = [n - len(r.token_ids) + (r.num_logits or len(r.token_ids)) for r in rows]
        return max(need) if max(need) < n else 0

    @staticmethod
    def _cut(rows: Sequence[Row], logits: torch.Tensor, n_pad: int) -> list[torch.Tensor]:
        """logits [B, m, V] over the last m of n_pad padded positions -> each row's own [k, V], float32 copies (a
        graph's output buffer is overwritten by its next replay)."""
        offset = n_pad - logits.shape[1]  # padded positions before the kept window
        out = []
        for b, r in enumerate(rows):
            end = len(r.token_ids) - offset  # just past the row's last real position, in the window
            k = r.num_logits or len(r.token_ids)
            out.append(logits[b, end - k:end].to(torch.float32, copy=True))
        return out

    @torch.inference_mode()
    def compact(self, slot: int, sources: Sequence[int], dest: int) -> None:
        """Move the keys and values at cache positions `sources` of `slot` to dest, dest + 1, ...: a tree's committed
        path into line after its pass (a gather, no recompute; the source is read whole before it is written)."""
        if not sources:
            return
        src = torch.tensor(list(sources), dtype=torch.long, device=self.device)
        for ck, cv in zip(self.cache.keys, self.cache.values):
            ck[slot, :, dest:dest + len(sources)] = ck[slot, :, src]
            cv[slot, :, dest:dest + len(sources)] = cv[slot, :, src]

    # ------------------------------------------------------------------------------------------------ the model
    def forward(self, x: PassInputs, kv_len: int, keep: int = 0, real: torch.Tensor | None = None,
                wanted: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, keep or n, V_own] in the model's dtype; keys past kv_len are not read (a graph's kv_len is
        its bucket's). Row b's query i sees the keys before the row's first cache position and, of the row's own,
        those `visible[b, i]` marks. Host-sync free, so the same code runs inside a captured graph.

        Packed (eager, rows of unequal length): `real` [T] and `wanted` [K] index the flat [B * n] positions (see
        _packed). The token-wise work (projections, MLP, LM head: nearly all of a pass) then runs on the T real
        tokens alone, and the logits are [K, V_own]. Padding still flows through attention, which is per row anyway;
        its keys land past its row's end, where no real query looks and the row's next pass writes."""
        n = x.ids.shape[1]
        h = self.body.embed_tokens(x.ids)                                  # [B, n, H]
        freqs = x.pos[..., None].float() * self._inv_freq                  # [B, n, hd / 2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]                # [B, 1, n, hd]
        cos = (angles.cos() * self._rope_scale).to(h.dtype)
        sin = (angles.sin() * self._rope_scale).to(h.dtype)
        rel = self._key_index[:kv_len][None, :] - x.cache_pos[:, :1]       # [B, kv_len]: key index within the row
        own = x.visible.gather(2, rel.clamp(0, n - 1)[:, None, :].expand(-1, n, -1))  # [B, n, kv_len]
        mask = ((rel < 0)[:, None, :] | (own & (rel < n)[:, None, :]))[:, None]       # [B, 1, n, kv_len]
        for i, layer in enumerate(self.body.layers):
            h = _add(h, self._attention(i, layer.self_attn, layer.input_layernorm(h), cos, sin, mask, x, kv_len, real),
                     real)
            h = _add(h, layer.mlp(layer.post_attention_layernorm(_take(h, real))), real)
            if self._exit is not None and i + 1 == self._exit[0]:  # eager only: run() takes no graph meanwhile
                self._exit[2](self.model.lm_head(self.body.norm(h[0, -self._exit[1]:])).float())
        if wanted is not None:
            return self.model.lm_head(self.body.norm(h.flatten(0, 1).index_select(0, wanted)))  # [K, V_own]
        if keep:
            h = h[:, -keep:]
        return self.model.lm_head(self.body.norm(h))                       # [B, keep or n, V_own]

    def _attention(self, layer: int, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, inputs: PassInputs, kv_len: int, real: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """The layer's attention output, [B, n, H]; packed (`real` [T]): [T, H], for the real tokens alone."""
        b, n, _ = x.shape
        hd = self.head_dim
        xs = _take(x, real)                                                # [B, n, H] or [T, H]
        q = _spread(attn.q_proj(xs), real, b, n).view(b, n, -1, hd).transpose(1, 2)  # [B, h, n, hd]
        k = _spread(attn.k_proj(xs), real, b, n).view(b, n, -1, hd).transpose(1, 2)  # [B, kvh, n, hd]
        v = _spread(attn.v_proj(xs), real, b, n).view(b, n, -1, hd)                   # [B, n, kvh, hd]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys, values = self.cache.write_and_read(layer, inputs.slots, inputs.cache_pos, k.transpose(1, 2), v,
                                                 kv_len)                  # [B, kvh, kv_len, hd]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # [B, h, n, hd]
        return attn.o_proj(_take(out.transpose(1, 2).reshape(b, n, -1), real))       # [B, n, H] or [T, H]


def _take(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """x [B, n, D] -> its real tokens [T, D] (packed), or x itself (padded)."""
    return x if real is None else x.flatten(0, 1).index_select(0, real)


def _spread(y: torch.Tensor, real: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
    """The inverse of _take: [T, D] back to [B, n, D], zeros at the padding (y itself when not packed)."""
    if real is None:
        return y
    return y.new_zeros(b * n, y.shape[-1]).index_copy_(0, real, y).view(b, n, -1)


def _add(h: torch.Tensor, delta: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """The residual: h + delta, where a packed delta [T, H] updates the real tokens alone (in place)."""
    if real is None:
        return h + delta
    return h.flatten(0, 1).index_add_(0, real, delta).view_as(h)
