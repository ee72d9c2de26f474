"""Committed token ids to the text a user sees: prompts in, incremental detokenisation and stop strings out.

Terms, used the same way in the CLI, the chat and the OpenAI server:
  released text  text handed to the user; never taken back.
  held text      decoded but not released yet: it ends in a split UTF-8 sequence (U+FFFD), or it could be the start
                 of a stop string.
  stop string    ends the generation at its first occurrence in the generated text. The result is the text before
                 it (OpenAI's convention); the last generated token is the one that completed it. Because every exact
                 mode commits the target's own tokens, this is where the target's own decoding would stop.
Nothing here knows about gRPC or the cloud: the functions are pure and `TextStream` only needs `tokenizer.decode`.
"""
from __future__ import annotations

from typing import Any, Sequence

MAX_STOP_STRINGS = 16      # OpenAI allows 4; a bound on what a request may ask us to scan for
MAX_STOP_CHARS = 256


def check_stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    """The stop strings as a tuple, or ValueError naming what is wrong (empty, too many, too long)."""
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError("a stop string must be a non-empty string")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return stop


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest occurrence of any stop string in text that ends at or after `start`; None if none."""
    best = None
    for s in stop:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (text to hold back)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Prompt text to ids: plain (the tokenizer's default special tokens) or one user turn in the chat template."""
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt)["input_ids"])


def encode_messages(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """A conversation in the tokenizer's chat template, ending with the assistant's turn opened."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


class TextStream:
    """Token ids in, released text out, with stop strings.

    `push(ids)` returns the text those ids release. Once a stop string has appeared, `stopped` is True,
    `tokens_kept` says how many of the last pushed ids the generation keeps (up to the one that completed the stop
    string) and nothing more is released. `finish()` releases the held text at the natural end of a generation.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = check_stop_strings(stop)
        self.ids: list[int] = []
        self.released = ""
        self.stopped = False
        self.tokens_kept = 0

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            raise RuntimeError("TextStream.push after a stop string")
        before = len(self.released)
        if not self.stop:
            self.ids.extend(ids)
            self.tokens_kept = len(ids)
            self._release(self.decode(self.ids), hold=0)
            return self.released[before:]
        # token by token: the stop string's last token is where the generation ends
        for n, token in enumerate(ids, start=1):
            self.ids.append(token)
            text = self.decode(self.ids)
            at = find_stop(text, self.stop, start=len(self.released))
            if at is not None:
                self.released = text[:at] if at >= len(self.released) else self.released
                self.stopped, self.tokens_kept = True, n
                return self.released[before:]
            self._release(text, hold=stop_prefix_len(text, self.stop))
        self.tokens_kept = len(ids)
        return self.released[before:]

    def _release(self, text: str, hold: int) -> None:
        stable = text.rstrip("\ufffd")  # a split UTF-8 sequence waits for its last byte
        end = min(len(stable), len(text) - hold)
        if end > len(self.released) and text.startswith(self.released):
            self.released = text[:end]

    def finish(self) -> str:
        """At the natural end (EOS, length): release everything held; returns what that released."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        rest = text[len(self.released):] if text.startswith(self.released) else ""
        self.released += rest
        return rest
