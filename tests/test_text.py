"""Stop strings and incremental detokenisation (edge_client/text.py), without gRPC: the pure helpers, then
TextStream over real tokenizers (the tiny models' character tokenizer, SmolLM2's byte-level BPE), where a stop
string spans token boundaries and a multi-byte character is split across tokens."""
from __future__ import annotations

import pytest

from picospec.edge_client.text import (MAX_STOP_STRINGS, TextStream, check_stop_strings, find_stop,
                                       stop_prefix_len)
from picospec.shared.models import load_model


@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_model("smollm2-135m-instruct", progress=False).tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_model("tiny-random", progress=False).tokenizer


def test_find_stop_takes_the_earliest_occurrence_of_any_stop_string() -> None:
    assert find_stop("abc END x STOP", ["STOP", "END"]) == 4
    assert find_stop("abc", ["x"]) is None
    # only occurrences that end at or after `start` count: text before it was checked already
    assert find_stop("END..END", ["END"], start=5) == 5
    assert find_stop("xEND", ["END"], start=3) == 1   # ends at index 3: found


def test_stop_prefix_len_holds_back_what_may_start_a_stop_string() -> None:
    assert stop_prefix_len("hello wor", ["world"]) == 3
    assert stop_prefix_len("hello", ["world"]) == 0
    assert stop_prefix_len("abcab", ["abcabd"]) == 5
    assert stop_prefix_len("xx\n", ["\n\n", "###"]) == 1
    assert stop_prefix_len("done", ["done"]) == 0   # a whole stop string is found, not held


@pytest.mark.parametrize("stop, message", [
    ([""], "non-empty"), (["x" * 300], "at most 256"), (["a"] * (MAX_STOP_STRINGS + 1), "at most 16")])
def test_bad_stop_strings_are_refused(stop, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_stop_strings(stop)


def _greedy_like_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _push_one_by_one(stream: TextStream, ids: list[int]) -> tuple[list[str], int]:
    pieces, used = [], 0
    for i in ids:
        pieces.append(stream.push([i]))
        used += stream.tokens_kept
        if stream.stopped:
            break
    return pieces, used


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_stop_string_spanning_tokens_ends_at_the_completing_token(smol_tokenizer, chunk: int) -> None:
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))"
    ids = _greedy_like_ids(smol_tokenizer, text)
    pieces = [smol_tokenizer.decode([i]) for i in ids]
    # a stop string made of the last 2 characters of one token and the first 2 of the next
    k = next(k for k in range(1, len(ids)) if len(pieces[k - 1]) >= 2 and len(pieces[k]) >= 2)
    stop = pieces[k - 1][-2:] + pieces[k][:2]
    expected = text[: text.find(stop)]
    stream, released, kept = TextStream(smol_tokenizer, [stop]), "", 0
    for start in range(0, len(ids), chunk):
        released += stream.push(ids[start : start + chunk])
        kept = start + stream.tokens_kept
        if stream.stopped:
            break
    assert stream.stopped and released == expected == stream.released
    assert kept == k + 1                  # the token that completed the stop string is the last one kept


def test_text_is_never_released_then_taken_back(smol_tokenizer) -> None:
    text = "Paris is the capital of France.\n\nThe end"
    ids = _greedy_like_ids(smol_tokenizer, text)
    stream = TextStream(smol_tokenizer, ["\n\nThe end", "capital of Spain"])
    pieces, _ = _push_one_by_one(stream, ids)
    joined = "".join(pieces)
    assert stream.stopped and joined == "Paris is the capital of France."
    # "capital of " could start "capital of Spain": it was held until "France" ruled it out, never released early
    assert all("capital of" not in p or "France" in p for p in pieces)


def test_a_split_multibyte_character_waits_for_its_last_byte(smol_tokenizer) -> None:
    text = "naïve café 東京 ok"
    ids = _greedy_like_ids(smol_tokenizer, text)
    stream = TextStream(smol_tokenizer)
    pieces = [stream.push([i]) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_without_a_stop_the_held_prefix_is_released_at_the_end(tiny_tokenizer) -> None:
    ids = _greedy_like_ids(tiny_tokenizer, "abc ab")
    stream = TextStream(tiny_tokenizer, ["ab!"])
    pieces, used = _push_one_by_one(stream, ids)
    assert not stream.stopped and "".join(pieces) == "abc "   # "ab" might begin "ab!": held
    assert stream.finish() == "ab" and stream.released == "abc ab"


def test_a_stop_string_at_the_very_start_releases_nothing(tiny_tokenizer) -> None:
    ids = _greedy_like_ids(tiny_tokenizer, "stop here")
    stream = TextStream(tiny_tokenizer, ["stop"])
    pieces, used = _push_one_by_one(stream, ids)
    assert stream.stopped and "".join(pieces) == "" and used == 4
    with pytest.raises(RuntimeError):
        stream.push(ids[:1])
