"""Two network namespaces, "edge" and "cloud", joined by a shaped veth pair (root only).

    with shaped_link(LinkSpec(rtt_ms=50, up_mbit=10, down_mbit=10)) as link:
        server = link.popen("cloud", ["picospec-cloud", "--host", link.cloud_ip, ...])
        link.run("edge", ["picospec-edge", "--server", f"{link.cloud_ip}:50051", ...])
        link.reshape(LinkSpec(rtt_ms=200, up_mbit=1, down_mbit=1))  # in place: the server keeps running
        with link.partitioned(): ...                                  # cut for a while (link.cut(), link.restore())

Names carry the pid and a random tag so parallel runs never collide; the /24 is drawn at random from 10/8
and checked against every route the host has, so nothing on the host can be confused with it. Setup is a
handful of `ip` calls (well under 0.1 s) plus, without netem, starting the two delay stages. Everything is
removed on exit, errors included: the namespaces (and with them the veth pair and the iptables rules), the
delay stages, and any process still running inside.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from picospec.netlab.procs import stop_process
from picospec.netlab.shaping import AppliedSide, Features, LinkSpec, Side, apply_side, probe_host


def pick_subnet(used: Iterable[str], rng: random.Random) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps none of the `used` prefixes (CIDR strings). Pure given `rng`."""
    taken = [ipaddress.ip_network(u, strict=False) for u in used]
    taken = [n for n in taken if n.version == 4]
    for _ in range(1000):
        net = ipaddress.IPv4Network(f"10.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.x.y.0/24: every candidate overlaps a host route")


def host_routes() -> list[str]:
    """Every IPv4 destination in every routing table of the host (default routes count as 0.0.0.0/0 and are
    left out: they overlap everything)."""
    out = subprocess.run(["ip", "-4", "-j", "route", "show", "table", "all"], capture_output=True, text=True, check=True)
    dsts = []
    for r in json.loads(out.stdout or "[]"):
        dst = r.get("dst", "")
        if dst and dst != "default":
            dsts.append(dst if "/" in dst else f"{dst}/32")
    return dsts


@dataclass
class Link:
    spec: LinkSpec
    edge_ns: str
    cloud_ns: str
    edge_dev: str
    cloud_dev: str
    edge_ip: str
    cloud_ip: str
    method: str = "none"
    applied: list[AppliedSide] = field(default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def ns(self, side: Side) -> str:
        return self.edge_ns if side == "edge" else self.cloud_ns

    def argv(self, side: Side, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(side), *map(str, argv)]

    def run(self, side: Side, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.argv(side, argv), **kw)

    def popen(self, side: Side, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """A process inside `side`'s namespace; terminated at the latest when the link is torn down."""
        p = subprocess.Popen(self.argv(side, argv), **kw)  # `ip netns exec` execs, so p.pid is the command itself
        self.procs.append(p)
        return p

    def cut(self) -> None:
        """Partition the link, as when the edge device loses its network: the edge's end goes down, and with it its
        route to the cloud, so packets in flight are lost both ways and new connections fail at once
        (ENETUNREACH). Namespaces, addresses, shaping and the processes inside stay; `restore()` undoes it."""
        _ip("-n", self.edge_ns, "link", "set", self.edge_dev, "down")

    def restore(self) -> None:
        """End a `cut()`: the edge's end comes up again and the kernel puts its route to the cloud back."""
        _ip("-n", self.edge_ns, "link", "set", self.edge_dev, "up")

    @contextlib.contextmanager
    def partitioned(self) -> Iterator["Link"]:
        """The link cut for the duration of the block, restored on exit, errors included."""
        self.cut()
        try:
            yield self
        finally:
            self.restore()

    def reshape(self, spec: LinkSpec, *, features: Features | None = None, python: str = sys.executable,
                seed: int = 0, log: Any = None) -> None:
        """Give the existing link `spec` (RTT, rates, loss) in place: namespaces, addresses and the processes
        inside stay; each end's old shaping (rule, delay stage, root qdisc) goes and the new one is applied."""
        for a in self.applied:
            a.stop()
        self.applied.clear()
        self._shape(spec, features if features is not None else probe_host(), python, seed, log, replace=True)

    def _shape(self, spec: LinkSpec, features: Features, python: str, seed: int, log: Any, replace: bool) -> None:
        """Shape both ends for `spec`; `replace`: first delete whatever root qdisc an end still has."""
        methods = []
        for side, dev in (("edge", self.edge_dev), ("cloud", self.cloud_dev)):
            prefix = ["ip", "netns", "exec", self.ns(side)]
            if replace:
                subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)  # none: fine
            applied = apply_side(dev, spec.side(side), features=features, prefix=prefix, python=python,
                                 seed=seed + (side == "cloud"), log=log)
            self.applied.append(applied)
            methods.append(applied.method)
        self.spec = spec
        self.method = methods[0] if methods[0] == methods[1] else f"edge={methods[0]},cloud={methods[1]}"


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")


def _kill_leftovers(ns: str) -> None:
    """Processes still in one of *our* namespaces (started through it, e.g. by a test that failed early)."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def shaped_link(spec: LinkSpec, *, features: Features | None = None, python: str = sys.executable,
                seed: int = 0, log: Any = None) -> Iterator[Link]:
    """Create the namespaces and the veth pair, shape both ends, yield the Link, and always clean up."""
    tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
    net = pick_subnet(host_routes(), random.Random(uuid.uuid4().int))
    hosts = list(net.hosts())
    link = Link(spec, edge_ns=f"pse-{tag}", cloud_ns=f"psc-{tag}", edge_dev=f"vpe{tag}"[:15],
                cloud_dev=f"vpc{tag}"[:15], edge_ip=str(hosts[0]), cloud_ip=str(hosts[1]))
    created: list[str] = []
    try:
        for ns in (link.edge_ns, link.cloud_ns):
            _ip("netns", "add", ns)
            created.append(ns)
        # both ends are created straight inside their namespaces: the host never sees the pair
        _ip("link", "add", link.edge_dev, "netns", link.edge_ns, "type", "veth", "peer", "name", link.cloud_dev,
            "netns", link.cloud_ns)
        for ns, dev, ip in ((link.edge_ns, link.edge_dev, link.edge_ip), (link.cloud_ns, link.cloud_dev, link.cloud_ip)):
            _ip("-n", ns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        link._shape(spec, features if features is not None else probe_host(), python, seed, log, replace=False)
        yield link
    finally:
        for p in link.procs:
            stop_process(p, timeout=10.0)
        for a in link.applied:
            a.stop()
        for ns in created:
            _kill_leftovers(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Bring a link up, print its addresses and method, and hold it until Ctrl-C: handy for poking by hand."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m picospec.netlab.netns", description=main.__doc__)
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument("--up-mbit", type=float, default=10.0)
    p.add_argument("--down-mbit", type=float, default=10.0)
    p.add_argument("--loss", type=float, default=0.0)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    t0 = time.perf_counter()
    with shaped_link(LinkSpec(a.rtt_ms, a.up_mbit or None, a.down_mbit or None, a.loss)) as link:
        print(json.dumps({"edge_ns": link.edge_ns, "cloud_ns": link.cloud_ns, "edge_ip": link.edge_ip,
                          "cloud_ip": link.cloud_ip, "method": link.method,
                          "setup_s": round(time.perf_counter() - t0, 3)}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
