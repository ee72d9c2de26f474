"""What the two split schemes share: only q(x) goes up with each draft; the cloud decides with the same coins as
dense verification knowing only q(x); after a rejection the edge samples the correction itself from a sparse
view of p (top-K, and in split-exact tail draws) sent down with the verdict."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from picospec.shared.codec import Precision, decode_probs, encode_probs, host_array
from picospec.shared.protocol import ProtocolError
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.schemes.base import Decision, OpenRejection, ResidualPayload, VerifyScheme

if TYPE_CHECKING:
    import torch


class SplitScheme(VerifyScheme):
    topk_precision = Precision.F32

    def encode_extras(self, batch: pb.DraftBatch, token_ids: Sequence[int], q_rows: Sequence[np.ndarray],
                      compress: bool) -> None:
        batch.draft_probs.extend(float(q[x]) for x, q in zip(token_ids, q_rows))

    def decode_extras(self, batch: pb.DraftBatch, vocab: int) -> list[Any]:
        k = len(batch.token_ids)
        if len(batch.draft_probs) != k:
            raise ValueError(f"{len(batch.draft_probs)} draft probabilities for {k} draft tokens")
        return list(batch.draft_probs)

    def decide(self, p: "torch.Tensor", extras: Sequence[Any], draft_ids: Sequence[int], seed: int,
               start_pos: int) -> Decision:
        from picospec.shared.verify import verify_split
        sv = verify_split(p, [float(x) for x in extras], draft_ids, seed, start_pos)
        if sv.bonus is not None:
            return Decision(sv.accepted, sv.bonus, False)
        return Decision(sv.accepted, None, True)

    def expected_token(self, p: "torch.Tensor", d: Decision, greedy: bool) -> int | None:
        # after a split rejection the edge samples the correction itself; greedily that is p's argmax
        if d.token is not None or not greedy:
            return d.token
        return int(p[d.accepted].argmax())

    def open_rejection(self, p_row: "torch.Tensor", pos: int, seed: int, top_k_n: int, tail_samples: int) -> OpenRejection:
        from picospec.shared.verify import top_k
        ids, vals = top_k(p_row, top_k_n)
        r = OpenRejection(p_row, ids, set(ids.tolist()))
        r.payload = ResidualPayload(encode_probs(sparse_row(ids, vals, p_row.shape[-1]), precision=self.topk_precision))
        return r


def decode_topk(v: pb.Verdict, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-K of p a rejection verdict carries: ids [K] and their probabilities [K]."""
    row = decode_probs(v.residual_payload, vocab_size=vocab, max_rows=1)[0]  # [V]
    ids = np.flatnonzero(row > 0)
    if len(ids) == 0:
        raise ProtocolError("empty top-K payload after a rejection")
    return ids, row[ids]


def check_tail_mass(mass: float) -> None:
    if not (math.isfinite(mass) and 0.0 <= mass <= 1.0):
        raise ProtocolError(f"tail mass {mass} is not a probability")


def sparse_row(ids: Any, vals: Any, vocab: int) -> np.ndarray:
    """[1, V] zeros but `vals` at `ids` (arrays or tensors on any device)."""
    row = np.zeros((1, vocab), dtype=np.float32)
    row[0, host_array(ids, np.int64)] = host_array(vals, np.float32)
    return row
