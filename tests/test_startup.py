"""A one-shot edge's start-up: a usage error comes before torch is imported, and a draft whose tokenizer the cloud
would refuse is refused from its tokenizer alone, before the draft's weights load (the tokenizer loads in a fraction
of the weights' time: 4 s against 22 s for the Qwen 0.5B draft on the torch engine). Tiny built-in models only: the
whole file takes seconds."""
from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys

import pytest

from picospec.edge_client import cli
from picospec.edge_client.transport import EdgeError
from picospec.shared import models
from picospec.shared.config import EdgeConfig
from picospec.shared.fingerprint import tokenizer_fingerprint
from tests.conftest import serving
from tests.proc_util import checkout_env

HEAVY = ("torch", "transformers", "llama_cpp", "numpy")  # seconds of imports (grpc, 0.05 s, may come)


@pytest.mark.parametrize("argv", [
    ["--server", "127.0.0.1:1", "--prompt", "hi", "--max-new-tokens", "0"],
    ["--server", "127.0.0.1:1", "--prompt", "hi", "--draft", "smollm3-135m"],
    ["--server", "127.0.0.1:1", "--prompt", ""],
])
def test_a_usage_error_imports_nothing_heavy(argv):
    code = ("import sys\nfrom picospec.edge_client import cli\ntry:\n    cli.main(sys.argv[1:])\n"
            "except SystemExit as e:\n    print('exit', e.code, file=sys.stderr)\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60,
                       env=checkout_env())
    assert "exit 2" in r.stderr, r.stderr
    assert r.stdout.strip() == "", f"a usage error imported {r.stdout.strip()}"


class WeightsLoaded(AssertionError):
    pass


@pytest.fixture
def loads(monkeypatch):
    """Which model loads were asked for (names); a weights load of a random shape fails the test (it is not wanted
    there, and would take seconds), any other goes ahead."""
    calls: list[tuple[str, object]] = []
    real = models.load_model

    def load_model(name, **kw):
        calls.append((name, kw.get("tokenizer")))
        if name.startswith("random:"):
            raise WeightsLoaded(f"the draft's weights were loaded: {name}")
        return real(name, **kw)

    monkeypatch.setattr(models, "load_model", load_model)
    return calls


def _config(server: str, draft: str) -> EdgeConfig:
    return dataclasses.replace(EdgeConfig(), server=server, draft=draft, wait_ready_s=10.0)


def test_a_mismatched_tokenizer_is_refused_before_the_drafts_weights_load(tiny_target, loads):
    async def scenario():
        async with serving(tiny_target) as (_, address):
            # the cloud's tiny-random speaks a 64-token character tokenizer; the Qwen 0.5B shape's has 151,665
            with pytest.raises(EdgeError, match="tokenizer mismatch: the draft 'random:qwen2.5-0.5b'") as e:
                await cli.draft_and_cloud(_config(address, "random:qwen2.5-0.5b"))
            return str(e.value)

    message = asyncio.run(scenario())
    assert "151665 tokens" in message and "64 tokens" in message and "'tiny-random'" in message
    assert loads == [], "the weights' load was started before the tokenizer check"


def test_a_matching_tokenizer_is_loaded_once_and_handed_to_the_weights(tiny_target, loads):
    async def scenario():
        async with serving(tiny_target) as (_, address):
            return await cli.draft_and_cloud(_config(address, "tiny-random:layers=1"))

    draft, info = asyncio.run(scenario())
    assert [name for name, _ in loads] == ["tiny-random:layers=1"]
    assert loads[0][1] is draft.tokenizer  # the tokenizer loaded for the check, not a second one
    assert tokenizer_fingerprint(draft.tokenizer).sha256 == info.tokenizer.sha256


def test_the_check_waits_for_whichever_comes_second():
    """The cloud's answer after the tokenizer: the check runs then, on the loop (the weights' load is abandoned)."""
    from picospec.shared.rpc import picospec_pb2 as pb
    from picospec.shared.protocol import PROTOCOL_VERSION

    tokenizer = models.load_tokenizer("tiny-random")
    check = cli.TokenizerCheck(_config("127.0.0.1:1", "tiny-random"))
    check.tokenizer_loaded(tokenizer)  # nothing known of the cloud yet: no verdict
    other = pb.InfoReply(protocol_version=PROTOCOL_VERSION, target_model="other",
                         tokenizer=pb.TokenizerFingerprint(num_tokens=64, sha256="0" * 64))
    with pytest.raises(EdgeError, match="tokenizer mismatch"):
        check.cloud_found(other)
    mine = tokenizer_fingerprint(tokenizer)
    same = cli.TokenizerCheck(_config("127.0.0.1:1", "tiny-random"))
    same.cloud_found(pb.InfoReply(protocol_version=PROTOCOL_VERSION, target_model="tiny-random",
                                  tokenizer=pb.TokenizerFingerprint(num_tokens=mine.num_tokens, sha256=mine.sha256)))
    same.tokenizer_loaded(tokenizer)  # the same tokenizer: no error
    # another protocol version is connect's to refuse, with its own message
    older = cli.TokenizerCheck(_config("127.0.0.1:1", "tiny-random"))
    older.cloud_found(pb.InfoReply(protocol_version=PROTOCOL_VERSION + 1, target_model="other",
                                   tokenizer=other.tokenizer))
    older.tokenizer_loaded(tokenizer)


def test_chat_and_serve_refuse_a_mismatched_tokenizer_before_the_drafts_weights_load(tiny_target, loads):
    """`picospec-edge chat` and `serve` load their draft as the one-shot CLI does: beside the cloud's probe, its
    tokenizer checked first (they loaded the weights, then found the mismatch, before)."""
    from picospec.edge_client import chat, openai_server

    async def scenario():
        async with serving(tiny_target) as (_, address):
            config = _config(address, "random:qwen2.5-0.5b")
            with pytest.raises(EdgeError, match="tokenizer mismatch"):
                await chat.load_and_chat(dataclasses.replace(config, mode="pipeline"), None)
            with pytest.raises(EdgeError, match="tokenizer mismatch"):
                await openai_server.serve(config, "127.0.0.1", 0, None, "warning")

    asyncio.run(scenario())
    assert loads == [], "the weights' load was started before the tokenizer check"
