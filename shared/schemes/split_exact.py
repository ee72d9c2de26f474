"""split-exact: on a rejection the cloud sends the top-K of p exactly, p's mass outside it, and a few draws from
p conditioned on lying outside the top-K. The edge samples the residual norm(max(0, p - q)) by rejection: propose
y ~ p (from the top-K in proportion, or the next tail draw), accept with probability max(0, 1 - q(y)/p(y)). If the
draws run out it asks for more (`TailRequest`). The accepted y is exactly residual-distributed."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from picospec.shared.codec import decode_list, encode_list
from picospec.shared.draws import NeedMoreTail, ResidualHint, resample_exact
from picospec.shared.protocol import ProtocolError
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.schemes.base import MAX_TAIL_DRAWS, MoreTail, OpenRejection, ResidualPayload, RunModel
from picospec.shared.schemes.split import SplitScheme, check_tail_mass, decode_topk

if TYPE_CHECKING:
    import torch


class SplitExact(SplitScheme):
    name = "split-exact"

    def open_rejection(self, p_row: "torch.Tensor", pos: int, seed: int, top_k_n: int, tail_samples: int) -> OpenRejection:
        r = super().open_rejection(p_row, pos, seed, top_k_n, tail_samples)
        kept = p_row[r.topk_ids].double().sum()
        tail_mass = max(0.0, float(p_row.double().sum() - kept))
        first = self.more_tail(r, pos, 0, seed, tail_samples)
        r.payload = ResidualPayload(r.payload.topk, tail_mass, first)
        return r

    def more_tail(self, r: OpenRejection, pos: int, have: int, seed: int, tail_samples: int) -> bytes:
        """Tail draws have .. have+n-1 at the open position (n at least doubles with each request)."""
        from picospec.shared.verify import tail_draws
        if have != r.tails_sent:
            raise ProtocolError(f"edge has {have} tail draws, cloud sent {r.tails_sent}")
        n = min(max(tail_samples, have), MAX_TAIL_DRAWS - have)
        if n <= 0:
            raise ProtocolError(f"more than {MAX_TAIL_DRAWS} tail draws requested at one position")
        ids, vals = tail_draws(r.p_row, r.topk_ids, seed, pos, have, n)
        r.tails_sent += len(ids)
        r.allowed.update(ids.tolist())
        return encode_list(ids, vals, r.p_row.shape[-1])

    async def resolve(self, v: pb.Verdict, q_row: np.ndarray, seed: int, pos: int, vocab: int, run_model: RunModel,
                      more_tail: MoreTail) -> int:
        ids, vals = decode_topk(v, vocab)
        check_tail_mass(v.tail_mass)
        tail_ids, tail_vals = decode_list(v.tail_payload, vocab_size=vocab, max_len=MAX_TAIL_DRAWS) if v.tail_payload \
            else (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        while True:
            hint = ResidualHint(ids, vals, v.tail_mass, tail_ids, tail_vals)
            try:
                return await run_model(resample_exact, q_row, hint, seed, pos)
            except NeedMoreTail as e:
                more_ids, more_vals = await more_tail(e.have)
                if len(more_ids) == 0 or len(tail_ids) + len(more_ids) > MAX_TAIL_DRAWS:
                    raise ProtocolError("the cloud sent no further tail draws") from None
                tail_ids, tail_vals = np.concatenate([tail_ids, more_ids]), np.concatenate([tail_vals, more_vals])
