"""picospec-cloud: host the target model and serve verification over gRPC."""
from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from picospec.cloud_server.auth import TokenAuth, TokenFileError
from picospec.shared.config import CloudConfig, add_config_args, check_cloud_config, config_from_args
from picospec.shared.connection import ping_schedule_ms, server_tls_files
from picospec.shared.interrupt import OneLineParser, exit_interrupted, usage_error
from picospec.shared.model_names import CLOUD_TORCH_MISSING, ModelError, torch_installed

if TYPE_CHECKING:  # torch and the model code: imported once the arguments are checked (check_arguments)
    from picospec.cloud_server.server import PicoSpecService
    from picospec.shared.models import LoadedModel

log = logging.getLogger("picospec.cloud")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="picospec-cloud", description=__doc__)
    add_config_args(p, CloudConfig)
    p.add_argument("--log-level", default="INFO")
    return p


def check_port_free(host: str, port: int) -> None:
    """OSError where host:port cannot be listened on (another cloud serves it, or the address is not this
    machine's), found before minutes go into loading the model. Port 0 (the OS picks) is always free."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a closed socket's TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e} (another picospec-cloud on it? "
                          "--port picks another)") from None


def check_arguments(config: CloudConfig) -> None:
    """Every flag that cannot work, before torch's import and the model's load: ranges and the target's name
    (shared/config.py:check_cloud_config), TLS files, tokens, keepalive. ConfigError or ConnectionSettingsError
    (ValueErrors), TokenFileError or ModelError naming the flag or the line."""
    check_cloud_config(config)
    if not torch_installed():  # the cloud's verification is torch code, whatever engine runs the target
        raise ModelError(CLOUD_TORCH_MISSING)
    server_tls_files(config.tls_cert, config.tls_key, config.tls_ca)
    if config.auth_tokens:
        TokenAuth(config.auth_tokens)
    ping_schedule_ms(config.peer_timeout_s)


def check_settings(config: CloudConfig) -> None:
    """check_arguments, and the engine's combination with the device (needs the model code, so torch)."""
    from picospec.cloud_server.engine_setup import uses_static_engine

    check_arguments(config)
    uses_static_engine(config)  # --engine static with --device-map: refused before the model loads


def reload_on_sighup(service: PicoSpecService) -> None:
    """SIGHUP: read the tokens file and the TLS files again; a bad file keeps what is in force
    (cloud_server/auth.py, cloud_server/certificates.py)."""
    if service.auth is None and service.certificates is None:
        log.warning("SIGHUP: nothing to reload (no --auth-tokens, no --tls-cert)")
    if service.auth is not None:
        service.auth.reload()
    if service.certificates is not None:
        service.certificates.reload()


def security_summary(service: PicoSpecService) -> str:
    c = service.config
    parts = ["TLS" if c.tls_cert else "plaintext"]
    if c.tls_ca:
        parts.append("client certificates required")
    if service.auth is not None:
        parts.append(f"tokens of {len(service.auth.table.clients)} clients")
    return ", ".join(parts)


def load_target(config: CloudConfig) -> tuple[LoadedModel, CloudConfig]:
    """The target, and the config the service runs with. With --device-map the weights sit where the map put
    them, and `device` becomes the model's input device (its embedding's, the map's first): the sessions build
    their input ids and their own tensors there, and accelerate's hooks return the logits there too."""
    import torch

    from picospec.shared.models import input_device, load_gguf_model, load_model
    mapped = config.device_mapped
    if config.engine == "llama.cpp":
        from picospec.shared.llama_backend import default_threads
        log.info("loading target %s on llama.cpp (the GGUF as shipped)", config.target)
        return load_gguf_model(config.target, threads=config.threads or default_threads()), config
    log.info("loading target %s on %s (%s)", config.target,
             f"device map {config.device_map}" if mapped else config.device, config.dtype)
    target = load_model(config.target, device=config.device, dtype=getattr(torch, config.dtype),
                        device_map=config.device_map)
    if not mapped:
        return target, config
    mapping = getattr(target.model, "hf_device_map", None) or {}  # set only where the map spans several devices
    placed = collections.Counter(f"cuda:{d}" if isinstance(d, int) else str(d) for d in mapping.values())
    config = dataclasses.replace(config, device=str(input_device(target.model)))
    log.info("device map %s: %s; inputs on %s", config.device_map,
             ", ".join(f"{n} modules on {d}" for d, n in sorted(placed.items())) or "one device", config.device)
    return target, config


async def serve(config: CloudConfig) -> None:
    import torch

    from picospec.cloud_server.drain import StopSignals, drain
    from picospec.cloud_server.engine_setup import resolve_engine
    from picospec.cloud_server.grpc_setup import start_server
    from picospec.cloud_server.server import PicoSpecService
    config = resolve_engine(config)
    check_settings(config)
    if config.threads and config.engine != "llama.cpp":
        torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    target, config = load_target(config)
    log.info("target loaded in %.1fs", time.perf_counter() - t0)
    service = PicoSpecService(target, config)
    server, port = await start_server(service, f"{config.host}:{config.port}")
    signals = StopSignals()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.received, sig)
    loop.add_signal_handler(signal.SIGHUP, reload_on_sighup, service)
    log.info("connections: %s; a silent peer is dropped after %g s", security_summary(service), config.peer_timeout_s)
    # the line scripts wait for: it appears only once the model is loaded, the port bound and SIGHUP handled
    print(f"picospec-cloud: serving {config.target} on {config.host}:{port}", flush=True)
    await signals.first.wait()
    await drain(service, server, signals, config.grace_s)
    service.worker.shutdown(wait=False)


MALLOC_ARENAS = 2  # glibc's default is 8 per core


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas before any thread starts, unless MALLOC_ARENA_MAX already says how many. With
    batching every session's jobs get a thread of their own. Each new thread that allocates gets an arena, and the
    cloud's resident memory kept rising: +11% over 10 minutes of 64 sessions, with 300-900 MiB spikes. The same
    soak with 2 arenas (6 minutes, MALLOC_ARENA_MAX=2) stayed flat: -1.7%, peak +4% (docs/results/soak_cpu). False
    where there is no glibc."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_ARENA_MAX = -8  # malloc.h
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def main(argv: list[str] | None = None) -> None:
    limit_malloc_arenas()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    config = config_from_args(CloudConfig, args)
    try:
        check_arguments(config)
    except (ValueError, TokenFileError, ModelError) as e:
        usage_error("picospec-cloud", e)
    try:
        check_port_free(config.host, config.port)
        asyncio.run(serve(config))
    except (ValueError, ModelError, TokenFileError, OSError) as e:  # ValueError: ConnectionSettingsError
        sys.exit(f"picospec-cloud: {e}")
    except KeyboardInterrupt:  # Ctrl-C while the model loads (once it serves, SIGINT drains: drain.py)
        exit_interrupted("picospec-cloud", signal.SIGINT)


if __name__ == "__main__":
    main()
