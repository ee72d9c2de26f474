"""picospec-bench exits: calibrate the early-exit layer and confidence threshold (docs/design.md §4.5) on a target.

The target greedily continues each prompt; then, teacher-forced over prompt and continuation, every layer's
hidden state goes through the final norm and LM head, and its tentative top-1 is compared with the final
layer's. Per layer and threshold: coverage (share of positions whose tentative confidence passes the threshold,
i.e. how often a hint is sent) and agreement (how often such a hint names the final token). The recommendation
is the earliest layer whose agreement at a threshold reaches --min-agreement with coverage at least
--min-coverage: the earlier the exit, the more of the pass is left to overlap with pre-drafting.

    picospec-bench exits [--target NAME] [--prompts N] [--max-new-tokens N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from picospec.cloud_server.early_exit import layer_agreement
from picospec.shared.models import load_model

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash map is in two sentences.",
    "Write a SQL query that returns the ten most recent orders.",
    "def quicksort(xs):",
]
THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 0.9)


@torch.inference_mode()
def per_layer_rows(model: Any, sequences: list[list[int]], first_rows: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tentative logits per layer (1 .. L-1) and final logits, at the positions from first_rows[i] on."""
    body = model.model
    tentative: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers - 1)]
    final = []
    for seq, first in zip(sequences, first_rows):
        out = model(torch.tensor([seq]), output_hidden_states=True)
        final.append(out.logits[0, first:].float())
        # hidden_states[0] is the embedding, [l] the output of layer l; the last one is already normed
        for layer in range(1, model.config.num_hidden_layers):
            h = out.hidden_states[layer][0, first:]
            tentative[layer - 1].append(model.lm_head(body.norm(h)).float())
    return [torch.cat(t) for t in tentative], torch.cat(final)


def calibrate(target_name: str, prompts: list[str], max_new_tokens: int, thresholds: tuple[float, ...]) -> list[dict[str, float]]:
    target = load_model(target_name)
    tok, model = target.tokenizer, target.model
    sequences, firsts = [], []
    for i, prompt in enumerate(prompts):
        print(f"[{i + 1}/{len(prompts)}] generating a continuation", file=sys.stderr, flush=True)
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"] if tok.chat_template else tok(prompt)["input_ids"]
        ids = list(ids)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id or 0)
        sequences.append(out[0].tolist())
        firsts.append(len(ids) - 1)  # rows predicting the generated tokens
    print("comparing every layer with the last", file=sys.stderr, flush=True)
    tentative, final = per_layer_rows(model, sequences, firsts)
    rows = []
    for layer, t in enumerate(tentative, start=1):
        for r in layer_agreement(final, t, thresholds):
            rows.append({"layer": layer, "layers": model.config.num_hidden_layers, **r})
    return rows


def recommend(rows: list[dict[str, float]], min_agreement: float, min_coverage: float) -> dict[str, float] | None:
    ok = [r for r in rows if r["coverage"] >= min_coverage and r["agreement"] >= min_agreement]
    return min(ok, key=lambda r: (r["layer"], r["threshold"])) if ok else None


def format_table(rows: list[dict[str, float]], thresholds: tuple[float, ...]) -> str:
    head = "| layer | " + " | ".join(f"conf>={t:g}: cover / agree" for t in thresholds) + " |"
    lines = [head, "|" + "---|" * (len(thresholds) + 1)]
    for layer in sorted({r["layer"] for r in rows}):
        cells = [f"{r['coverage']:.2f} / {r['agreement']:.2f}" for r in rows if r["layer"] == layer]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="picospec-bench exits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--min-agreement", type=float, default=0.9)
    p.add_argument("--min-coverage", type=float, default=0.3)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = calibrate(args.target, PROMPTS[: args.prompts], args.max_new_tokens, THRESHOLDS)
    best = recommend(rows, args.min_agreement, args.min_coverage)
    table = format_table(rows, THRESHOLDS)
    print(table)
    if best:
        print(f"\nrecommended: --exit-layer {best['layer']} --exit-threshold {best['threshold']:g} "
              f"(agreement {best['agreement']:.2f}, hints on {best['coverage']:.0%} of passes, "
              f"{best['layers'] - best['layer']} of {best['layers']} layers left to overlap)")
    else:
        print(f"\nno layer reaches agreement {args.min_agreement} at coverage {args.min_coverage}: hints would mislead")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exits.json").write_text(json.dumps({"target": args.target, "rows": rows, "recommended": best}, indent=1))
    (out / "exits.md").write_text(table + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for th in THRESHOLDS:
            rs = [r for r in rows if r["threshold"] == th]
            ax.plot([r["layer"] for r in rs], [r["agreement"] for r in rs], marker=".", label=f"agreement, conf >= {th:g}")
        ax.set_xlabel("exit layer"), ax.set_ylabel("tentative top-1 = final top-1"), ax.set_ylim(0, 1.02)
        ax.set_title(f"Early-exit calibration: {args.target}"), ax.legend(fontsize=7), fig.tight_layout()
        fig.savefig(out / "exits.png", dpi=120)
        print(f"wrote {out / 'exits.json'}, {out / 'exits.md'}, {out / 'exits.png'}")
    except ImportError:
        print(f"wrote {out / 'exits.json'}, {out / 'exits.md'} (no matplotlib: no plot)")


if __name__ == "__main__":
    main()
