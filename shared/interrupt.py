"""Ending a console script: usage errors and signals as one line on stderr, never a traceback.

    exit status 2         a usage error (a flag's value out of range, a --server that cannot name a cloud, an unknown
                          model), said before any model loads or connection opens
    exit status 130, 143  Ctrl-C (SIGINT), SIGTERM: 128 + the signal's number, the shell's convention, so that a
                          supervisor can tell which signal ended the program
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any, Coroutine, NoReturn, TypeVar

T = TypeVar("T")
USAGE_ERROR = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class OneLineParser(argparse.ArgumentParser):
    """argparse's own usage errors (a value that is not a number, a missing or unknown flag) as one line and exit 2,
    like every other usage error here, instead of the usage synopsis above the error."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} ({self.prog} --help lists the flags)", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)


def exit_status(sig: int) -> int:
    """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(sig)


def usage_error(prog: str, error: BaseException) -> NoReturn:
    """One line naming the program and what is wrong; exit 2."""
    print(f"{prog}: {error}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def exit_interrupted(prog: str, sig: int) -> NoReturn:
    """`PROG: interrupted`, then the process ends at once with 128 + sig. os._exit, not sys.exit: a draft still
    loading in its thread (torch's import, a model's weights) would otherwise hold the exit until it finished."""
    print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(exit_status(sig))


def run_interruptible(main: Coroutine[Any, Any, T], prog: str) -> T:
    """asyncio.run(main), where SIGINT or SIGTERM cancels `main` and waits for its cleanup (a generation's `finally`
    blocks cancel its call, so the cloud frees the session), then ends the program with exit_interrupted. A second
    signal during that cleanup ends it at once."""
    received: list[int] = []

    def on_signal(sig: int, task: asyncio.Task) -> None:
        if received:
            exit_interrupted(prog, received[0])
        received.append(sig)
        task.cancel()

    async def guarded() -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig, task)
        try:
            return await main
        except BaseException:  # CancelledError, or what the cancelled code made of it
            if received:
                exit_interrupted(prog, received[0])  # inside the loop: no wait for the default executor's threads
            raise

    try:
        return asyncio.run(guarded())
    except KeyboardInterrupt:  # a Ctrl-C before the loop's handler was in place
        exit_interrupted(prog, signal.SIGINT)
