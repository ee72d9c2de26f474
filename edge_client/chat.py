"""picospec-edge chat: a multi-turn chat in the terminal, each reply streamed as the cloud commits it.

    picospec-edge chat --server H:P --draft NAME [--system TEXT] [--stop TEXT ...] [EdgeConfig flags]

Each turn sends the whole conversation (the system message, then user and assistant turns) in the tokenizer's chat
template; when it would not fit the cloud's context, the oldest turns are dropped (the system message stays) and
the chat says so. Under each reply, one line of statistics. Ctrl-C during a reply ends that reply (the cloud frees
its session; what was shown stays in the conversation) and the chat goes on; Ctrl-C or Ctrl-D at the prompt ends
the chat. Commands: /reset (forget the conversation), /exit, /help.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TextIO, TypeVar

from picospec.edge_client.cli import CloudWaitReporter, draft_and_cloud
from picospec.edge_client.client import EdgeClient, EdgeError
from picospec.edge_client.text import encode_messages
from picospec.shared.config import EdgeConfig, add_config_args, check_edge_startup, config_from_args
from picospec.shared.interrupt import OneLineParser, usage_error
from picospec.shared.models import LoadedModel, ModelError

T = TypeVar("T")
Message = dict[str, str]
PROMPT = "you> "
COMMANDS = {"/reset": "forget the conversation (the system message stays)", "/exit": "end the chat",
            "/help": "list the commands"}


# ---- pure helpers: the footer, the history, the commands ---------------------------------------------------------
def _size(n: float) -> str:
    return f"{n:.0f} B" if n < 1000 else f"{n / 1000:.1f} KB" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def format_footer(stats: dict[str, Any], *, interrupted: bool = False, sep: str = " · ") -> str:
    """One line under a reply: mode (APPROXIMATE when not the target's own output law), tokens, speed, time to
    first token, drafts accepted, bytes each way, and why the reply ended."""
    mode = stats["mode"] + (f" {stats['verify_mode']}" if stats.get("verify_mode") else "")
    parts = [mode + ("" if stats.get("exact", True) else " APPROXIMATE"), f"{stats['generated_tokens']} tokens"]
    if stats.get("tokens_per_s") is not None:
        parts.append(f"{stats['tokens_per_s']:.1f} tok/s")
    if stats.get("ttft_s") is not None:
        parts.append(f"ttft {stats['ttft_s']:.2f} s")
    if stats.get("drafted_tokens"):
        parts.append(f"accepted {stats['accepted_tokens']}/{stats['drafted_tokens']} drafts")
    if stats.get("draft_only_tokens"):  # --on-partition edge: the cloud was unreachable for a while
        parts.append(f"{stats['draft_only_tokens']} draft-only tokens (cloud unreachable)")
    if stats.get("bytes_up") or stats.get("bytes_down"):
        parts.append(f"{_size(stats.get('bytes_up', 0))} up {_size(stats.get('bytes_down', 0))} down")
    parts.append("interrupted" if interrupted else stats.get("finish_reason") or "?")
    return "[" + sep.join(parts) + "]"


def fit_history(messages: Sequence[Message], count_tokens: Callable[[Sequence[Message]], int],
                budget: int | None) -> tuple[list[Message], int]:
    """The conversation that fits `budget` prompt tokens, and how many of the oldest turns were dropped for it.

    A turn is a user message and the assistant reply after it; a leading system message always stays, and so does
    the last message (the one being answered). When even that does not fit, ValueError says by how much."""
    head = [m for m in messages[:1] if m["role"] == "system"]
    rest, dropped = list(messages[len(head):]), 0
    if budget is None:
        return head + rest, 0
    while count_tokens(head + rest) > budget:
        if len(rest) <= 1:
            raise ValueError(f"the message is {count_tokens(head + rest)} tokens with the chat template, and the cloud "
                             f"takes at most {budget} (its context less --max-new-tokens)")
        rest = rest[2:] if len(rest) > 2 and rest[1]["role"] == "assistant" else rest[1:]
        dropped += 1
    return head + rest, dropped


def initial_history(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system else []


@dataclass(frozen=True)
class Turn:
    """What one reply left: its text (the partial text when interrupted), the stats, and whether it ended early."""
    text: str
    stats: dict[str, Any]
    interrupted: bool


# ---- the terminal: lines in without blocking the loop, Ctrl-C as task cancellation --------------------------------
class LineReader:
    """Lines from a file descriptor without blocking the event loop: a reader callback while the fd (a terminal or
    a pipe) has nothing to read; a plain read for a regular file, where a read never waits. None at end of input.

    On a terminal in its usual (canonical) mode the kernel does the line editing, turns Ctrl-C into SIGINT and
    Ctrl-D at an empty line into a read of 0 bytes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    async def readline(self) -> str | None:
        while b"\n" not in self.buffer:
            chunk = await self._read()
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line.decode("utf-8", errors="replace") if line else None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace")

    async def _read(self) -> bytes:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        try:
            loop.add_reader(self.fd, lambda: ready.done() or ready.set_result(None))
        except (PermissionError, ValueError):  # a regular file: epoll cannot watch it, and reading it never waits
            return os.read(self.fd, 65536)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)
        return os.read(self.fd, 65536)


class Interrupts:
    """Ctrl-C (SIGINT) for the whole chat: it cancels the task in the foreground (the reply being streamed, the
    prompt being read), and does nothing between them. Installed once, so no Ctrl-C ever lands as a
    KeyboardInterrupt in the middle of the event loop."""

    def __init__(self) -> None:
        self.foreground: asyncio.Future | None = None
        self.pressed = False

    def __call__(self) -> None:  # the SIGINT handler, run by the event loop
        if self.foreground is not None and not self.foreground.done():
            self.pressed = True
            self.foreground.cancel()

    async def run(self, work: Awaitable[T]) -> tuple[T | None, bool]:
        """Run `work` in the foreground: (its result, False), or (None, True) when Ctrl-C cancelled it."""
        self.foreground, self.pressed = asyncio.ensure_future(work), False
        try:
            return await self.foreground, False
        except asyncio.CancelledError:
            if self.pressed and self.foreground.cancelled():  # Ctrl-C, not a cancellation of the chat itself
                return None, True
            raise
        finally:
            self.foreground = None


@dataclass(frozen=True)
class Style:
    """How notes and footers look: dim on a terminal (unless NO_COLOR or TERM=dumb), plain otherwise."""
    dim_on: bool
    sep: str

    @classmethod
    def for_stream(cls, out: TextIO, environ: dict[str, str] | None = None) -> "Style":
        env = os.environ if environ is None else environ
        tty = out.isatty() and "NO_COLOR" not in env and env.get("TERM") != "dumb"
        utf8 = (getattr(out, "encoding", None) or "").lower().replace("-", "") == "utf8"
        return cls(dim_on=tty, sep=" · " if utf8 else " | ")

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.dim_on else text


# ---- one turn ------------------------------------------------------------------------------------------------------
async def stream_reply(client: EdgeClient, prompt_ids: list[int], stop: Sequence[str], interrupts: Interrupts,
                       out: TextIO) -> Turn:
    """Stream one reply to `out` as the cloud commits it; Ctrl-C ends it early. Either way the generation is
    closed, which cancels its call: the cloud frees the session."""
    gen = client.generate(prompt_ids, stop=stop)

    async def show() -> None:
        async for piece in gen.stream_text():
            out.write(piece)
            out.flush()

    try:
        _, interrupted = await interrupts.run(show())
    finally:
        await gen.aclose()
    return Turn(gen.text, gen.stats.to_dict(), interrupted)


async def answer(client: EdgeClient, messages: list[Message], budget: int | None, stop: Sequence[str],
                 interrupts: Interrupts, out: TextIO, style: Style) -> list[Message]:
    """Answer the last user message of `messages` and print the footer; returns the conversation after the turn
    (oldest turns dropped if they did not fit; the user message dropped again if it could not be answered)."""
    tokenizer = client.draft.tokenizer
    try:
        messages, dropped = fit_history(messages, lambda m: len(encode_messages(tokenizer, m)), budget)
    except ValueError as e:
        out.write(style.dim(f"(not sent: {e})") + "\n")
        return messages[:-1]
    if dropped:
        which = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
        out.write(style.dim(f"(the conversation outgrew the cloud's context: dropped {which})") + "\n")
    try:
        turn = await stream_reply(client, encode_messages(tokenizer, messages), stop, interrupts, out)
    except EdgeError as e:
        out.write("\n")
        print(f"picospec-edge: {e} (this message is not kept; /exit to leave)", file=sys.stderr, flush=True)
        return messages[:-1]
    out.write("\n" + style.dim(format_footer(turn.stats, interrupted=turn.interrupted, sep=style.sep)) + "\n")
    out.flush()
    return messages + [{"role": "assistant", "content": turn.text}]


def run_command(line: str, history: list[Message], system: str | None, out: TextIO) -> list[Message] | None:
    """A /command: the conversation after it, or None for /exit."""
    if line == "/exit":
        return None
    if line == "/reset":
        out.write("(conversation cleared)\n")
        return initial_history(system)
    if line != "/help":
        out.write(f"unknown command {line.split()[0]}\n")
    out.write("".join(f"  {name}  {what}\n" for name, what in COMMANDS.items()))
    return history


# ---- the chat ------------------------------------------------------------------------------------------------------
async def connect(client: EdgeClient, config: EdgeConfig) -> int | None:
    """Wait for the cloud (saying so) and return the prompt budget it allows: its context less the reply's tokens.
    None in edge mode, which needs no cloud."""
    if config.mode == "edge":
        return None
    info = await client.connect(on_retry=CloudWaitReporter())
    if config.max_new_tokens > info.max_new_tokens:
        raise EdgeError(f"--max-new-tokens {config.max_new_tokens} is more than the cloud allows ({info.max_new_tokens})")
    print(f"picospec-edge: cloud serves {info.target_model} on {info.device} (context {info.max_context} tokens)",
          file=sys.stderr, flush=True)
    return info.max_context - config.max_new_tokens


async def load_and_chat(config: EdgeConfig, args: argparse.Namespace) -> None:
    """The draft loaded while the cloud is found, as the one-shot CLI does (a tokenizer the cloud would refuse is
    refused before the draft's weights load), then the conversation."""
    draft, _ = await draft_and_cloud(config, need_cloud=config.mode != "edge", announce=False)
    await chat(config, args, draft)


async def chat(config: EdgeConfig, args: argparse.Namespace, draft: LoadedModel, out: TextIO = sys.stdout,
               fd: int = 0) -> None:
    loop, interrupts = asyncio.get_running_loop(), Interrupts()
    loop.add_signal_handler(signal.SIGINT, interrupts)
    style, reader, history = Style.for_stream(out), LineReader(fd), initial_history(args.system)
    echoed = os.isatty(fd)  # a terminal echoes what is typed
    try:
        async with EdgeClient(config, draft) as client:
            budget, interrupted = await interrupts.run(connect(client, config))
            if interrupted:
                out.write("\n")
                return
            out.write(style.dim("(Ctrl-C stops a reply; Ctrl-D or /exit ends the chat; /help)") + "\n")
            while True:
                out.write(PROMPT)
                out.flush()
                line, interrupted = await interrupts.run(reader.readline())
                if interrupted or line is None:
                    out.write("\n")
                    return
                if not echoed:  # input from a pipe or a file: show it, so the transcript reads as a chat
                    out.write(line + "\n")
                line = line.strip()
                if line.startswith("/"):
                    history = run_command(line, history, args.system, out)
                    if history is None:
                        return
                elif line:
                    history = await answer(client, history + [{"role": "user", "content": line}], budget,
                                           args.stop or (), interrupts, out, style)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="picospec-edge chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end a reply where TEXT first appears (not printed); repeat for several")
    p.add_argument("--log-level", default="WARNING")
    add_config_args(p, EdgeConfig)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    config = config_from_args(EdgeConfig, args)
    try:
        check_edge_startup(config, one_mode=True)
    except ValueError as e:
        usage_error("picospec-edge chat", e)
    try:
        asyncio.run(load_and_chat(config, args))
    except (EdgeError, ModelError, ValueError) as e:
        sys.exit(f"picospec-edge chat: {e}")
    except KeyboardInterrupt:  # Ctrl-C while the draft loads
        print()
    print("bye", flush=True)


if __name__ == "__main__":
    main()
