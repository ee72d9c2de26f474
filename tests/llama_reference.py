"""An independent reference for the llama.cpp engine: llama-cpp-python's own high-level `Llama` over the same GGUF.

Nothing of picospec's llama.cpp backend (shared/llama_backend.py) is used: `Llama` makes its own context, batches and
logits buffer. Its greedy generation is what `--mode cloud --engine llama.cpp` must reproduce token for token, and its
teacher-forced logits are the law the law tests (tests/law.py) hold the llama.cpp target to.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from picospec.shared.llama_backend import llama_cpp_module


@dataclass
class _Logits:
    logits: torch.Tensor  # [1, n, V]


# How far llama.cpp's logits at a position move with the batch it ran in (one token, a few, the whole sequence),
# measured as the largest |difference| over the vocabulary: SmolLM2 Q4_1 up to 0.44, Qwen2.5-1.5B Q4_K_M up to 0.65
# with llama.cpp's AVX2 code (shared/llama_backend.py); with its AVX-512 code most tree nodes (a sequence of their own
# in a unified cache) equal a fresh linear forward exactly, and the rest moved by up to 1.16, while a node that saw
# one token more is off by 2.8 or more (random trees over SmolLM2; 2.3 with the AVX2 code). A greedy token within
# this of the top logit is the target's argmax up to that noise.
BATCH_NOISE = 1.25


class LlamaReference:
    """`Llama(path)` with every position's logits kept; callable like a transformers model (tests/law.py)."""

    def __init__(self, path: Path, n_ctx: int = 1024) -> None:
        from llama_cpp import Llama

        llama_cpp_module()  # the wheel's CPU code registered first

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_gpu_layers=0, logits_all=True,
                         verbose=False)

    def __call__(self, seq: torch.Tensor) -> _Logits:
        """Teacher-forced logits of seq [1, n]: [1, n, V] float32."""
        ids = seq[0].tolist()
        self.llm.reset()
        self.llm.eval(ids)
        scores = np.array(self.llm.scores[: len(ids)], dtype=np.float32)   # [n, V]
        return _Logits(torch.from_numpy(scores)[None])

    def top_gaps(self, prompt_ids: list[int], tokens: list[int]) -> list[float]:
        """For each generated token, how far its logit lies below the top logit at its position (one teacher-forced
        pass): 0 where it is the argmax."""
        logits = self(torch.tensor([list(prompt_ids) + list(tokens)])).logits[0, len(prompt_ids) - 1: -1]  # [G, V]
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        return (logits.max(-1).values - chosen).tolist()

    def greedy(self, prompt_ids: list[int], n: int) -> list[int]:
        """n tokens of llama.cpp's own greedy decoding after prompt_ids (its sampler chain at temperature 0)."""
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                       reset=True):
            out.append(int(token))
            if len(out) == n:
                break
        return out
