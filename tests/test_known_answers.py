"""Each built-in's converted weights against known answers taken once from its GGUF by an independent loader.

Every other test takes its reference from the model that `load_model` returns, i.e. from transformers' GGUF
conversion (shared/models.py `_convert`); a mis-conversion would pass them all. tests/data/known_answers.json
was written by scripts/gguf_reference.py: gguf-py's reader and dequantizer plus a numpy float64 forward pass,
no transformers, no picospec conversion or tokenizer (see that script's docstring). Here our float32 model runs
the same prompt ids and must give the same top-10 and the same logits.

Tolerance: observed max |our logit - known answer| over the top-10 and probe ids was 1.05e-5 (SmolLM2-135M),
6.0e-6 (Qwen2.5-Coder-0.5B) and 7.9e-6 (Qwen2.5-Coder-1.5B), for logits up to ~22: float32 rounding against
float64. ATOL = 3e-4 is ~30x the worst of these, room for other BLAS kernels and thread counts (float32
accumulation order), and below what planted conversion bugs did (measured once, not part of this file): one
layer's q_proj scaled by 1.01 moved these logits by 1.7e-3 to 2.7e-2, one down_proj scaled by 1.001 by 6.7e-4
to 1.1e-3; the unpermuted llama Q/K (wrong rotary pairing), a dropped Qwen q bias, or the embedding used as
Qwen's output matrix by 0.26 to 8 and change the top-10 as well.
"""
from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from picospec.shared.models import BUILTIN_MODELS, MANIFEST, cache_root, load_model
from tests.conftest import skip_large, skip_or_fail

DATA = Path(__file__).parent / "data" / "known_answers.json"
ATOL = 3e-4
MODELS = [
    pytest.param("smollm2-135m-instruct"),
    pytest.param("qwen2.5-coder-0.5b-instruct", marks=skip_large),
    pytest.param("qwen2.5-coder-1.5b-instruct", marks=skip_large),
]


@functools.cache
def _known() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def _entry(name: str) -> dict[str, Any]:
    entry = _known()["models"].get(name)
    assert entry is not None, f"{DATA} has no known answer for {name}: run scripts/gguf_reference.py {name}"
    return entry


@functools.cache
def _ours(name: str) -> tuple[np.ndarray, list[int]]:
    """Our last-position logits (float64 copy) on the stored prompt ids, and our tokenizer's ids for the stored
    pieces. One load per model per session; the model is dropped afterwards so the three never coexist."""
    converted = cache_root() / "models" / name
    if not (converted / MANIFEST).is_file():
        skip_or_fail(f"{name} is not prepared ({converted} has no {MANIFEST}): run `make models`")
    entry = _entry(name)
    loaded = load_model(name, progress=False)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([entry["prompt_ids"]])).logits[0, -1]
    piece_ids = loaded.tokenizer.convert_tokens_to_ids(entry["prompt_pieces"])
    return logits.double().numpy().copy(), list(piece_ids)


def test_every_builtin_has_a_current_known_answer() -> None:
    for name, spec in BUILTIN_MODELS.items():
        assert _entry(name)["gguf_sha256"] == spec.sha256, (
            f"{name}: known answer is for another GGUF; rerun scripts/gguf_reference.py {name} --out {DATA}")


@pytest.mark.parametrize("name", MODELS)
def test_prompt_pieces_are_the_same_ids_in_our_vocabulary(name: str) -> None:
    entry = _entry(name)
    assert _ours(name)[1] == entry["prompt_ids"], entry["prompt_pieces"]


@pytest.mark.parametrize("name", MODELS)
def test_top10_matches_known_answer(name: str) -> None:
    """Same set of 10 ids; where our order differs, the known logits of the swapped ids are within 2*ATOL."""
    logits, _ = _ours(name)
    known = {t["id"]: t["logit"] for t in _entry(name)["top10"]}
    ours = [int(i) for i in np.argsort(-logits, kind="stable")[:len(known)]]
    assert set(ours) == set(known), f"ours {ours}, known {list(known)}"
    for a, b in itertools.combinations(ours, 2):  # we rank a above b
        assert known[b] <= known[a] + 2 * ATOL, f"{name}: we rank {a} above {b}; known logits {known[a]}, {known[b]}"


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_known_answer(name: str) -> None:
    """The top-10 and probe ids' logits within ATOL; the whole vocabulary's mean and std too (a wrong row far
    from the top, e.g. in the output matrix, still moves them)."""
    logits, _ = _ours(name)
    entry = _entry(name)
    recorded = {t["id"]: t["logit"] for t in entry["top10"] + entry["probes"]}
    ids = np.array(list(recorded))
    diff = np.abs(logits[ids] - np.array(list(recorded.values())))
    worst = int(ids[diff.argmax()])
    assert diff.max() <= ATOL, f"{name}: max |logit diff| {diff.max():.3g} at id {worst} (ATOL {ATOL})"
    assert abs(logits.mean() - entry["logits_mean"]) <= ATOL, (logits.mean(), entry["logits_mean"])
    assert abs(logits.std() - entry["logits_std"]) <= ATOL, (logits.std(), entry["logits_std"])
