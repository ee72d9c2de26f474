"""A grpc_health_probe of our own: exit 0 when the cloud's health service says SERVING, 1 otherwise.

    python -m picospec.cloud_server.health_probe HOST:PORT [--service NAME] [--live] [--timeout-s 3]
           [--tls-dir DIR | --tls-ca F [--tls-cert F --tls-key F]] [--tls-server-name N]

Health needs no token (cloud_server/auth.py: TOKEN_EXEMPT_SERVICES), but TLS applies as to any call: a cloud with
--tls-cert needs --tls-ca (and with --tls-ca on the cloud, a client certificate). `--tls-dir DIR` takes ca.pem,
client.pem and client.key from a directory scripts/make_certs.sh wrote (the compose stack mounts it at /tls).
Used by docker-compose.yml's health check and deploy/k8s/cloud.yaml's probes; prints one line saying what it saw.
`--live` passes on any answer of the health service, NOT_SERVING included: a liveness check, which a draining
cloud (NOT_SERVING for up to --grace-s) must pass, while a frozen one (no answer: the asyncio loop that answers
health is the one that runs the sessions) fails it.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from picospec.shared.connection import ConnectionSettingsError, channel_credentials

SERVING = health_pb2.HealthCheckResponse.SERVING


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m picospec.cloud_server.health_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", help="HOST:PORT of the cloud")
    p.add_argument("--service", default="", help="service to ask about: '' (the server, default) or "
                   "picospec.v1.PicoSpec")
    p.add_argument("--live", action="store_true", help="exit 0 on any answer, NOT_SERVING (draining) included: "
                   "the process is alive")
    p.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check")
    p.add_argument("--tls-dir", default="", help="directory with ca.pem, client.pem, client.key (make_certs.sh)")
    p.add_argument("--tls-ca", default="", help="PEM CA certificates that verify the cloud (turns TLS on)")
    p.add_argument("--tls-cert", default="", help="PEM client certificate, for a cloud started with --tls-ca")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument("--tls-server-name", default="", help="name to verify the cloud's certificate against")
    return p


def tls_files(args: argparse.Namespace) -> tuple[str, str, str]:
    """(ca, cert, key): the flags, with --tls-dir filling in those not given."""
    d = args.tls_dir
    return (args.tls_ca or (os.path.join(d, "ca.pem") if d else ""),
            args.tls_cert or (os.path.join(d, "client.pem") if d else ""),
            args.tls_key or (os.path.join(d, "client.key") if d else ""))


def check(address: str, service: str = "", timeout_s: float = 3.0,
          credentials: grpc.ChannelCredentials | None = None, server_name: str = "",
          live: bool = False) -> tuple[bool, str]:
    """(SERVING?, what was seen) for one Health/Check call; with `live`, (answered at all?, what was seen)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (grpc.secure_channel(address, credentials, options) if credentials is not None
               else grpc.insecure_channel(address, options))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout_s)
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return live or reply.status == SERVING, status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ca, cert, key = tls_files(args)
    try:
        credentials = channel_credentials(False, ca, cert, key)
    except ConnectionSettingsError as e:
        print(f"health_probe: {e}", file=sys.stderr)
        return 2
    ok, seen = check(args.address, args.service, args.timeout_s, credentials, args.tls_server_name, args.live)
    print(f"{args.address} {args.service or '(server)'}: {seen}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
