"""picospec-cloud: host the target model and serve verification over gRPC."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

import torch

from picospec.cloud_server.server import PicoSpecService, start_server
from picospec.shared.config import CloudConfig, add_config_args, config_from_args
from picospec.shared.models import ModelError, load_model

log = logging.getLogger("picospec.cloud")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="picospec-cloud", description=__doc__)
    add_config_args(p, CloudConfig)
    p.add_argument("--log-level", default="INFO")
    return p


async def serve(config: CloudConfig) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    log.info("loading target %s on %s (%s)", config.target, config.device, config.dtype)
    target = load_model(config.target, device=config.device, dtype=getattr(torch, config.dtype))
    log.info("target loaded in %.1fs", time.perf_counter() - t0)
    service = PicoSpecService(target, config)
    server, port = await start_server(service, f"{config.host}:{config.port}")
    # the line scripts wait for: it appears only once the model is loaded and the port is bound
    print(f"picospec-cloud: serving {config.target} on {config.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop(grace=2.0)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    config = config_from_args(CloudConfig, args)
    try:
        asyncio.run(serve(config))
    except ModelError as e:
        sys.exit(f"picospec-cloud: {e}")


if __name__ == "__main__":
    main()
