"""split-topk (the PicoSpec paper's sampler), APPROXIMATE: on a rejection the cloud sends the top-K of p in half
precision and the edge samples the correction from norm(max(0, norm(topK(p)) - q)). Tokens outside the top-K can
never be the correction and the residual is mis-weighted, so the output law is not exactly p."""
from __future__ import annotations

import numpy as np

from picospec.shared.codec import Precision
from picospec.shared.draws import resample_topk
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.schemes.base import MoreTail, RunModel
from picospec.shared.schemes.split import SplitScheme, decode_topk


class SplitTopK(SplitScheme):
    name = "split-topk"
    exact = False
    topk_precision = Precision.F16  # plenty for a sampler that is approximate anyway

    async def resolve(self, v: pb.Verdict, q_row: np.ndarray, seed: int, pos: int, vocab: int, run_model: RunModel,
                      more_tail: MoreTail) -> int:
        ids, vals = decode_topk(v, vocab)
        return await run_model(resample_topk, q_row, ids, vals, seed, pos)
