"""How the two sides' gRPC connections are set up: TLS material, keepalive, and whether an address is loopback.

Pure helpers (option lists, checks of settings) beside thin loaders of PEM files; the edge's channel
(edge_client/transport.py:open_channel) and the cloud's server (cloud_server/server.py:start_server) use them.
Token checks live in cloud_server/auth.py.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

# The shortest keepalive interval either side uses, and so the ping rate the cloud must permit without data in
# between (gRPC answers a faster client with GOAWAY too_many_pings and the client then backs off for good).
MIN_PING_INTERVAL_MS = 1000
MIN_PEER_TIMEOUT_S = 2.0
METADATA_KEY = "authorization"  # what grpc.access_token_call_credentials sends: "Bearer <token>"


class ConnectionSettingsError(ValueError):
    """A TLS or keepalive setting that cannot work (a missing file, a certificate without its key)."""


def ping_schedule_ms(peer_timeout_s: float) -> tuple[int, int]:
    """(interval, timeout) of keepalive pings such that a peer silent for peer_timeout_s is noticed: a ping goes out
    at most `interval` after the last one was answered and is declared lost `timeout` after it went out, so
    silence is detected within interval + timeout = peer_timeout_s."""
    if peer_timeout_s < MIN_PEER_TIMEOUT_S:
        raise ConnectionSettingsError(f"--peer-timeout-s {peer_timeout_s:g}: at least {MIN_PEER_TIMEOUT_S:g} s "
                                      f"(pings every half of it, and the cloud permits one a second at most)")
    half = max(MIN_PING_INTERVAL_MS, int(peer_timeout_s * 1000 / 2))
    return half, half


def _ping_options(peer_timeout_s: float) -> list[tuple[str, int]]:
    """Keepalive pings on the schedule above. gRPC waits for a ping's answer for the longer of two timeouts, and
    the second (grpc.http2.ping_timeout_ms) defaults to a minute once keepalive is on: both are set."""
    interval, timeout = ping_schedule_ms(peer_timeout_s)
    return [("grpc.keepalive_time_ms", interval), ("grpc.keepalive_timeout_ms", timeout),
            ("grpc.http2.ping_timeout_ms", timeout), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def edge_keepalive_options(peer_timeout_s: float) -> list[tuple[str, int]]:
    """The edge pings the cloud even between calls (a frozen cloud is found before the next generation waits on
    it) and with no data in between (max_pings_without_data=0: a session waiting for a verdict sends nothing)."""
    return _ping_options(peer_timeout_s)


def server_keepalive_options(peer_timeout_s: float) -> list[tuple[str, int]]:
    """The cloud pings each edge on the same schedule (a frozen edge's session ends and frees its slot), and
    permits the edges' own pings down to MIN_PING_INTERVAL_MS, with or without calls and data."""
    return [*_ping_options(peer_timeout_s), ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS)]


def is_loopback(host: str) -> bool:
    """Whether a listening or connecting host stays on this machine. Wildcards (0.0.0.0, ::, "") listen on every
    interface, so they are not; a name other than localhost is assumed to reach the network."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(address: str) -> str:
    """The host part of "host:port", "[v6]:port" or a bare host."""
    if address.startswith("["):
        return address[1:address.index("]")]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def read_pem(path: str, flag: str) -> bytes:
    """A PEM file's bytes; a file that is missing, unreadable or not PEM is an error naming the flag."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConnectionSettingsError(f"{flag} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ConnectionSettingsError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(tls_cert: str, tls_key: str, tls_ca: str) -> grpc.ServerCredentials | None:
    """TLS for the cloud, or None for plaintext. With a CA, every client must present a certificate it signed."""
    if not (tls_cert or tls_key or tls_ca):
        return None
    if not (tls_cert and tls_key):
        raise ConnectionSettingsError("TLS needs both --tls-cert and --tls-key"
                                      + (" (--tls-ca alone only says whom to trust)" if tls_ca else ""))
    pair = (read_pem(tls_key, "--tls-key"), read_pem(tls_cert, "--tls-cert"))
    roots = read_pem(tls_ca, "--tls-ca") if tls_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def channel_credentials(tls: bool, tls_ca: str, tls_cert: str, tls_key: str) -> grpc.ChannelCredentials | None:
    """TLS for the edge's channel, or None for plaintext (none of the TLS settings given)."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise ConnectionSettingsError("a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca, "--tls-ca") if tls_ca else None,
        private_key=read_pem(tls_key, "--tls-key") if tls_key else None,
        certificate_chain=read_pem(tls_cert, "--tls-cert") if tls_cert else None)


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """What the edge sends with every call: the entry grpc.access_token_call_credentials would add. Sent as plain
    metadata because gRPC refuses call credentials on a channel without TLS (a loopback cloud)."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()
