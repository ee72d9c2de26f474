"""The packet delay stage: hold each packet of an NFQUEUE queue for a fixed one-way delay, then accept it.

Used where the kernel has no netem (docs/design.md §8): an iptables rule on the receiving side's ingress
(`-t mangle -A PREROUTING -i DEV -j NFQUEUE --queue-num N`) hands every arriving packet to this process.

    python -m picospec.netlab.nfq_delay --queue 0 --delay-ms 25 [--loss 0.01 --seed 1]

One thread, one loop: wait on the queue's netlink socket with a timeout until the earliest held packet is due,
read whatever arrived (never blocking), then give the verdict on every packet that is due. Packets wait in a
heap keyed by (due time, arrival number), so with a constant delay they leave in arrival order, and nothing
waits behind a packet that is still being held. Verdicts are issued from the thread that reads the socket:
the libnetfilter_queue handle is not meant to be shared between threads.

Only metadata is copied to userspace (COPY_META): a verdict without a payload accepts the original packet.
Loss, when asked for, drops each packet with probability p from a seeded generator (reproducible).
Prints one "ready ..." line on stdout once the queue is bound (and nothing more there); counts go to stderr.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import os
import random
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass(order=True)
class _Held:
    due: float
    seq: int
    packet: Any = field(compare=False)


class DelayLine:
    """The scheduling core, independent of netfilter so it can be tested with fake packets: `push` on arrival,
    `release(now)` gives the verdicts that are due, `next_due` says how long the caller may sleep."""

    def __init__(self, delay_s: float, loss: float = 0.0, seed: int = 0, clock: Callable[[], float] = time.monotonic):
        if delay_s < 0 or not 0.0 <= loss < 1.0:
            raise ValueError(f"delay must be >= 0 and loss in [0, 1): {delay_s}, {loss}")
        self.delay_s = delay_s
        self.loss = loss
        self.rng = random.Random(seed)
        self.clock = clock
        self.held: list[_Held] = []
        self.seq = itertools.count()
        self.accepted = self.dropped = self.max_held = 0

    def push(self, packet: Any) -> None:
        if self.loss and self.rng.random() < self.loss:
            packet.drop()
            self.dropped += 1
            return
        heapq.heappush(self.held, _Held(self.clock() + self.delay_s, next(self.seq), packet))
        self.max_held = max(self.max_held, len(self.held))

    def release(self, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        n = 0
        while self.held and self.held[0].due <= now:
            heapq.heappop(self.held).packet.accept()
            n += 1
        self.accepted += n
        return n

    def next_due(self) -> float | None:
        return self.held[0].due if self.held else None

    def flush(self) -> None:
        """Accept everything still held (shutting down: late rather than lost)."""
        self.release(float("inf"))


def serve(queue_num: int, delay_s: float, loss: float = 0.0, seed: int = 0, max_len: int = 20000) -> DelayLine:
    from netfilterqueue import COPY_META, NetfilterQueue  # imported here: the core above needs no netfilter

    line = DelayLine(delay_s, loss, seed)
    nfq = NetfilterQueue()
    # max_len: packets the kernel may queue to us before dropping; at 100 Mbit/s and 100 ms one way about 850
    # full-size packets are held at once. A large receive buffer (set with SO_RCVBUFFORCE as root) so that
    # bursts of queue messages are not lost (ENOBUFS) while we are busy.
    nfq.bind(queue_num, line.push, max_len=max_len, mode=COPY_META, sock_len=8 * 1024 * 1024)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # a signal also writes a byte here, which wakes the select below at once (it would otherwise sleep on)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    fd = nfq.get_fd()
    print(f"ready queue={queue_num} delay_ms={delay_s * 1000:g} loss={loss:g}", flush=True)
    try:
        while not stopping:
            due = line.next_due()
            timeout = 0.5 if due is None else max(0.0, due - time.monotonic())
            try:
                readable, _, _ = select.select([fd, wake_r], [], [], timeout)
            except InterruptedError:
                continue
            if fd in readable:
                nfq.run(block=False)  # reads until the socket is empty; each packet goes to line.push
            line.release()
    finally:
        line.flush()
        nfq.unbind()
    return line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m picospec.netlab.nfq_delay", description=__doc__.splitlines()[0])
    p.add_argument("--queue", type=int, default=0, help="NFQUEUE number (per network namespace)")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to every packet")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability per packet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=20000, help="kernel queue length, packets")
    a = p.parse_args(argv)
    line = serve(a.queue, a.delay_ms / 1000.0, a.loss, a.seed, a.max_len)
    print(f"nfq_delay: queue {a.queue}: accepted {line.accepted}, dropped {line.dropped}, "
          f"at most {line.max_held} held at once", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
