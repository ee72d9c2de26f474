"""Stopping the processes netlab and the benchmarks start (delay stages, servers, workers): one way for all."""
from __future__ import annotations

import subprocess
from typing import Any


def stop_process(p: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; always reaped."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
