"""picospec-edge: run a prompt through the cloud (and the local draft), streaming committed text.

    picospec-edge --server H:P --prompt TEXT [--mode cloud,sync,pipeline] ...   one prompt, a statistics table
                  (--prompt - reads the prompt from stdin, --prompt-file PATH from a file)
    picospec-edge serve --server H:P ...                                         an OpenAI-compatible HTTP server
    picospec-edge chat --server H:P ...                                          a chat in the terminal
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
from typing import IO, Any, Callable, TypeVar

from picospec.edge_client.text import check_stop_strings, encode_prompt
from picospec.edge_client.waiting import WaitProgress, should_report
from picospec.shared.config import (EdgeConfig, add_config_args, check_edge_startup, config_from_args, edge_modes)
from picospec.shared.interrupt import OneLineParser, run_interruptible, usage_error
from picospec.shared.model_names import ModelError

T = TypeVar("T")


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
    ("cloud compute / token (ms)", "cloud_ms_per_token", "{:.1f}"),
    ("wasted draft tokens", "wasted_draft_tokens", "{}"),
    ("cloud's own tokens (decode-ahead)", "cloud_tokens", "{}"),
    ("pipeline bubbles (s)", "pipeline_bubble_s", "{:.2f}"),
    ("mean draft length", "mean_draft_len", "{:.2f}"),
    ("early-exit hint hit rate", "hint_hit_rate", "{:.2f}"),
    ("draft-only tokens (cloud unreachable)", "draft_only_tokens", "{}"),
    ("reconnects", "reconnects", "{}"),
    ("finish", "finish_reason", "{}"),
]


# what each column of the table is, one line each (printed under the table)
MODE_MEANINGS = {
    "cloud": "the target alone on the cloud, one token per step: the baseline",
    "edge": "the draft alone on the edge: fast, not the target's output",
    "sync": "speculation, stop and wait: draft a batch, wait for the cloud's verdict, repeat",
    "early-exit": "stop and wait, plus pre-drafting from the cloud's early-exit hints (the second paper's system)",
    "pipeline": "ours: keeps drafting while batches are in flight (with decode-ahead, the cloud decodes while idle)",
    "picospec": "the PicoSpec paper's configuration (pipeline, split-topk K=10, 4 drafts per batch)",
}


def format_legend(results: list[dict[str, Any]]) -> str:
    """One line per column: what the mode does, and whether its output is the target's (exact) or not."""
    lines = []
    for r in results:
        s = r["stats"]
        exact = ("exact (the target's own output law)" if s.get("exact", True) and r["mode"] != "edge"
                 else "APPROXIMATE" + (f": {s['inexact_reason']}" if s.get("inexact_reason") else ""))
        verify = f", {s['verify_mode']} verification" if s.get("verify_mode") else ""
        lines.append(f"  {r['mode']}: {MODE_MEANINGS.get(r['mode'], '')}{verify}; {exact}")
    return "columns:\n" + "\n".join(lines)


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
    p = OneLineParser(prog="picospec-edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text; - reads it from stdin")
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file (UTF-8)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per mode (text, token_ids, mode, stats)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the generation where TEXT first appears (not printed); repeat for several")
    p.add_argument("--log-level", default="WARNING")
    add_config_args(p, EdgeConfig)
    return p


class CloudWaitReporter:
    """Says on stderr that the edge is waiting for the cloud: at the first failed attempt, then every 5 s.
    `heard` is set at the first attempt's outcome, success or failure."""

    def __init__(self) -> None:
        self.last_reported_s: float | None = None
        self.heard = asyncio.Event()

    def __call__(self, progress: WaitProgress) -> None:
        self.heard.set()
        if not should_report(progress, self.last_reported_s):
            return
        first = self.last_reported_s is None
        message = progress.first_message() if first else progress.progress_message()
        print(f"picospec-edge: {message}", file=sys.stderr, flush=True)
        self.last_reported_s = progress.elapsed_s


async def probe_cloud(config: EdgeConfig, reporter: CloudWaitReporter) -> Any:
    """The cloud's Info over a channel of its own, saying on stderr while it waits (gRPC only: no torch, so the user
    hears within a second whether the cloud is up, while the draft is still loading)."""
    from picospec.edge_client.transport import open_channel, wait_for_cloud
    from picospec.shared.connection import token_metadata
    from picospec.shared.rpc.picospec_pb2_grpc import PicoSpecStub

    async with open_channel(config) as channel:
        return await wait_for_cloud(PicoSpecStub(channel), config.server, config.wait_ready_s, reporter,
                                    token_metadata(config.token))


def load_draft(config: EdgeConfig, on_tokenizer: Callable[[Any], None] | None = None) -> Any:
    """The draft model on config.device with config.threads torch threads (torch is imported here, not at start-up,
    so a front end can say what it is doing first). Used by the CLI, `chat` and `serve`. `on_tokenizer`: called with
    the draft's tokenizer, loaded alone first (seconds before the weights), before the weights load; an exception
    from it ends the load there (the CLI's tokenizer check, TokenizerCheck)."""
    from picospec.shared.models import load_gguf_model, load_model, load_tokenizer, resolve_engine
    engine = resolve_engine(config.draft, config.draft_engine)
    if engine == "llama.cpp" and config.device != "cpu":
        raise ModelError(f"--device {config.device} is a torch draft's: a llama.cpp draft takes the GPU with "
                         "--gpu-layers N (a GPU build of llama-cpp-python)")
    tokenizer = None
    if on_tokenizer is not None:
        tokenizer = load_tokenizer(config.draft, engine=engine)
        on_tokenizer(tokenizer)
    if engine == "llama.cpp":
        from picospec.shared.llama_backend import default_threads
        return load_gguf_model(config.draft, threads=config.threads or default_threads(), tokenizer=tokenizer,
                               gpu_layers=config.gpu_layers)
    import torch  # installed: check_edge_startup refused a torch draft where it is not

    if config.threads:
        torch.set_num_threads(config.threads)
    return load_model(config.draft, device=config.device, tokenizer=tokenizer)


class TokenizerCheck:
    """The draft's tokenizer against the cloud's target's, as soon as both are known: in the load's thread once the
    tokenizer has loaded, when the cloud has answered by then (the usual case: the weights never load), else on the
    loop when the cloud answers (the weights' load is abandoned). EdgeError with EdgeClient.connect's message, which
    checks again; a cloud of another protocol version is left to connect, which says so."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._mine: Any = None   # the draft's Fingerprint
        self._info: Any = None   # the cloud's InfoReply

    def tokenizer_loaded(self, tokenizer: Any) -> None:
        from picospec.shared.fingerprint import tokenizer_fingerprint
        fingerprint = tokenizer_fingerprint(tokenizer)  # remembered: EdgeClient does not hash it again
        with self._lock:
            self._mine = fingerprint
            self._check()

    def cloud_found(self, info: Any) -> None:
        with self._lock:
            self._info = info
            self._check()

    def _check(self) -> None:
        if self._mine is None or self._info is None:
            return
        from picospec.edge_client.transport import EdgeError
        from picospec.shared.fingerprint import Fingerprint, tokenizer_mismatch
        from picospec.shared.protocol import PROTOCOL_VERSION
        info = self._info
        if info.protocol_version != PROTOCOL_VERSION:
            return
        theirs = Fingerprint(info.tokenizer.num_tokens, info.tokenizer.sha256)
        mismatch = tokenizer_mismatch(self.config.draft, self._mine, info.target_model, self.config.server, theirs)
        if mismatch:
            raise EdgeError(mismatch)


def in_daemon_thread(fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
    """fn(*args) in a daemon thread of its own, as a future of this loop. Not asyncio.to_thread: asyncio.run's exit
    and the interpreter's wait for the default executor's threads, so a failure or a Ctrl-C while the draft loads
    would wait for the load to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits for it
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the loop
            result, error = None, e
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="load-draft", daemon=True).start()
    return future


async def draft_and_cloud(config: EdgeConfig, need_cloud: bool = True, announce: bool = True) -> tuple[Any, Any]:
    """Load the draft and find the cloud at the same time; the first failure of either ends the wait. `announce`:
    say which model the cloud serves (chat and serve say it their own way once connected)."""
    reporter = CloudWaitReporter()
    probe = asyncio.ensure_future(probe_cloud(config, reporter)) if need_cloud else None
    if probe is not None:  # the first attempt before torch's import takes the interpreter (at most 1 s)
        heard = asyncio.ensure_future(reporter.heard.wait())
        await asyncio.wait({probe, heard}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        heard.cancel()
    print(f"picospec-edge: loading draft {config.draft}", file=sys.stderr, flush=True)
    check = TokenizerCheck(config) if need_cloud else None  # a mismatch refused before the draft's weights load
    loading = in_daemon_thread(load_draft, config, check.tokenizer_loaded if check is not None else None)
    pending = {t for t in (probe, loading) if t is not None}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                result = task.result()  # raises the first failure (the load goes on in its thread; the program ends)
                if task is probe and check is not None:
                    check.cloud_found(result)
    finally:
        for task in pending:  # a failure, or a Ctrl-C: nothing left behind unretrieved
            task.cancel()
    info = probe.result() if probe is not None else None
    if info is not None and announce:
        print(f"picospec-edge: cloud serves {info.target_model} on {info.device}", file=sys.stderr, flush=True)
    return loading.result(), info


async def run(config: EdgeConfig, args: argparse.Namespace, prompt: str) -> list[dict[str, Any]]:
    modes = edge_modes(config.mode)  # checked by check_edge_startup before this runs
    draft, _ = await draft_and_cloud(config, need_cloud=any(m != "edge" for m in modes))
    from picospec.edge_client.client import EdgeClient  # torch: imported by the draft's load, not before it
    prompt_ids = encode_prompt(draft.tokenizer, prompt, args.chat)
    if not prompt_ids:
        raise ValueError(f"the prompt encodes to no tokens with {config.draft}'s tokenizer: give some text")
    results = []
    async with EdgeClient(config, draft) as client:
        if any(m != "edge" for m in modes):
            await client.connect(on_retry=CloudWaitReporter())  # found above: checks the protocol, opens the channel
        for mode in modes:
            out = None if args.json else sys.stdout
            if out is not None and len(modes) > 1:
                out.write(f"\n--- {mode} ---\n")
            gen = client.generate(prompt_ids, mode=mode, stop=args.stop or ())
            async for piece in gen.stream_text():
                if out is not None:
                    out.write(piece)
                    out.flush()
            if out is not None:
                out.write("\n")
            results.append({"mode": mode, "text": gen.text, "token_ids": gen.token_ids, "stats": gen.stats.to_dict()})
    return results


SUBCOMMANDS = {  # picospec-edge SUB ...: module with its own main(argv)
    "serve": "picospec.edge_client.openai_server",
    "chat": "picospec.edge_client.chat",
}


def read_prompt(prompt: str | None, prompt_file: str | None, stdin: IO[str]) -> str:
    """The prompt from --prompt TEXT, --prompt - (stdin) or --prompt-file PATH; ValueError naming the flag where it
    is empty or unreadable (an empty prompt, as from `--prompt "$(cat missing.txt)"`, is not sent to the cloud)."""
    if prompt_file is not None:
        source = f"--prompt-file {prompt_file}"
        try:
            with open(prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{source}: {getattr(e, 'strerror', None) or e}") from None
    elif prompt == "-":
        source, text = "--prompt - (stdin)", stdin.read()
    else:
        source, text = "--prompt", prompt or ""
    if not text.strip():
        raise ValueError(f"{source}: the prompt is empty; give the text to continue (--prompt TEXT, --prompt - for "
                         "stdin, or --prompt-file PATH)")
    return text


def check_arguments(config: EdgeConfig, args: argparse.Namespace, stdin: IO[str]) -> str:
    """Every argument, before anything loads or connects: the config (shared/config.py:check_edge_startup), the
    stop strings and the prompt, which is returned. ValueError naming the flag, the value and what is allowed."""
    check_edge_startup(config)
    try:
        check_stop_strings(args.stop or ())
    except ValueError as e:
        raise ValueError(f"--stop {args.stop!r}: {e}") from None
    return read_prompt(args.prompt, args.prompt_file, stdin)


def precheck_subcommand(sub: str, argv: list[str]) -> None:
    """The edge flags of `serve` or `chat` checked before their modules load (FastAPI, uvicorn, torch: seconds), so
    a bad value is one line within a second there too. Flags of their own and malformed values are left to their
    parsers, which check everything again."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    add_config_args(parser, EdgeConfig)
    try:
        known, _ = parser.parse_known_args(argv)
        config = config_from_args(EdgeConfig, known)
    except (argparse.ArgumentError, SystemExit):
        return
    try:
        check_edge_startup(config, one_mode=True)
    except ValueError as e:
        usage_error(f"picospec-edge {sub}", e)
    leave_torch_out(config)


def leave_torch_out(config: EdgeConfig) -> None:
    """A process whose draft runs on llama.cpp needs no torch, yet transformers imports torch wherever it is installed
    (for its tokenizers it needs none): a command-line edge makes torch unimportable for itself before anything imports
    it, saving seconds of start-up and about 190 MB of memory. Only where torch is not imported yet (a program that
    embeds the edge keeps its own), and only for a llama.cpp draft: a torch draft, a tree, and the cloud need it."""
    from picospec.shared.model_names import resolve_engine

    if "torch" not in sys.modules and resolve_engine(config.draft, config.draft_engine) == "llama.cpp":
        sys.modules["torch"] = None  # `import torch` raises ImportError; transformers then sees no torch


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        precheck_subcommand(argv[0], argv[1:])
        import importlib
        importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    config = config_from_args(EdgeConfig, args)
    try:
        prompt = check_arguments(config, args, sys.stdin)
    except ValueError as e:
        usage_error("picospec-edge", e)
    leave_torch_out(config)
    from picospec.edge_client.transport import EdgeError
    try:
        results = run_interruptible(run(config, args, prompt), "picospec-edge")
    except (EdgeError, ModelError, ValueError) as e:  # ValueError: ConnectionSettingsError, an empty prompt
        sys.exit(f"picospec-edge: {e}")
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        print(format_table(results))
        print(format_legend(results))


if __name__ == "__main__":
    main()
