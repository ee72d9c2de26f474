"""The fastest cloud alone on a CPU without this project: llama.cpp running the target's GGUF by itself.

What a CPU user runs today instead of PicoSpec: llama-cpp-python's own `Llama` over the same GGUF, greedy, one
process, no network. Every benchmark puts it beside `--mode cloud` and takes its ratios against the faster of the
two (README.md, "Against the fastest cloud alone"). Runs in its own process so that the caller can pin it to the cloud's core:

    taskset -c 1 python -m picospec.bench.llama_alone --target qwen2.5-coder-1.5b-instruct --threads 1 \\
        --max-new-tokens 128 --prompt-ids 151644,8948,...     # one JSON object per prompt on stdout
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence


def measure(llm: Any, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
            seed: int = 0) -> dict[str, Any]:
    """One generation of exactly max_new_tokens (EOS ignored, as the benchmarks' --ignore-eos), greedy at T=0, else
    llama.cpp's own sampling at that temperature: the same statistics the edge reports (decode rate after the first
    token, TTFT, end to end, compute per token)."""
    llm.reset()  # no prefix reused from the last prompt (the chat template's system prompt): each run prefills whole,
    t0 = time.perf_counter()  # as the cloud does
    first_at = None
    tokens: list[int] = []
    greedy = temperature == 0.0
    if not greedy:
        llm.set_seed(seed)
    for token in llm.generate(list(prompt_ids), temp=temperature, top_k=1 if greedy else 0, top_p=1.0, min_p=0.0,
                              repeat_penalty=1.0, reset=True):
        if first_at is None:
            first_at = time.perf_counter()
        tokens.append(int(token))
        if len(tokens) == max_new_tokens:
            break
    end = time.perf_counter()
    decode_s = end - first_at
    rest = len(tokens) - 1
    return {"mode": "llama.cpp", "generated_tokens": len(tokens), "token_ids": tokens, "ttft_s": first_at - t0,
            "wall_s": end - t0, "tokens_per_s": len(tokens) / (end - t0),
            "decode_tokens_per_s": rest / decode_s if rest and decode_s > 0 else None,
            # the one process is the cloud: all its decode time is cloud compute
            "cloud_ms_per_token": 1e3 * decode_s / rest if rest else None, "exact": True}


def load(target: str, threads: int, n_ctx: int = 4096) -> tuple[Any, Any]:
    """llama.cpp's own `Llama` over the target's checked GGUF, and the target's tokenizer (the file is hashed once)."""
    from llama_cpp import Llama

    from picospec.shared.llama_backend import llama_cpp_module
    from picospec.shared.models import gguf_tokenizer

    llama_cpp_module()  # registers the best of the wheel's CPU variants, as the project's engines do

    path, tokenizer = gguf_tokenizer(target, progress=False)
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                 verbose=False), tokenizer


def serve(target: str, threads: int, max_new_tokens: int) -> None:
    """The testbed's baseline worker: JSON requests on stdin ({"prompt": TEXT} or {"op": "quit"}), one JSON reply each
    on stdout. The prompt goes through the same chat template and tokenizer as the edge's (one tokenizer: the
    handshake checks it), so both sides of a ratio generate from the same ids."""
    from picospec.edge_client.text import encode_prompt

    t0 = time.perf_counter()
    llm, tokenizer = load(target, threads)
    print(json.dumps({"ok": True, "event": "ready", "load_s": time.perf_counter() - t0}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            ids = encode_prompt(tokenizer, req["prompt"], chat=True)
            r = measure(llm, ids, max_new_tokens, float(req.get("temperature", 0.0)), int(req.get("seed", 0)))
            print(json.dumps({"ok": True, "timed_out": False, "token_ids": r.pop("token_ids"), "stats": r}), flush=True)
        except Exception as e:  # noqa: BLE001 - one failed run must not end the sweep
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m picospec.bench.llama_alone", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="a built-in model name or a .gguf path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-ids", action="append",
                   help="comma-separated token ids of one prompt; repeat for several (one JSON line each)")
    p.add_argument("--runs", type=int, default=1, help="generations per prompt")
    p.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (the benchmarks' testbed)")
    p.add_argument("--chat-prompt", help="one prompt as text, in the chat template (as picospec-edge --chat)")
    p.add_argument("--summary", action="store_true", help="one line for people instead of JSON")
    args = p.parse_args(argv)
    if args.serve:
        return serve(args.target, args.threads, args.max_new_tokens)
    if not (args.prompt_ids or args.chat_prompt):
        p.error("--prompt-ids, --chat-prompt or --serve")
    llm, tokenizer = load(args.target, args.threads)
    if args.chat_prompt:
        from picospec.edge_client.text import encode_prompt

        args.prompt_ids = [",".join(map(str, encode_prompt(tokenizer, args.chat_prompt, chat=True)))]
    for prompt in args.prompt_ids:
        ids = [int(t) for t in prompt.split(",") if t]
        for run in range(args.runs):
            r = measure(llm, ids, args.max_new_tokens)
            if args.summary:
                print(f"llama.cpp alone: decode {r['decode_tokens_per_s']:.2f} tokens/s, time to first token "
                      f"{r['ttft_s']:.2f} s, {r['tokens_per_s']:.2f} tokens/s end to end, {r['cloud_ms_per_token']:.1f} "
                      f"ms of compute per token", flush=True)
            else:
                print(json.dumps({"prompt_ids": ids, "run": run, **r}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
