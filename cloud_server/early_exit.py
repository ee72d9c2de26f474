"""Early-exit hints (docs/design.md §4.5; the early-exit paper's system): what a verification pass expects from an
intermediate layer's tentative logits, before the full-depth result decides.

Pure functions over tensors. The prediction applies the same verification rule, with the same coins (they are
a pure function of seed and position), to the tentative distribution, so where tentative and final
distributions agree the hint equals the verdict. The hint never decides anything: the final pass does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from picospec.shared.sampling import SamplingParams, process_logits
from picospec.shared.schemes import VerifyScheme


@dataclass(frozen=True)
class ExpectedOutcome:
    accepted: int          # drafts the tentative result accepts
    token: int | None      # the token it expects after them; None where the edge samples it (split, sampling)
    confidence: float      # least tentative top-1 probability over rows 0..accepted


def expected_outcome(
    tentative_logits: torch.Tensor,
    params: SamplingParams,
    scheme: VerifyScheme,
    draft_ids: Sequence[int],
    extras: Sequence[Any],
    seed: int,
    start_pos: int,
) -> ExpectedOutcome:
    """The verdict a pass would give if the final logits were `tentative_logits` [k+1, V]."""
    k = len(draft_ids)
    if k < 1 or tentative_logits.shape[0] != k + 1:
        raise ValueError(f"{tentative_logits.shape[0]} tentative rows for {k} drafts (need k + 1, k >= 1)")
    p = process_logits(tentative_logits, params)  # [k+1, V]
    d = scheme.decide(p, extras, draft_ids, seed, start_pos)
    token = scheme.expected_token(p, d, params.greedy)
    top1 = torch.softmax(tentative_logits[: d.accepted + 1].float(), dim=-1).max(dim=-1).values
    return ExpectedOutcome(d.accepted, token, float(top1.min()))


def layer_agreement(final_logits: torch.Tensor, tentative_logits: torch.Tensor, thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Calibration: for each confidence threshold, the share of rows whose tentative top-1 probability passes
    it (coverage) and, among those, the share whose tentative argmax equals the final argmax (agreement)."""
    final_top = final_logits.argmax(-1)
    tent = torch.softmax(tentative_logits.float(), dim=-1)
    conf, tent_top = tent.max(dim=-1)
    agree = tent_top == final_top
    out = []
    for th in thresholds:
        sel = conf >= th
        n = int(sel.sum())
        out.append({"threshold": float(th), "coverage": n / max(1, conf.numel()),
                    "agreement": float(agree[sel].float().mean()) if n else float("nan")})
    return out
