"""picospec-edge: run a prompt through the cloud (and the local draft), streaming committed text."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any, TextIO

import torch

from picospec.edge_client.client import EdgeClient, EdgeError
from picospec.edge_client.waiting import WaitProgress, should_report
from picospec.shared.config import EDGE_MODES, EdgeConfig, add_config_args, config_from_args
from picospec.shared.models import ModelError, load_model


class TextStream:
    """Incremental detokenisation: print only the new, complete characters of the decoded text."""

    def __init__(self, tokenizer: Any, out: TextIO | None) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self.text()
        if self.out is not None and not text.endswith("\ufffd"):  # hold back a split UTF-8 sequence
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)


TABLE_ROWS = [
    ("tokens/s", "tokens_per_s", "{:.2f}"),
    ("decode tokens/s", "decode_tokens_per_s", "{:.2f}"),
    ("time to first token (s)", "ttft_s", "{:.2f}"),
    ("inter-token p50 / p95 (ms)", ("itl_p50_s", "itl_p95_s"), "ms"),
    ("generated tokens", "generated_tokens", "{}"),
    ("rounds", "rounds", "{}"),
    ("mean accepted length", "mean_accepted_len", "{:.2f}"),
    ("acceptance rate", "acceptance_rate", "{:.3f}"),
    ("bytes up / token", "bytes_up_per_token", "{:,.0f}"),
    ("bytes down / token", "bytes_down_per_token", "{:,.0f}"),
    ("edge busy fraction", "edge_busy_fraction", "{:.2f}"),
    ("cloud busy fraction", "cloud_busy_fraction", "{:.2f}"),
    ("wasted draft tokens", "wasted_draft_tokens", "{}"),
    ("cloud's own tokens (decode-ahead)", "cloud_tokens", "{}"),
    ("pipeline bubbles (s)", "pipeline_bubble_s", "{:.2f}"),
    ("mean draft length", "mean_draft_len", "{:.2f}"),
    ("early-exit hint hit rate", "hint_hit_rate", "{:.2f}"),
    ("finish", "finish_reason", "{}"),
]


def format_table(results: list[dict[str, Any]]) -> str:
    """Statistics of several runs side by side, one column per mode."""

    def cell(stats: dict[str, Any], key: Any, fmt: str) -> str:
        if fmt == "ms":
            a, b = stats.get(key[0]), stats.get(key[1])
            return "-" if a is None else f"{a * 1e3:.0f} / {b * 1e3:.0f}"
        v = stats.get(key)
        return "-" if v is None else fmt.format(v)

    def title(r: dict[str, Any]) -> str:
        s = r["stats"]
        label = f"{r['mode']} ({s['verify_mode']})" if s.get("verify_mode") else r["mode"]
        return label + (" APPROXIMATE" if r["mode"] != "edge" and not s.get("exact", True) else "")

    header = ["metric"] + [title(r) for r in results]
    rows = [[label] + [cell(r["stats"], key, fmt) for r in results] for label, key, fmt in TABLE_ROWS]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="picospec-edge", description=__doc__)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per mode (text, token_ids, mode, stats)")
    p.add_argument("--log-level", default="WARNING")
    add_config_args(p, EdgeConfig)
    return p


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt)["input_ids"])  # the tokenizer's default special-token handling


class _CloudWaitReporter:
    """Says on stderr that the edge is waiting for the cloud: at the first failed attempt, then every 5 s."""

    def __init__(self) -> None:
        self.last_reported_s: float | None = None

    def __call__(self, progress: WaitProgress) -> None:
        if not should_report(progress, self.last_reported_s):
            return
        first = self.last_reported_s is None
        message = progress.first_message() if first else progress.progress_message()
        print(f"picospec-edge: {message}", file=sys.stderr, flush=True)
        self.last_reported_s = progress.elapsed_s


async def run(config: EdgeConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    modes = [m.strip() for m in config.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in EDGE_MODES]
    if bad:
        raise SystemExit(f"picospec-edge: unknown mode {bad[0]!r}; choose from {', '.join(EDGE_MODES)}")
    if config.threads:
        torch.set_num_threads(config.threads)
    print(f"picospec-edge: loading draft {config.draft}", file=sys.stderr, flush=True)
    draft = load_model(config.draft, device=config.device)
    prompt_ids = encode_prompt(draft.tokenizer, args.prompt, args.chat)
    results = []
    async with EdgeClient(config, draft) as client:
        if any(m != "edge" for m in modes):
            info = await client.connect(on_retry=_CloudWaitReporter())
            print(f"picospec-edge: cloud serves {info.target_model} on {info.device}", file=sys.stderr, flush=True)
        for mode in modes:
            out = None if args.json else sys.stdout
            if out is not None and len(modes) > 1:
                out.write(f"\n--- {mode} ---\n")
            stream = TextStream(draft.tokenizer, out)
            gen = client.generate(prompt_ids, mode=mode)
            async for ids in gen:
                stream.push(ids)
            if out is not None:
                out.write("\n")
            results.append({"mode": mode, "text": stream.text(), "token_ids": gen.token_ids, "stats": gen.stats.to_dict()})
    return results


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    config = config_from_args(EdgeConfig, args)
    try:
        results = asyncio.run(run(config, args))
    except (EdgeError, ModelError) as e:
        sys.exit(f"picospec-edge: {e}")
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        print(format_table(results))


if __name__ == "__main__":
    main()
