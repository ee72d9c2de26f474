"""Ports for servers a benchmark or a test starts as a separate process (it must be told the port up front)."""
from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_handed_out: set[int] = set()  # this process's, so two servers it starts never share one


def free_port() -> int:
    """A port nothing listens on right now, for a server a test starts later. Never one the OS would give a port-0
    bind or an outgoing connection (those come from the ephemeral range): a port the OS chose and this closed again
    can be handed to the next port-0 server in the same test before ours binds it (CI saw exactly that). Never the
    same port twice in one run."""
    low, high = _ephemeral_range()
    first, last = (10000, low - 1) if low > 11000 else (high + 1, 65535)
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(first, last)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {first}-{last}")
