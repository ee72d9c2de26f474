"""The gRPC server around the service (cloud_server/server.py): request deserializers that turn bytes which do not
parse into a clear refusal, the message-size limits, the port, TLS and tokens, and the operations services (health,
reflection). The servicer itself knows none of this."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from picospec.cloud_server.auth import AuthInterceptor, exposure_warning
from picospec.shared.codec import dense_payload_bound
from picospec.shared.config import CloudConfig
from picospec.shared.connection import server_keepalive_options, split_host
from picospec.shared.rpc import picospec_pb2 as pb

if TYPE_CHECKING:
    from picospec.cloud_server.server import PicoSpecService

log = logging.getLogger("picospec.cloud")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PicoSpec"].full_name  # "picospec.v1.PicoSpec"


class Malformed:
    """A unary request whose bytes did not parse. gRPC deserializes a unary request before the handler runs, and
    a deserializer that raises ends the call UNKNOWN ("Unexpected DecodeError", with a traceback in the log); so
    the server's deserializers hand this to the handler instead, which refuses it INVALID_ARGUMENT like a
    malformed stream message (found by `picospec-bench fuzz`: random bytes as an Info or CloudGenerate request)."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def lenient(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """A request deserializer that returns `Malformed` where `parse` raises DecodeError."""
    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as e:
            return Malformed(e)
    return deserialize


def parsed(request: object) -> object:
    """The request itself, or the DecodeError it failed with (which `_status_for` maps to INVALID_ARGUMENT)."""
    if isinstance(request, Malformed):
        raise request.error
    return request


def add_service(service: "PicoSpecService", server: grpc.aio.Server) -> None:
    """pb_grpc.add_PicoSpecServicer_to_server with lenient unary deserializers (see `Malformed`)."""
    handlers = {
        "Info": grpc.unary_unary_rpc_method_handler(
            service.Info, request_deserializer=lenient(pb.InfoRequest.FromString),
            response_serializer=pb.InfoReply.SerializeToString),
        "Speculate": grpc.stream_stream_rpc_method_handler(  # a stream message that does not parse raises in the
            service.Speculate, request_deserializer=pb.EdgeMessage.FromString,  # handler, which maps it
            response_serializer=pb.CloudMessage.SerializeToString),
        "CloudGenerate": grpc.unary_stream_rpc_method_handler(
            service.CloudGenerate, request_deserializer=lenient(pb.Hello.FromString),
            response_serializer=pb.TokenChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


# protobuf framing of an EdgeMessage around a dense batch's payload: tags, length prefixes, epoch, positions and
# the optional resolved token at their widest varints (41 bytes), with room to spare; plus 5 bytes per draft id
BATCH_FRAMING_BYTES = 64
MIB = 1024 * 1024


def message_limit(config: CloudConfig, vocab_size: int) -> int:
    """The largest message the cloud accepts: --max-message-mb, raised where needed to the largest batch its own
    admission rules allow (a dense batch of --max-draft-len incompressible rows). A lower transport limit would
    end sessions mid-generation over legal batches: with Qwen's 151,936-token vocabulary 32 rows are 18.5 MiB."""
    rows = config.max_draft_len
    largest_batch = dense_payload_bound(rows, vocab_size) + BATCH_FRAMING_BYTES + 5 * rows
    return max(config.max_message_mb * MIB, largest_batch)


def server_options(config: CloudConfig, vocab_size: int) -> list[tuple[str, int]]:
    """gRPC's server options. SO_REUSEPORT off: gRPC turns it on by default, and a second cloud started on a port
    already served then says "serving" and takes half of the new connections; without it the second bind fails."""
    limit = message_limit(config, vocab_size)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0), *server_keepalive_options(config.peer_timeout_s)]


def bind_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """The port gRPC bound for `address`; OSError naming the address when it could not (gRPC returns 0 or raises
    RuntimeError, by version)."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"could not listen on {address}: the port is in use or the address is not this machine's "
                      f"({e})") from None
    if port == 0:
        raise OSError(f"could not listen on {address}: the port is in use or the address is not this machine's")
    return port


async def start_server(service: PicoSpecService, address: str) -> tuple[grpc.aio.Server, int]:
    """Start serving on address ("host:port", port 0 = pick one); return the server and its port. TLS, client
    certificates and tokens as the service's config says (a setting that cannot work raises
    ConnectionSettingsError, a ValueError, before anything listens)."""
    config = service.config
    limit = message_limit(config, service.info.vocab_size)
    if limit > config.max_message_mb * MIB:
        log.info("message limit raised from %d MiB to %.1f MiB: a dense batch of %d drafts over %d tokens must fit",
                 config.max_message_mb, limit / MIB, config.max_draft_len, service.info.vocab_size)
    credentials = service.certificates.credentials() if service.certificates is not None else None
    warning = exposure_warning(split_host(address), credentials is not None, service.auth is not None,
                               bool(config.tls_ca))
    if warning:
        log.warning("%s", warning)
    interceptors = None if service.auth is None else [
        AuthInterceptor(service.auth, on_refused=lambda: service.metrics.on_refused("unauthenticated"))]
    server = grpc.aio.server(options=server_options(config, service.info.vocab_size), interceptors=interceptors)
    add_service(service, server)
    service.health = await add_operations_services(server)
    port = bind_port(server, address, credentials)
    service.metrics.serve(split_host(address), config.metrics_port)  # a port in use fails before gRPC serves
    await server.start()
    for name in HEALTH_SERVICES:  # the model is loaded (the service holds it) and the port listens
        await service.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


HEALTH_SERVICES = ("", SERVICE_NAME)  # "": the server as a whole, as grpc_health_probe asks by default


async def add_operations_services(server: grpc.aio.Server) -> "health.aio.HealthServicer":
    """The gRPC health service (NOT_SERVING until start_server has the port, and again from the drain) and
    server reflection for PicoSpec and health. Both are callable without a token (auth.TOKEN_EXEMPT_SERVICES)."""
    servicer = health.aio.HealthServicer()
    for name in HEALTH_SERVICES:
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    return servicer
