#!/usr/bin/env python3
"""Known answers for the built-in models, computed from the GGUF by a loader independent of ours.

PicoSpec turns each built-in's GGUF into a float32 safetensors copy with transformers' own GGUF loader
(`_convert` in shared/models.py), and every other test takes its reference from that converted model, so a
mis-conversion (a wrong Q/K un-permutation, a dropped bias, the wrong output matrix, a bad dequantizer) would
pass them all. This script is the independent side of the check:

  * independent of transformers and of shared/models.py's conversion and tokenizer: the GGUF is read with the
    `gguf` package (gguf-py, llama.cpp's own reader), each tensor dequantized by `gguf.quants.dequantize`, and
    the decoder forward pass is written here in numpy (float64 activations over float32 dequantized weights).
    Hyperparameters (heads, kv heads, rope theta, rms eps, ...) come from the GGUF metadata only;
  * NOT independent of: the pinned part list and sha256 (`BUILTIN_MODELS`, `_locate_parts`), used only to find
    the bytes; the assembled file is hashed here again and must match the pin. And of numpy and gguf-py.

Rotary convention, as llama.cpp applies it (llama_model_rope_type): for `llama` GGUFs (SmolLM2) llama.cpp's
convert script permutes the Q and K rows of every head so that the pairs rotated together are ADJACENT rows
(2i, 2i+1) ("normal"/GPT-J rope); transformers un-permutes them back to the rotate-half layout on load. We keep
the GGUF layout and rotate adjacent pairs. `qwen2` GGUFs are not permuted and llama.cpp uses NEOX rope: the
pairs are (i, i + head_dim/2), as in transformers. Both give the same logits as the converted model (the
check in tests/test_known_answers.py); the other convention does not (see ROPE_STYLE).

The prompt is a fixed English sentence cut into GPT-2 byte-level pieces ("Ġ" = leading space), each of which
must be ONE entry of the GGUF's own `tokenizer.ggml.tokens`; its ids are that entry's index. No BPE merges and
no tokenizer library are involved, so the ids are exactly what the data file records.

    .venv/bin/python scripts/gguf_reference.py smollm2-135m-instruct qwen2.5-coder-0.5b-instruct \\
        qwen2.5-coder-1.5b-instruct --out tests/data/known_answers.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `picospec` resolves when run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

PROMPT = "Paris is in France. Berlin is in"
PROBE_PIECES = ("ĠGermany", "ĠFrance", "ĠParis", "Ġthe")  # logits recorded besides the top-10
TOP_K = 10
# llama.cpp's rope type per architecture (llama_model_rope_type): see the module docstring.
ROPE_STYLE = {"llama": "adjacent", "qwen2": "neox"}
CHUNK = 1 << 20


def log(msg: str) -> None:
    print(f"[gguf_reference] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the file

@contextlib.contextmanager
def assembled_gguf(name: str) -> Iterator[tuple[Path, Any]]:
    """The built-in's GGUF as one file (parts concatenated into a temp file, deleted afterwards) and its spec.

    The bytes are hashed here, not trusted from shared/models.py's checks; a mismatch with the pin stops the run.
    """
    from picospec.shared.models import BUILTIN_MODELS, _locate_parts

    spec = BUILTIN_MODELS[name]
    parts = _locate_parts(spec)
    fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".gguf")
    try:
        h, done, total = hashlib.sha256(), 0, sum(p.stat().st_size for p in parts)
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                log(f"{name}: assembled {done / 2**20:.0f} of {total / 2**20:.0f} MiB")
        if h.hexdigest() != spec.sha256:
            raise SystemExit(f"{name}: assembled sha256 {h.hexdigest()} != pinned {spec.sha256}")
        yield Path(tmp), spec
    finally:
        Path(tmp).unlink(missing_ok=True)


class Gguf:
    """Metadata and dequantized tensors of one GGUF file, via gguf-py only."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.reader = GGUFReader(path)
        self.arch = str(self.meta("general.architecture"))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def meta(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def hp(self, key: str, default: Any = None) -> Any:
        return self.meta(f"{self.arch}.{key}", default)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str, rows: Sequence[int] | None = None) -> np.ndarray:
        """Dequantized float32, in PyTorch layout (out_features, in_features); `rows` picks rows before
        dequantizing (a GGUF row is whole quantization blocks), so an embedding lookup costs a few rows."""
        from gguf import quants

        t = self.tensors[name]
        data = t.data if rows is None else np.ascontiguousarray(t.data[list(rows)])
        return np.asarray(quants.dequantize(data, t.tensor_type), dtype=np.float32)


@dataclass(frozen=True)
class Hparams:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_theta: float
    rope_style: str
    eps: float
    vocab: int


def hparams(g: Gguf) -> Hparams:
    """From the GGUF metadata; anything this forward pass does not implement (rope scaling, partial rope) stops."""
    if g.arch not in ROPE_STYLE:
        raise SystemExit(f"architecture {g.arch!r} not implemented (only {sorted(ROPE_STYLE)})")
    if any(k.startswith(f"{g.arch}.rope.scaling") for k in g.reader.fields):
        raise SystemExit("rope scaling metadata present: not implemented")
    n_embd, n_head = int(g.hp("embedding_length")), int(g.hp("attention.head_count"))
    head_dim = int(g.hp("attention.key_length", n_embd // n_head))
    if int(g.hp("rope.dimension_count", head_dim)) != head_dim:
        raise SystemExit("partial rotary embedding: not implemented")
    return Hparams(n_layer=int(g.hp("block_count")), n_embd=n_embd, n_head=n_head,
                   n_head_kv=int(g.hp("attention.head_count_kv", n_head)), head_dim=head_dim,
                   rope_theta=float(g.hp("rope.freq_base", 10000.0)), rope_style=ROPE_STYLE[g.arch],
                   eps=float(g.hp("attention.layer_norm_rms_epsilon")),
                   vocab=len(g.reader.fields["tokenizer.ggml.tokens"].data))


def piece_ids(g: Gguf, pieces: Sequence[str]) -> list[int]:
    """Index of each piece in the GGUF's own vocabulary; a piece that is not one token stops the run."""
    vocab = g.meta("tokenizer.ggml.tokens")
    index = {tok: i for i, tok in enumerate(vocab)}
    missing = [p for p in pieces if p not in index]
    if missing:
        raise SystemExit(f"pieces {missing} are not single tokens of this GGUF's vocabulary")
    return [index[p] for p in pieces]


def prompt_pieces(text: str) -> list[str]:
    """GPT-2 style pre-split (a word keeps its leading space, written "Ġ"); ASCII text only."""
    return [w.replace(" ", "Ġ") for w in re.findall(r" ?\w+| ?[^\w\s]+", text)]


# ---------------------------------------------------------------------------------------------- the forward pass

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, hp: Hparams) -> np.ndarray:
    """Rotate x (T, heads, head_dim) by position; which dims pair up depends on hp.rope_style (module docstring)."""
    d, n = hp.head_dim, x.shape[0]
    inv_freq = hp.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)       # (d/2,)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]              # (T, d/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]                    # broadcast over heads
    if hp.rope_style == "neox":
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]                                              # adjacent pairs
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def linear(g: Gguf, x: np.ndarray, name: str) -> np.ndarray:
    """x @ W.T (+ bias when the GGUF has one: Qwen2's q/k/v), in float64."""
    y = x @ g.tensor(f"{name}.weight").astype(np.float64).T
    if g.has(f"{name}.bias"):
        y += g.tensor(f"{name}.bias")
    return y


def attention(g: Gguf, x: np.ndarray, i: int, hp: Hparams) -> np.ndarray:
    """Causal grouped-query self-attention of layer i over the whole prompt (no cache: T is a handful)."""
    t, p = x.shape[0], f"blk.{i}"
    q = rope(linear(g, x, f"{p}.attn_q").reshape(t, hp.n_head, hp.head_dim), hp)
    k = rope(linear(g, x, f"{p}.attn_k").reshape(t, hp.n_head_kv, hp.head_dim), hp)
    v = linear(g, x, f"{p}.attn_v").reshape(t, hp.n_head_kv, hp.head_dim)
    group = hp.n_head // hp.n_head_kv                 # query heads sharing one kv head
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hp.head_dim)
    scores = np.where(np.tril(np.ones((t, t), dtype=bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(t, hp.n_head * hp.head_dim)
    return linear(g, out, f"{p}.attn_output")


def mlp(g: Gguf, x: np.ndarray, i: int) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    gate, up = linear(g, x, f"blk.{i}.ffn_gate"), linear(g, x, f"blk.{i}.ffn_up")
    return linear(g, gate / (1.0 + np.exp(-gate)) * up, f"blk.{i}.ffn_down")


def last_logits(g: Gguf, ids: Sequence[int], hp: Hparams) -> np.ndarray:
    """Logits (float64, vocab) at the last prompt position. Weights are dequantized one layer at a time and
    dropped after use, so memory stays at one layer plus the output matrix even for the 1.5B model."""
    x = g.tensor("token_embd.weight", rows=ids).astype(np.float64)
    for i in range(hp.n_layer):
        x = x + attention(g, rms_norm(x, g.tensor(f"blk.{i}.attn_norm.weight"), hp.eps), i, hp)
        x = x + mlp(g, rms_norm(x, g.tensor(f"blk.{i}.ffn_norm.weight"), hp.eps), i)
        if i % 4 == 3 or i == hp.n_layer - 1:
            log(f"  layer {i + 1}/{hp.n_layer}")
    h = rms_norm(x[-1], g.tensor("output_norm.weight"), hp.eps)
    # no output.weight in the file = tied to the token embedding (SmolLM2); Qwen2.5 GGUFs carry their own
    head = "output.weight" if g.has("output.weight") else "token_embd.weight"
    return g.tensor(head).astype(np.float64) @ h


# ---------------------------------------------------------------------------------------------- the answers

def known_answer(name: str) -> dict[str, Any]:
    """Top-10 (id, logit) and probe logits at the last position of PROMPT, with what produced them."""
    t0 = time.perf_counter()
    with assembled_gguf(name) as (path, spec):
        g = Gguf(path)
        arch = g.arch
        hp = hparams(g)
        log(f"{name}: {g.arch}, {hp}")
        pieces = prompt_pieces(PROMPT)
        ids = piece_ids(g, pieces)
        logits = last_logits(g, ids, hp)
        vocab = g.meta("tokenizer.ggml.tokens")
        probe_ids = [*piece_ids(g, PROBE_PIECES), 0, 1, 2, hp.vocab - 1]
        del g  # the reader memory-maps the temp file: drop it before the file is deleted
    top = np.argsort(-logits, kind="stable")[:TOP_K]
    entry = {
        "gguf_name": spec.gguf_name, "gguf_sha256": spec.sha256, "architecture": arch,
        "rope_style": hp.rope_style, "hparams": hp.__dict__,
        "prompt_pieces": pieces, "prompt_ids": ids,
        "top10": [{"id": int(i), "piece": vocab[i], "logit": float(logits[i])} for i in top],
        "probes": [{"id": int(i), "piece": vocab[i], "logit": float(logits[i])} for i in probe_ids],
        "logits_mean": float(logits.mean()), "logits_std": float(logits.std()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log(f"{name}: top-1 {vocab[top[0]]!r} ({logits[top[0]]:.4f}) in {entry['seconds']} s")
    return entry


def provenance() -> dict[str, Any]:
    import importlib.metadata

    return {
        "how": ("taken once from the GGUF by scripts/gguf_reference.py, a loader independent of ours: gguf-py "
                "GGUFReader + gguf.quants.dequantize, a numpy float64 forward pass (float32 dequantized weights), "
                "no transformers, no picospec conversion or tokenizer"),
        "prompt": PROMPT,
        "prompt_ids_from": ("PROMPT pre-split GPT-2 style into pieces, each looked up as one entry of the GGUF's "
                            "tokenizer.ggml.tokens (no BPE merges)"),
        "numpy": np.__version__, "gguf_py": importlib.metadata.version("gguf"),
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+", metavar="NAME", help="built-in model names")
    ap.add_argument("--out", type=Path, required=True, help="JSON file; entries of other models are kept")
    args = ap.parse_args(argv)
    data: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    models = data.get("models", {})
    for name in args.names:
        models[name] = known_answer(name)
    data = {**provenance(), "models": dict(sorted(models.items()))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
