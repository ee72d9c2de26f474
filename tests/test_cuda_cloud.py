"""A cloud on CUDA (both engines, batching on and off) against the same cloud on the CPU: every verification mode,
greedy and sampled, the same tokens. Skipped without a GPU (an allowed skip, also under CI)."""
from __future__ import annotations

import pytest
import torch

from picospec.cloud_server.grpc_setup import start_server
from picospec.cloud_server.server import PicoSpecService
from picospec.shared.config import CloudConfig
from picospec.shared.models import load_model
from tests.conftest import edge, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the CUDA cloud needs a GPU (allowed skip, also under CI)")
VERIFY = ("coupled", "dense", "split-exact", "split-topk")


async def _outputs(target, draft, device: str, **cloud) -> dict[str, list[int]]:
    """Every mode x verification x temperature whose tokens are a function of the seed alone."""
    service = PicoSpecService(target, CloudConfig(target=target.name, device=device, **cloud))
    server, port = await start_server(service, "127.0.0.1:0")
    out = {}
    try:
        for temperature in (0.0, 1.0):
            for verify in VERIFY:
                async with edge(f"127.0.0.1:{port}", draft, max_new_tokens=24, ignore_eos=True, verify=verify,
                                temperature=temperature, seed=3) as client:
                    prompt = target.tokenizer("on the gpu")["input_ids"]
                    for mode in ("cloud", "sync", "pipeline"):
                        if mode == "pipeline" and temperature > 0 and verify != "coupled":
                            continue  # the pipeline's batches follow timing, and the split and dense modes' tokens
                            # follow the drafts they judge: exact in law, not token for token across machines
                        out[f"{mode}/{verify}/T{temperature}"] = await client.generate(prompt, mode=mode).collect()
    finally:
        await server.stop(grace=None)
        service.worker.shutdown(wait=True)
    return out


@pytest.mark.parametrize("cloud", [dict(engine="static", batching="on"), dict(engine="static", batching="off"),
                                   dict(engine="hf")], ids=["static-batched", "static", "hf"])
def test_a_cuda_cloud_gives_what_the_cpu_cloud_gives(cloud):
    draft = load_model("tiny-random:layers=1", progress=False)
    on_cpu = run(_outputs(load_model("tiny-random", progress=False), draft, "cpu"))
    on_gpu = run(_outputs(load_model("tiny-random", device="cuda", progress=False), draft, "cuda", **cloud))
    assert on_gpu == on_cpu
