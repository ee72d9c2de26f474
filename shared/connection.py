"""How the two sides' gRPC connections are set up: TLS material, keepalive, and whether an address is loopback.

Pure helpers (option lists, checks of settings) beside thin loaders of PEM files; the edge's channel
(edge_client/transport.py:open_channel) and the cloud's server (cloud_server/grpc_setup.py:start_server) use them.
Token checks live in cloud_server/auth.py.
"""
from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

# The shortest keepalive interval either side uses, and so the ping rate the cloud must permit without data in
# between (gRPC answers a faster client with GOAWAY too_many_pings and the client then backs off for good).
MIN_PING_INTERVAL_MS = 1000
MIN_PEER_TIMEOUT_S = 2.0
METADATA_KEY = "authorization"  # what grpc.access_token_call_credentials sends: "Bearer <token>"
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a RESOURCE_EXHAUSTED refusal: when a slot is likely free


def retry_hint_s(trailing: object) -> float | None:
    """The cloud's retry hint from a call's trailing metadata (pairs of key, value), None when absent or garbled."""
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            try:
                ms = float(value)
            except (TypeError, ValueError):
                return None
            return ms / 1000 if 0 <= ms <= 3_600_000 else None
    return None


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


# gRPC target schemes --server passes through as they are (dns:///name:port, ipv4:a:p,b:p, unix:/path, ...)
TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
Resolver = Callable[[str, str], list[str]]  # (host, port) -> its IP addresses


@dataclass(frozen=True)
class ServerTarget:
    """What the edge dials for --server. `target`: the gRPC target string; `hosts`: the hosts as written (for the
    loopback check); `balanced`: several replicas, spread with gRPC's round_robin (one pick per call, so one
    generation's stream stays on one replica); `authority`: the name TLS verifies for an address list whose
    entries share one host ("" = gRPC's own: the host of a single address or of a dns: target)."""
    target: str
    hosts: tuple[str, ...]
    balanced: bool
    authority: str = ""


def resolve_host(host: str, port: str) -> list[str]:
    """The IP addresses of a name, in the resolver's order, without repeats."""
    return list(dict.fromkeys(str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


SERVER_FORMS = ("HOST:PORT, [IPV6]:PORT, a comma-separated list of those (replicas), or a gRPC target: "
                "dns:///NAME:PORT, ipv4:ADDR:PORT,..., unix:PATH")


def split_address(entry: str) -> tuple[str, str]:
    """("host", "port") of "host:port" or "[v6]:port"; an entry without a host, or without a port in 1..65535, is an
    error naming the accepted forms (gRPC would take "127.0.0.1" as port 443 and wrap 99999 to another port)."""
    host, port = (entry[1:].partition("]")[0], entry.rpartition("]:")[2]) if entry.startswith("[") \
        else entry.rpartition(":")[::2]
    if not host or not port.isdigit() or (":" in host and not entry.startswith("[")):
        raise ConnectionSettingsError(f"--server entry {entry!r}: expected host:port or [IPv6]:port ({SERVER_FORMS})")
    if not 1 <= int(port) <= 65535:
        raise ConnectionSettingsError(f"--server entry {entry!r}: port {int(port)} outside 1..65535")
    return host, port


def check_server(server: str) -> None:
    """--server refused at once when it cannot name a cloud: empty, a URL scheme (http://, grpc://), an entry
    without a host or a port in 1..65535, an empty dns: or unix: target. Names are not resolved here: a name that
    does not resolve yet may be a cloud still coming up, and is waited for."""
    server = server.strip()
    scheme, colon, rest = server.partition(":")
    if not server:
        raise ConnectionSettingsError(f"--server is empty: give {SERVER_FORMS}")
    if colon and scheme.lower() + ":" in TARGET_SCHEMES:
        if scheme.lower() == "dns":
            split_address(rest[2:].partition("/")[2] if rest.startswith("//") else rest)
        elif scheme.lower() in ("ipv4", "ipv6"):
            for entry in filter(None, (e.strip() for e in rest.split(","))):
                split_address(entry)
        elif not rest.strip("/"):
            raise ConnectionSettingsError(f"--server {server!r}: no socket path after {scheme}:")
        return
    if "://" in server:
        raise ConnectionSettingsError(f"--server {server!r}: no URL scheme ({scheme}://) here, gRPC speaks to "
                                      f"host:port; give {SERVER_FORMS}")
    entries = [e.strip() for e in server.split(",")]
    if not all(entries):
        raise ConnectionSettingsError(f"--server {server!r}: an empty entry in the list; give {SERVER_FORMS}")
    for entry in entries:
        split_address(entry)


def _ip_version(text: str) -> int | None:
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None


def address_list_target(entries: list[str], resolve: Resolver = resolve_host) -> ServerTarget:
    """An `ipv4:` or `ipv6:` target (gRPC's address lists hold one family) for several host:port entries. Names
    are resolved here, once (a name whose set of addresses changes belongs in a dns:/// target); IPv4 is used
    where every host has an IPv4 address (localhost resolves to both), else IPv6 where every host has one."""
    parsed = [split_address(e) for e in entries]
    found: list[tuple[str, list[str]]] = []
    for host, port in parsed:
        try:
            found.append((port, [host] if _ip_version(host) else resolve(host, port)))
        except OSError as e:
            raise ConnectionSettingsError(f"--server: cannot resolve {host!r}: {e}") from None
    for version, scheme, fmt in ((4, "ipv4", "{}:{}"), (6, "ipv6", "[{}]:{}")):
        if all(any(_ip_version(a) == version for a in addresses) for _, addresses in found):
            listed = [fmt.format(a.split("%")[0], port) for port, addresses in found for a in addresses
                      if _ip_version(a) == version]
            hosts = tuple(host for host, _ in parsed)
            authority = "" if len(set(hosts)) > 1 else f"[{hosts[0]}]:{parsed[0][1]}" if ":" in hosts[0] \
                else f"{hosts[0]}:{parsed[0][1]}"
            return ServerTarget(f"{scheme}:{','.join(dict.fromkeys(listed))}", hosts, True, authority)
    raise ConnectionSettingsError(f"--server {','.join(entries)}: no address family every host has (gRPC's address "
                                  "lists hold IPv4 or IPv6 addresses, not both)")


def server_target(server: str, resolve: Resolver = resolve_host) -> ServerTarget:
    """--server as a gRPC target: one host:port as it is (pick_first, gRPC resolves it), several comma-separated
    ones as an address list, a target with a scheme (dns:///name:port, ipv4:..., unix:...) as it is; the last
    two balanced with round_robin. A malformed --server is refused first (check_server)."""
    check_server(server)
    server = server.strip()
    scheme = server.split(":", 1)[0].lower() + ":"
    if scheme in ("ipv4:", "ipv6:"):
        entries = [e.strip() for e in server.split(":", 1)[1].split(",") if e.strip()]
        return address_list_target(entries, resolve)
    if scheme in TARGET_SCHEMES:
        return ServerTarget(server, (target_host(server),), True)
    entries = [e.strip() for e in server.split(",") if e.strip()]
    if len(entries) > 1:
        return address_list_target(entries, resolve)
    return ServerTarget(server, (split_host(server),), False)


def target_host(target: str) -> str:
    """The host of a dns: target (dns:name:port, dns:///name:port, dns://resolver/name:port); a unix socket's
    is local."""
    scheme, _, rest = target.partition(":")
    if scheme.lower().startswith("unix"):
        return "localhost"
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]
    return split_host(rest)


def read_pem(path: str, flag: str) -> bytes:
    """A PEM file's bytes; a file that is missing, unreadable or not PEM is an error naming the flag."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConnectionSettingsError(f"{flag} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ConnectionSettingsError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class ServerTlsFiles:
    """The cloud's TLS material, read and checked: (key, certificate chain) and the client CA (None: no mutual TLS)."""
    pair: tuple[bytes, bytes]
    client_ca: bytes | None


def check_key_pair(tls_cert: str, tls_key: str, tls_ca: str) -> None:
    """That the key belongs to the certificate and the files parse (Python's ssl, the same OpenSSL checks): a
    mismatched pair would otherwise be taken and fail every handshake."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_cert, tls_key)
        if tls_ca:
            context.load_verify_locations(cafile=tls_ca)
    except (ssl.SSLError, OSError) as e:
        raise ConnectionSettingsError(f"--tls-cert {tls_cert} / --tls-key {tls_key}"
                                      + (f" / --tls-ca {tls_ca}" if tls_ca else "") + f": unusable: {e}") from None


def server_tls_files(tls_cert: str, tls_key: str, tls_ca: str) -> ServerTlsFiles | None:
    """The cloud's TLS files, or None for plaintext; a missing, unreadable, non-PEM or mismatched file raises
    ConnectionSettingsError naming the flag."""
    if not (tls_cert or tls_key or tls_ca):
        return None
    if not (tls_cert and tls_key):
        raise ConnectionSettingsError("TLS needs both --tls-cert and --tls-key"
                                      + (" (--tls-ca alone only says whom to trust)" if tls_ca else ""))
    pair = (read_pem(tls_key, "--tls-key"), read_pem(tls_cert, "--tls-cert"))
    roots = read_pem(tls_ca, "--tls-ca") if tls_ca else None
    check_key_pair(tls_cert, tls_key, tls_ca)
    return ServerTlsFiles(pair, roots)


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
