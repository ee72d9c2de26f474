"""`--device-map auto|balanced` (issue 12 item 4): a target too big for one GPU is spread over several by
transformers/accelerate, and the cloud builds its inputs on the model's first device. On a machine without a GPU
the map puts everything on the cpu, which is what runs here: the flag and its environment variable, the refusal
with :int8, and that a cloud loaded through the map (a saved checkpoint directory, and tiny-random built in code)
generates the target's own greedy tokens.
"""
from __future__ import annotations

import pytest
import torch

from picospec.cloud_server.cli import build_parser, load_target
from picospec.shared.config import CloudConfig, config_from_args
from picospec.shared.models import ModelError, _tiny_random, input_device, load_model
from tests.conftest import edge, run, serving

PROMPT = "the quick brown fox"
NEW_TOKENS = 24


def config(argv: list[str], env: dict[str, str] | None = None) -> CloudConfig:
    return config_from_args(CloudConfig, build_parser().parse_args(argv), env or {})


def test_flag_and_environment():
    assert config([]).device_map == "none"
    assert config(["--device-map", "auto"]).device_map == "auto"
    assert config([], {"PICOSPEC_DEVICE_MAP": "balanced"}).device_map == "balanced"
    assert config(["--device-map", "auto"], {"PICOSPEC_DEVICE_MAP": "balanced"}).device_map == "auto"
    with pytest.raises(SystemExit):
        config(["--device-map", "sequential"])
    with pytest.raises(SystemExit, match="PICOSPEC_DEVICE_MAP"):
        config([], {"PICOSPEC_DEVICE_MAP": "everywhere"})


def test_int8_is_refused_with_a_device_map():
    with pytest.raises(ModelError, match="int8 runs on the cpu only and cannot be spread"):
        load_model("tiny-random:int8", device_map="auto", progress=False)
    with pytest.raises(ModelError, match="device map 'sideways'"):
        load_model("tiny-random", device_map="sideways", progress=False)


@torch.inference_mode()
def greedy(model: torch.nn.Module, prompt_ids: list[int], n: int) -> list[int]:
    """The unmapped target's own greedy continuation, past end-of-sequence as the edge's ignore_eos asks (generate's
    min_new_tokens would instead suppress EOS and pick another token)."""
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> str:
    """tiny-random (seed 0: tiny_target's weights) saved as a checkpoint directory, loaded by from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-checkpoint")
    model, tokenizer = _tiny_random(0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("source", ["checkpoint", "tiny-random"])
def test_a_mapped_cloud_generates_the_targets_greedy_tokens(source, saved_tiny, tiny_target, tiny_draft):
    name = saved_tiny if source == "checkpoint" else "tiny-random"
    target, cfg = load_target(CloudConfig(target=name, device_map="auto"))
    # no GPU here: the map puts everything on the cpu, and the device handed on is the embedding's
    assert cfg.device == str(input_device(target.model)) == "cpu"
    assert {p.device.type for p in target.model.parameters()} == {"cpu"}
    prompt_ids = tiny_target.tokenizer(PROMPT)["input_ids"]
    ref = greedy(tiny_target.model, prompt_ids, NEW_TOKENS)

    async def scenario() -> dict[str, list[int]]:
        async with serving(target, device=cfg.device, device_map=cfg.device_map) as (_, address):
            async with edge(address, tiny_draft, max_new_tokens=NEW_TOKENS, ignore_eos=True) as client:
                return {mode: await client.generate(prompt_ids, mode=mode).collect()
                        for mode in ("cloud", "sync", "pipeline")}

    out = run(scenario())
    assert out == {"cloud": ref, "sync": ref, "pipeline": ref}
