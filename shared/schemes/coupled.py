"""coupled (token ids only): both sides draw with the same Gumbel noise G(seed, position, token); the draft
proposes argmax(log q' + G), the cloud emits argmax(log p' + G) and accepts drafts while they are equal. The output
token is always the target's own sample, so the result is exactly p-distributed whatever the draft does."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from picospec.shared.schemes.base import Decision, VerifyScheme

if TYPE_CHECKING:
    import torch


class Coupled(VerifyScheme):
    name = "coupled"
    gumbel_drafts = True
    own_token_is_verdicts = True
    supports_trees = True  # the walk needs only ids: the cloud's own choice at each node (shared/trees.py)

    def decide(self, p: "torch.Tensor", extras: Sequence[Any], draft_ids: Sequence[int], seed: int,
               start_pos: int) -> Decision:
        from picospec.shared.verify import verify_coupled
        v = verify_coupled(p, draft_ids, seed, start_pos)
        return Decision(v.accepted, v.token, v.rejected)
