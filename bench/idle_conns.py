#!/usr/bin/env python3
"""Open N idle TCP connections to HOST:PORT, hold them, then close them.

Used by bench/harness.py to measure a proxy's memory per idle connection
(stdlib only). Protocol on stdout, one line each, flushed:

    READY <opened> <failed> <closed-by-peer>   connects done, --settle seconds passed
    CLOSED <n>                  every socket closed

After READY it holds the connections until a line arrives on stdin, stdin is
closed, or --hold-max seconds pass, whichever comes first. Sockets are closed
with an RST (SO_LINGER 0) so that no TIME_WAIT is left behind on loopback.
Nothing is ever sent on the connections: they stay idle.
"""

import argparse
import resource
import select
import socket
import struct
import sys
import time


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", "--count", type=int, required=True, help="connections to open")
    ap.add_argument("--connect-timeout", type=float, default=5.0, help="per connection, seconds")
    ap.add_argument("--open-deadline", type=float, default=90.0, help="for all connects, seconds")
    ap.add_argument("--max-failures", type=int, default=20, help="give up after this many failed connects in a row")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait before READY")
    ap.add_argument("--hold-max", type=float, default=300.0, help="hold at most this long, seconds")
    args = ap.parse_args()

    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.host.startswith("127."):
        sys.exit("idle_conns: loopback targets only")
    limit = raise_nofile(args.count + 64)
    if limit < args.count + 16:
        sys.exit(f"idle_conns: RLIMIT_NOFILE is {limit}, too low for {args.count} connections")

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    linger0 = struct.pack("ii", 1, 0)
    socks, failed, in_a_row = [], 0, 0
    deadline = time.monotonic() + args.open_deadline
    for i in range(args.count):  # bounded by count and by the deadline
        if time.monotonic() > deadline or in_a_row >= args.max_failures:
            failed += args.count - i  # give up on the rest
            break
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        s.settimeout(args.connect_timeout)
        try:
            s.connect((args.host, args.port))
        except OSError:
            failed += 1
            in_a_row += 1
            s.close()
            continue
        in_a_row = 0
        socks.append(s)

    time.sleep(max(0.0, args.settle))
    # A connection the proxy closed at once (e.g. over its limit) is readable with EOF.
    poller = select.poll()  # not select(): descriptors go far beyond FD_SETSIZE
    for s in socks:
        poller.register(s, select.POLLIN)
    dead = len(poller.poll(0))
    print(f"READY {len(socks)} {failed} {dead}", flush=True)

    stdin_poll = select.poll()
    stdin_poll.register(sys.stdin, select.POLLIN | select.POLLHUP)
    stdin_poll.poll(max(0.0, args.hold_max) * 1000)
    for s in socks:
        s.close()
    print(f"CLOSED {len(socks)}", flush=True)


if __name__ == "__main__":
    main()
