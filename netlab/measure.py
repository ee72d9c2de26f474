"""Measure a link: RTT by TCP ping-pong, throughput by a bulk TCP transfer each way.

    python -m picospec.netlab.measure serve --host 0.0.0.0 --port 5201        # one end (prints "ready HOST:PORT")
    python -m picospec.netlab.measure client --host PEER --port 5201 --json   # the other end: rtt_ms, up_mbit, down_mbit

RTT: small messages echoed over one connection with TCP_NODELAY, the median of N (connect time, one SYN
round trip, is reported too). Throughput is measured by the *receiver* over the transfer's last 80 % of bytes,
so that the handshake, slow start and the shaper's initial burst do not count: what remains is the steady
rate that the shaping sets. It is goodput (TCP payload): about 95.6 % of a tbf rate, which counts whole
Ethernet frames (1448 payload bytes in 1514).

Wire format: one op byte ('E' echo, 'U' upload, 'D' download) and a big-endian uint64 argument (bytes).
"""
from __future__ import annotations

import argparse
import json
import socket
import socketserver
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

HEADER = struct.Struct("!cQ")
PING_SIZE = 8
CHUNK = 64 * 1024
GOODPUT_PER_FRAME = 1448 / 1514  # TCP payload per full Ethernet frame (timestamps on), what tbf charges for


def steady_rate_mbit(events: Sequence[tuple[float, int]], warm_frac: float = 0.2) -> float:
    """Mbit/s over the bytes after the first `warm_frac` of them, from (time, cumulative bytes) samples taken
    after each receive. Pure."""
    if len(events) < 2:
        raise ValueError("need at least two receive events")
    total = events[-1][1]
    t_end = events[-1][0]
    for t, cum in events:
        if cum >= warm_frac * total:
            if t_end <= t:
                break
            return (total - cum) * 8 / (t_end - t) / 1e6
    raise ValueError("the transfer ended in one burst: too short to measure (send more bytes)")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


def _receive(sock: socket.socket, nbytes: int) -> list[tuple[float, int]]:
    events: list[tuple[float, int]] = []
    got = 0
    while got < nbytes:
        part = sock.recv(min(CHUNK * 4, nbytes - got))
        if not part:
            raise ConnectionError(f"peer closed after {got} of {nbytes} bytes")
        got += len(part)
        events.append((time.perf_counter(), got))
    return events


def _send(sock: socket.socket, nbytes: int) -> None:
    block = bytes(CHUNK)
    left = nbytes
    while left > 0:
        sock.sendall(block[:min(CHUNK, left)])
        left -= min(CHUNK, left)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            op, arg = HEADER.unpack(_recv_exact(sock, HEADER.size))
            if op == b"E":
                while True:
                    sock.sendall(_recv_exact(sock, PING_SIZE))
            elif op == b"U":
                events = _receive(sock, arg)
                reply = {"bytes": arg, "mbit": steady_rate_mbit(events)}
                sock.sendall((json.dumps(reply) + "\n").encode())
            elif op == b"D":
                _send(sock, arg)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)  # until the client has read everything and closed
        except (ConnectionError, OSError):
            pass  # an echo session ends with the client closing


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, host: str, port: int) -> None:
        super().__init__((host, port), _Handler)


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def rtt_samples_ms(host: str, port: int, n: int = 20, warmup: int = 2, timeout: float = 30.0) -> list[float]:
    with _connect(host, port, timeout) as s:
        s.sendall(HEADER.pack(b"E", 0))
        out = []
        for i in range(n + warmup):
            t0 = time.perf_counter()
            s.sendall(i.to_bytes(PING_SIZE, "big"))
            _recv_exact(s, PING_SIZE)
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1000)
    return out


def connect_ms(host: str, port: int, n: int = 5, timeout: float = 30.0) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=timeout) as s:
            out.append((time.perf_counter() - t0) * 1000)
            s.sendall(HEADER.pack(b"E", 0))
    return out


def upload_mbit(host: str, port: int, nbytes: int, timeout: float = 120.0) -> float:
    with _connect(host, port, timeout) as s:
        s.sendall(HEADER.pack(b"U", nbytes))
        _send(s, nbytes)
        reply = s.makefile("r").readline()
    return float(json.loads(reply)["mbit"])


def download_mbit(host: str, port: int, nbytes: int, timeout: float = 120.0) -> float:
    with _connect(host, port, timeout) as s:
        s.sendall(HEADER.pack(b"D", nbytes))
        events = _receive(s, nbytes)
    return steady_rate_mbit(events)


@dataclass(frozen=True)
class LinkMeasurement:
    rtt_ms: float           # median ping-pong
    connect_ms: float       # median TCP connect (one SYN round trip)
    up_mbit: float | None   # client -> server goodput
    down_mbit: float | None
    rtt_samples_ms: tuple[float, ...]

    def wire_mbit(self, goodput: float) -> float:
        """Goodput scaled to the frame rate a tbf shaper counts (for comparing with a configured rate)."""
        return goodput / GOODPUT_PER_FRAME


def measure(host: str, port: int, *, pings: int = 20, up_bytes: int = 2_000_000,
            down_bytes: int = 2_000_000) -> LinkMeasurement:
    samples = rtt_samples_ms(host, port, pings)
    conn = connect_ms(host, port)
    up = upload_mbit(host, port, up_bytes) if up_bytes else None
    down = download_mbit(host, port, down_bytes) if down_bytes else None
    return LinkMeasurement(statistics.median(samples), statistics.median(conn), up, down, tuple(samples))


def bytes_for(mbit: float, seconds: float = 1.5) -> int:
    """A transfer size that lasts about `seconds` at `mbit` (at least 256 KB, so warm-up stays a small part)."""
    return max(256 * 1024, int(mbit * 1e6 / 8 * seconds))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m picospec.netlab.measure", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=5201)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, default=5201)
    c.add_argument("--pings", type=int, default=20)
    c.add_argument("--up-bytes", type=int, help="default: 1.5 s at --expect-up-mbit, else 2 MB")
    c.add_argument("--down-bytes", type=int, help="default: 1.5 s at --expect-down-mbit, else 2 MB")
    c.add_argument("--expect-up-mbit", type=float)
    c.add_argument("--expect-down-mbit", type=float)
    c.add_argument("--wait-s", type=float, default=30.0, help="retry connecting this long (the server may be starting)")
    c.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        with Server(a.host, a.port) as srv:
            print(f"ready {a.host}:{srv.server_address[1]}", flush=True)
            try:
                srv.serve_forever()
            except KeyboardInterrupt:
                pass
        return 0
    deadline = time.monotonic() + a.wait_s
    while True:
        try:
            socket.create_connection((a.host, a.port), timeout=5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    up = a.up_bytes if a.up_bytes is not None else (bytes_for(a.expect_up_mbit) if a.expect_up_mbit else 2_000_000)
    down = a.down_bytes if a.down_bytes is not None else (bytes_for(a.expect_down_mbit) if a.expect_down_mbit else 2_000_000)
    m = measure(a.host, a.port, pings=a.pings, up_bytes=up, down_bytes=down)
    if a.json:
        print(json.dumps({**asdict(m), "up_wire_mbit": m.up_mbit and m.wire_mbit(m.up_mbit),
                          "down_wire_mbit": m.down_mbit and m.wire_mbit(m.down_mbit)}))
    else:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f} Mbit/s"

        print(f"rtt {m.rtt_ms:.1f} ms (connect {m.connect_ms:.1f} ms), up {fmt(m.up_mbit)}, down {fmt(m.down_mbit)} "
              "(goodput)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
