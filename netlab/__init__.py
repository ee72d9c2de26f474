"""netlab: real links for PicoSpec tests and deployments (docs/design.md §8).

- `shaping`: which kernel features exist, and the tc/iptables commands that give a link its RTT, rate and loss
  (netem where the kernel has it, else tbf for rate plus an NFQUEUE delay stage on each side's ingress);
- `nfq_delay`: that delay stage, a small process holding each queued packet for the one-way delay;
- `netns`: two network namespaces ("edge" and "cloud") joined by a shaped veth pair;
- `measure`: RTT and throughput across a link, to check the shaping matches what was asked for.
- `procs`: stopping the processes these start (terminate, then kill, always reaped).
"""
