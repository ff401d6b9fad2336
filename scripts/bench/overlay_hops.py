#!/usr/bin/env python3
"""Per-hop latency of pings through a userspace L2 tunnel, from `tcpdump -i any -tt -nn` text of
both host namespaces (used by overlay.sh --hops).

The pinger sits behind host B, the target behind host A. For every echo request seen leaving
B's tunnel device, the hops are:

  b_tap_to_udp   the request enters B's tunnel device -> B's daemon sends it on the underlay
  a_udp_to_tap   the datagram arrives at A             -> A's daemon writes the frame to its device
  a_vm_reply     A's device emits the request          -> the reply comes back into A's device
  a_tap_to_udp   the reply enters A's device           -> A's daemon sends it on the underlay
  b_udp_to_tap   the datagram arrives at B             -> B's daemon writes the reply to its device
  total          first to last

Tunnel datagrams are the UDP packets on ul0 of at least MIN_UDP bytes: a ping's 98-byte frame
plus any tunnel's overhead is more, acknowledgements and keepalives are less. Prints `hop median_us` lines.
"""

import bisect
import re
import statistics
import sys

MIN_UDP = 90
HOPS = ["b_tap_to_udp", "a_udp_to_tap", "a_vm_reply", "a_tap_to_udp", "b_udp_to_tap", "total"]
ICMP = re.compile(r"ICMP echo (request|reply), id \d+, seq (\d+)")
UDP_LEN = re.compile(r"length (\d+)\s*$")
NOT_TUNNEL = {"vm0", "ul0", "br0", "lo"}


def load(path):
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            try:
                t = float(parts[0])
            except ValueError:
                continue
            ifname, direction = parts[1], parts[2]
            m = ICMP.search(line)
            if m:
                if ifname not in NOT_TUNNEL:
                    events.append((t, "tap", direction, m.group(1), int(m.group(2))))
                continue
            if ifname == "ul0":
                n = UDP_LEN.search(line)
                if n and int(n.group(1)) >= MIN_UDP:
                    events.append((t, "ul0", direction, "udp", None))
    return events


def first(events, times, after, where, direction, kind, seq=None):
    """The time of the first matching event at or after `after` (`times`: the events' times)."""
    for e in events[bisect.bisect_left(times, after):]:
        if e[1] == where and e[2] == direction and e[3] == kind:
            if seq is None or e[4] == seq:
                return e[0]
    return None


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: overlay_hops.py HOST_A.txt HOST_B.txt")
    a, b = load(sys.argv[1]), load(sys.argv[2])
    a.sort(key=lambda e: e[0])
    b.sort(key=lambda e: e[0])
    ta, tb = [e[0] for e in a], [e[0] for e in b]
    rows = []
    for e in b:
        if not (e[1] == "tap" and e[2] == "Out" and e[3] == "request"):
            continue
        seq, t1 = e[4], e[0]
        t2 = first(b, tb, t1, "ul0", "Out", "udp")
        t3 = t2 and first(a, ta, t2, "tap", "P", "request", seq)
        t4 = t3 and first(a, ta, t3, "tap", "Out", "reply", seq)
        t5 = t4 and first(a, ta, t4, "ul0", "Out", "udp")
        t6 = t5 and first(b, tb, t5, "tap", "P", "reply", seq)
        if not t6 or t6 - t1 > 0.05:
            continue
        rows.append([t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t1])
    print(f"pings {len(rows)}")
    if not rows:
        return
    for i, hop in enumerate(HOPS):
        print(f"{hop} {statistics.median(r[i] for r in rows) * 1e6:.1f}")


if __name__ == "__main__":
    main()
