"""The two console scripts as separate processes over a real socket, as a user runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.proc_util import cloud_process

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cloud():
    # the torch engine: greedy speculation equals the cloud alone token for token (llama.cpp's logits move with the
    # pass a position runs in, see tests/test_chat.py's cloud)
    with cloud_process("smollm2-135m-instruct", "--engine", "hf") as (_, address):
        yield address


def _edge(server: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "picospec-edge", "--server", server, "--draft", "smollm2-135m-instruct:layers=8", "--threads", "1", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PICOSPEC_WAIT_READY_S": "60"},
    )


def test_edge_json_output_across_processes(cloud):
    r = _edge(cloud, "--prompt", "The capital of France is", "--max-new-tokens", "12", "--mode", "cloud,sync,edge", "--json")
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["mode"] for o in out] == ["cloud", "sync", "edge"]
    assert out[0]["token_ids"] == out[1]["token_ids"] and out[0]["text"] == out[1]["text"]
    for o in out:
        s = o["stats"]
        for key in ("tokens_per_s", "ttft_s", "rounds", "mean_accepted_len", "acceptance_rate", "bytes_up", "bytes_down",
                    "bytes_up_per_token", "bytes_down_per_token"):
            assert key in s
        assert 0 < len(o["token_ids"]) <= 12
    assert out[1]["stats"]["rounds"] > 0 and out[1]["stats"]["bytes_up"] > 0


def test_edge_streams_text_and_prints_a_table(cloud):
    r = _edge(cloud, "--prompt", "Say hello.", "--chat", "--max-new-tokens", "8", "--mode", "cloud,sync")
    assert r.returncode == 0, r.stderr
    assert "--- cloud ---" in r.stdout and "--- sync ---" in r.stdout
    assert "| metric" in r.stdout and "bytes up / token" in r.stdout


def test_edge_refused_by_a_mismatched_tokenizer_exits_with_a_clear_error(cloud):
    r = subprocess.run(
        [BIN / "picospec-edge", "--server", cloud, "--draft", "tiny-random", "--prompt", "hi", "--mode", "sync"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0 and "tokenizer mismatch" in r.stderr


def test_env_vars_configure_the_edge(cloud):
    r = subprocess.run(
        [BIN / "picospec-edge", "--server", cloud, "--draft", "smollm2-135m-instruct:layers=8", "--prompt", "Hi", "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PICOSPEC_MAX_NEW_TOKENS": "3", "PICOSPEC_MODE": "cloud"},
    )
    assert r.returncode == 0, r.stderr
    o = json.loads(r.stdout)
    assert o["mode"] == "cloud" and o["stats"]["generated_tokens"] == len(o["token_ids"])
    # PICOSPEC_MAX_NEW_TOKENS=3 took effect: exactly 3 tokens, or fewer only because the model ended the text
    assert o["stats"]["finish_reason"] == "length" and len(o["token_ids"]) == 3 or \
        o["stats"]["finish_reason"] == "eos" and 1 <= len(o["token_ids"]) < 3, o
