"""picospec-edge chat: the footer and the history as pure functions, the terminal plumbing (lines, Ctrl-C), and the
console script driven through a pseudo-terminal against a real picospec-cloud process."""
from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from picospec.edge_client.chat import Interrupts, LineReader, Style, fit_history, format_footer, run_command
from picospec.edge_client.client import EdgeClient, EdgeError
from picospec.edge_client.text import encode_messages
from picospec.shared.config import EdgeConfig
from picospec.shared.models import load_model
from tests.proc_util import cloud_process

BIN = Path(sys.executable).parent
TARGET = "smollm2-135m-instruct"


# ---- the footer ----------------------------------------------------------------------------------------------------
def _stats(**over: object) -> dict:
    s = {"mode": "pipeline", "verify_mode": "dense", "exact": True, "generated_tokens": 48, "tokens_per_s": 21.34,
         "ttft_s": 0.176, "drafted_tokens": 52, "accepted_tokens": 31, "bytes_up": 1234, "bytes_down": 900,
         "finish_reason": "eos"}
    return {**s, **over}


def test_footer_is_one_compact_line():
    assert format_footer(_stats()) == \
        "[pipeline dense · 48 tokens · 21.3 tok/s · ttft 0.18 s · accepted 31/52 drafts · 1.2 KB up 900 B down · eos]"


def test_footer_marks_approximate_modes_and_interrupted_replies():
    line = format_footer(_stats(mode="picospec", verify_mode="split-topk", exact=False, finish_reason="cancelled"),
                         interrupted=True, sep=" | ")
    assert line.startswith("[picospec split-topk APPROXIMATE | ") and line.endswith(" | interrupted]")
    assert "\n" not in line


def test_footer_leaves_out_what_a_mode_does_not_have():
    # the cloud alone: no drafts; a reply cut before its first token: no rate, no ttft
    cloud = format_footer(_stats(mode="cloud", verify_mode=None, drafted_tokens=0, accepted_tokens=0,
                                 tokens_per_s=None, ttft_s=None, generated_tokens=0, finish_reason="length"))
    assert cloud == "[cloud · 0 tokens · 1.2 KB up 900 B down · length]"
    edge = format_footer(_stats(mode="edge", verify_mode=None, exact=False, drafted_tokens=0, bytes_up=0, bytes_down=0))
    assert edge.startswith("[edge APPROXIMATE · 48 tokens") and "up" not in edge


def test_style_is_dim_on_a_terminal_only():
    class Out:
        encoding = "utf-8"

        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    assert Style.for_stream(Out(True), {}).dim("x") == "\x1b[2mx\x1b[0m"
    assert Style.for_stream(Out(True), {"NO_COLOR": "1"}).dim("x") == "x"
    assert Style.for_stream(Out(False), {}).dim("x") == "x"


# ---- the history ---------------------------------------------------------------------------------------------------
def _words(messages) -> int:  # a stand-in tokenizer: one token per word, two per message for the template
    return sum(len(m["content"].split()) + 2 for m in messages)


def _conversation(turns: int, system: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": "be brief"}] if system else []
    for i in range(turns):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i} a b"}]
    return msgs + [{"role": "user", "content": "last question"}]


def test_history_that_fits_is_kept_whole():
    msgs = _conversation(3)
    assert fit_history(msgs, _words, 1000) == (msgs, 0)
    assert fit_history(msgs, _words, None) == (msgs, 0)


def test_history_drops_oldest_turns_keeping_the_system_message():
    msgs = _conversation(3)  # system 4, each turn 4 + 6, last 4: 38 tokens
    kept, dropped = fit_history(msgs, _words, 30)
    assert dropped == 1 and kept == msgs[:1] + msgs[3:] and _words(kept) <= 30
    kept, dropped = fit_history(msgs, _words, 8)
    assert dropped == 3 and kept == [msgs[0], msgs[-1]]
    kept, dropped = fit_history(_conversation(2, system=False), _words, 14)  # 24 tokens: one turn less fits
    assert dropped == 1 and [m["content"] for m in kept] == ["question 1", "answer 1 a b", "last question"]


def test_history_that_cannot_fit_says_by_how_much():
    with pytest.raises(ValueError, match="is 8 tokens.*at most 7"):
        fit_history(_conversation(2), _words, 7)


def test_commands():
    class Out(list):
        write = list.append

    out, hist = Out(), _conversation(1)
    assert run_command("/exit", hist, "sys", out) is None
    assert run_command("/reset", hist, "sys", out) == [{"role": "system", "content": "sys"}]
    assert run_command("/reset", hist, None, out) == []
    assert run_command("/nope", hist, None, out) is hist and "unknown command /nope" in "".join(out)


# ---- the terminal plumbing -----------------------------------------------------------------------------------------
def test_line_reader_reads_lines_from_a_pipe_and_none_at_eof():
    async def main() -> list:
        r, w = os.pipe()
        reader, got = LineReader(r), []
        os.write(w, "héllo\nsecond".encode())
        got.append(await reader.readline())
        asyncio.get_running_loop().call_later(0.05, lambda: (os.write(w, b" half\n"), os.close(w)))
        got += [await reader.readline(), await reader.readline()]
        os.close(r)
        return got

    assert asyncio.run(main()) == ["héllo", "second half", None]


def test_line_reader_reads_a_regular_file(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("a\nb")

    async def main() -> list:
        with open(f, "rb") as fh:
            reader = LineReader(fh.fileno())
            return [await reader.readline() for _ in range(3)]

    assert asyncio.run(main()) == ["a", "b", None]


def test_sigint_cancels_the_foreground_task_only():
    async def main() -> tuple:
        interrupts, loop = Interrupts(), asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, interrupts)
        try:
            loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
            cut = await interrupts.run(asyncio.sleep(5, "late"))
            done = await interrupts.run(asyncio.sleep(0, "done"))
            os.kill(os.getpid(), signal.SIGINT)  # nothing in the foreground: ignored
            await asyncio.sleep(0.05)
            return cut, done
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    assert asyncio.run(main()) == ((None, True), ("done", False))


# ---- the console script through a pseudo-terminal ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cloud():
    # one session at a time: a session the chat failed to free would refuse the next turn. The torch engine: its logits
    # do not move with the pass a position runs in, so greedy speculation equals the cloud alone token for token;
    # llama.cpp's do (by up to tests/llama_reference.py:BATCH_NOISE), which flips near ties in a 64-token reply (seen in
    # CI on another CPU) and is checked against its own bound in tests/test_llama_cpp.py
    with cloud_process(TARGET, "--max-sessions", "1", "--engine", "hf") as started:
        yield started


class Terminal:
    """A process on the slave side of a pseudo-terminal, as its controlling terminal: what is written to the master
    is typed (\\x03 becomes SIGINT, \\x04 end of input); what the process writes is read back."""

    def __init__(self, argv: list, stderr_path: Path) -> None:
        master, slave = os.openpty()
        self.master, self.out = master, ""
        self.stderr = open(stderr_path, "w")

        def controlling_tty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=self.stderr, preexec_fn=controlling_tty,
                                     env={**os.environ, "PICOSPEC_WAIT_READY_S": "60", "TERM": "xterm"})
        os.close(slave)

    def type(self, data: str) -> None:
        os.write(self.master, data.encode())

    def expect(self, pattern: str, start: int, timeout: float = 120) -> re.Match:
        """The first match of `pattern` in the output from `start` on (ANSI styles and \\r removed), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern, re.S).search(self.out, start)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise AssertionError(f"no {pattern!r} within {timeout} s; output:\n{self.out}\nstderr:\n{self.errors()}")
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the process closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"EOF before {pattern!r}; output:\n{self.out}\nstderr:\n{self.errors()}")
            self.out += re.sub(r"\x1b\[[0-9;]*m", "", data.decode("utf-8", errors="replace")).replace("\r", "")

    def errors(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)
        os.close(self.master)
        self.stderr.close()


def _turn(term: Terminal, text: str) -> tuple[str, str]:
    """Type a message; return the reply as shown and its footer line."""
    start = len(term.out)
    term.type(text + "\n")
    echo = term.expect(re.escape(text) + "\n", start)
    prompt = term.expect(r"\nyou> ", echo.end())
    *reply, footer = term.out[echo.end():prompt.start()].split("\n")
    return "\n".join(reply), footer


async def _reference_replies(server: str, target, user_turns: list[str], max_new_tokens: int) -> list[str]:
    """The target's own greedy replies, turn by turn: cloud-mode generations over the same conversation."""
    history, replies = [], []
    async with EdgeClient(EdgeConfig(server=server, draft=TARGET, wait_ready_s=60), target) as client:
        for text in user_turns:
            history.append({"role": "user", "content": text})
            gen = client.generate(encode_messages(target.tokenizer, history), mode="cloud", temperature=0.0,
                                  max_new_tokens=max_new_tokens)
            await gen.collect()
            replies.append(gen.text)
            history.append({"role": "assistant", "content": gen.text})
    return replies


async def _wait_for_a_free_slot(server: str, target, timeout_s: float) -> None:
    """Until the cloud accepts a session: a one-token cloud-mode generation (which ends before its call does, so it
    leaves the slot free), retried while it is refused."""
    deadline = time.monotonic() + timeout_s
    async with EdgeClient(EdgeConfig(server=server, draft=TARGET, wait_ready_s=60), target) as client:
        while True:
            try:
                await client.generate([1, 2, 3], mode="cloud", max_new_tokens=1).collect()
                return
            except EdgeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)


# turns 1 and 2 end at EOS well within the budget; the third needs room to be interrupted mid-reply
MAX_NEW_TOKENS = 64
TURNS = ["What is the capital of France?", "And of Germany?"]


def test_chat_through_a_pseudo_terminal(cloud, tmp_path):
    proc, server = cloud
    term = Terminal([BIN / "picospec-edge", "chat", "--server", server, "--draft", f"{TARGET}:int8",
                     "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS), "--threads", "1"],
                    tmp_path / "stderr.txt")
    try:
        # while the chat loads its draft: the target's own replies for the same conversation (before any chat turn:
        # the cloud serves one session at a time). Cloud mode runs no draft: the target stands in for one.
        target = load_model(TARGET, progress=False)
        references = asyncio.run(_reference_replies(server, target, TURNS, MAX_NEW_TOKENS))
        term.expect(r"you> ", 0)
        for text, reference in zip(TURNS, references):
            # a session that ended at EOS keeps its slot until the cloud's step in flight (decode-ahead) is done
            asyncio.run(_wait_for_a_free_slot(server, target, timeout_s=10))
            reply, footer = _turn(term, text)
            assert reply == reference, (text, term.out)
            # eos or length: whether the reply ends within MAX_NEW_TOKENS is the target's
            assert re.fullmatch(r"\[pipeline coupled · \d+ tokens · .* tok/s · ttft .* · (eos|length)\]", footer), footer

        # Ctrl-C mid-reply: the turn ends, marked interrupted; the chat goes on
        start = len(term.out)
        term.type("Count from 1 to 100, separated by commas.\n")
        echo = term.expect(r"commas\.\n", start)
        term.expect(r"\S", echo.end())  # the reply is streaming
        term.type("\x03")
        footer = term.expect(r"\n(\[[^\n]*\])\nyou> ", echo.end())
        assert footer.group(1).endswith(" · interrupted]"), term.out
        tokens = int(re.search(r"· (\d+) tokens ·", footer.group(1)).group(1))
        assert 0 < tokens < MAX_NEW_TOKENS, term.out

        # the cloud freed that session: it serves one at a time, and takes another within seconds; then so does the
        # chat's next turn, over the conversation that kept the interrupted reply
        asyncio.run(_wait_for_a_free_slot(server, target, timeout_s=10))
        reply, footer = _turn(term, "Thanks. What is 2+2?")
        assert reply and footer.startswith("[pipeline coupled · ") and footer.endswith(("· eos]", "· length]")), term.out
        assert proc.poll() is None
        after_connecting = term.errors().split("picospec-edge: cloud serves", 1)[1].split("\n", 1)[1]
        assert not after_connecting.strip(), term.errors()  # no error, no traceback

        # Ctrl-C at the empty prompt ends the chat cleanly
        start = len(term.out)
        term.type("\x03")
        term.expect(r"\nbye\n", start)
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()
