"""Reading a subprocess's output with a deadline that holds (tests that start servers and wait for a marker)."""
from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from picospec.bench.ports import free_port  # noqa: F401 - the tests' import point

ROOT = Path(__file__).resolve().parent.parent
CLOUD_START_S = 300.0  # a cold start imports torch and transformers and loads the model: longer on a loaded machine


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


def checkout_env() -> dict[str, str]:
    """This environment with this checkout first on PYTHONPATH: subprocesses (in network namespaces too) import
    picospec and netlab from the tree under test even where it is not installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@contextlib.contextmanager
def cloud_process(target: str, *args: str, start_s: float = CLOUD_START_S,
                  port: int = 0) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A real `picospec-cloud` (the console script beside this interpreter) on 127.0.0.1 and `port` (0: one the OS
    chooses): (process, "127.0.0.1:PORT", read from its "serving" line, with a deadline). Killed on exit."""
    import pytest

    cmd = [str(Path(sys.executable).parent / "picospec-cloud"), "--target", target, "--host", "127.0.0.1",
           "--port", str(port), "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, ok = read_until(proc, "serving", start_s)
        if not ok:
            pytest.fail(f"cloud did not print 'serving' within {start_s:.0f} s (or exited):\n" + "".join(lines))
        yield proc, re.search(r" on (\S+:\d+)$", lines[-1].strip()).group(1)
    finally:
        proc.kill()  # a test may have killed it already
        proc.wait(timeout=15)
