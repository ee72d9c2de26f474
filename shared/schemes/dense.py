"""dense (vanilla): each draft token goes up with the draft's whole distribution q; the cloud runs standard
rejection sampling and sends its own token (correction or bonus). Exact; the heavy baseline on the wire."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from picospec.shared.codec import decode_probs, encode_probs
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.schemes.base import Q_SUM_TOLERANCE, Decision, VerifyScheme

if TYPE_CHECKING:
    import torch


class Dense(VerifyScheme):
    name = "dense"

    def encode_extras(self, batch: pb.DraftBatch, token_ids: Sequence[int], q_rows: Sequence[np.ndarray],
                      compress: bool) -> None:
        if q_rows:
            batch.q_payload = encode_probs(np.stack(list(q_rows)), compress=compress)  # [k, V]

    def decode_extras(self, batch: pb.DraftBatch, vocab: int) -> list[Any]:
        import torch
        k = len(batch.token_ids)
        if not k:
            return []
        q = decode_probs(batch.q_payload, vocab_size=vocab, max_rows=k, max_sum_error=Q_SUM_TOLERANCE)  # [k, V]
        if q.shape[0] != k:
            raise ValueError(f"q payload has {q.shape[0]} rows for {k} draft tokens")
        return list(torch.from_numpy(q))

    def decide(self, p: "torch.Tensor", extras: Sequence[Any], draft_ids: Sequence[int], seed: int,
               start_pos: int) -> Decision:
        import torch
        from picospec.shared.verify import verify_dense
        v = verify_dense(p, torch.stack(list(extras)), draft_ids, seed, start_pos)
        return Decision(v.accepted, v.token, v.rejected)
