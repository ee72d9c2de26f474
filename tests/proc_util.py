"""Reading a subprocess's output with a deadline that holds (tests that start servers and wait for a marker)."""
from __future__ import annotations

import queue
import socket
import subprocess
import threading
import time


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> tuple[list[str], bool]:
    """Lines of `proc`'s stdout up to the first one containing `marker`: (lines, True), or (lines so far, False) at
    EOF or when `timeout` seconds have passed, whatever the process does meanwhile.

    `proc.stdout.readline()` in the caller's thread would block past any deadline while the process is alive and
    silent; here a daemon thread reads and the caller waits on a queue with a timeout. The thread keeps draining
    the pipe after the marker, so a chatty server never blocks on a full pipe."""
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        try:
            for line in proc.stdout:
                lines.put(line)
        except (OSError, ValueError):  # the pipe was closed under us
            pass
        lines.put(None)

    threading.Thread(target=pump, name=f"read_until-{proc.pid}", daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return seen, False
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            return seen, False
        if line is None:
            return seen, False
        seen.append(line)
        if marker in line:
            return seen, True


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; the socket is closed again on return)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
