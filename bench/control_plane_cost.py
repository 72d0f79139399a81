#!/usr/bin/env python3
"""What the control plane costs when nothing is happening: the CPU that active health checks
on 1,000 backends at a 1 s interval take, as a share of one core, and Harbor's memory per
backend. Everything on loopback; every process it starts is ended on exit.

    python3 bench/control_plane_cost.py --harbor target/release/harbor [--backends 1000]
        [--interval-ms 1000] [--seconds 30] [--kind tcp|send-expect|http]

The backends are real listeners in this process (asyncio): each accepted connection gets
`+PONG\\r\\n` (send-expect) or an HTTP 200 (http) and is closed.
"""

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serve_backends(count, kind, ready):
    reply = {"tcp": b"", "send-expect": b"+PONG\r\n", "http": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"}[kind]

    async def handle(reader, writer):
        try:
            if kind != "tcp":
                await asyncio.wait_for(reader.read(4096), 2)
                writer.write(reply)
                await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    servers = []
    for _ in range(count):
        servers.append(await asyncio.start_server(handle, "127.0.0.1", 0, backlog=64))
    ready.extend(s.sockets[0].getsockname()[1] for s in servers)
    await asyncio.Event().wait()


def write_config(path, ports, kind, interval_ms, with_health):
    backends = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    text = f'[[service]]\nname = "fleet"\nlisten = "127.0.0.1:{free_port()}"\nbackends = [{backends}]\n'
    if with_health:
        extra = {"tcp": "", "send-expect": ', send = "PING\\r\\n", expect = "+PONG"', "http": ', path = "/"'}[kind]
        text += f'health = {{ kind = "{kind}", interval_ms = {interval_ms}, timeout_ms = 1000{extra} }}\n'
    with open(path, "w") as f:
        f.write(text)


def start_harbor(binary, config):
    return subprocess.Popen(
        [binary, "--config", config, "--admin", f"127.0.0.1:{free_port()}", "--workers", "1", "--log-level", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harbor", default="target/release/harbor")
    ap.add_argument("--backends", type=int, default=1000)
    ap.add_argument("--interval-ms", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--kind", default="tcp", choices=["tcp", "send-expect", "http"])
    ap.add_argument("--haproxy", action="store_true", help="also measure HAProxy checking the same backends (tcp)")
    args = ap.parse_args()

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ports = []
    loop = asyncio.new_event_loop()
    import threading

    threading.Thread(target=lambda: loop.run_until_complete(serve_backends(args.backends, args.kind, ports)), daemon=True).start()
    deadline = time.time() + 30
    while len(ports) < args.backends and time.time() < deadline:
        time.sleep(0.05)
    if len(ports) < args.backends:
        sys.exit("backends did not start")

    tmp = tempfile.mkdtemp(prefix="harbor-cp-cost-")
    print(f"scratch: {tmp}", file=sys.stderr)
    results = {}
    procs = []

    def stop_all(*_):
        for p in procs:
            if p.poll() is None:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *a: (stop_all(), sys.exit(1)))
    try:
        # Memory per backend: 1 backend against N, no checks.
        rss = {}
        for n in (1, args.backends):
            cfg = os.path.join(tmp, f"mem{n}.toml")
            write_config(cfg, ports[:n], args.kind, args.interval_ms, False)
            p = start_harbor(args.harbor, cfg)
            procs.append(p)
            time.sleep(2)
            rss[n] = rss_kib(p.pid)
            p.kill()
            p.wait()
        per_backend = (rss[args.backends] - rss[1]) * 1024 / (args.backends - 1)
        results["rss_1_kib"] = rss[1]
        results[f"rss_{args.backends}_kib"] = rss[args.backends]
        results["bytes_per_backend"] = per_backend

        # CPU of the checks: N backends probed every interval, nothing else happening.
        cfg = os.path.join(tmp, "health.toml")
        write_config(cfg, ports, args.kind, args.interval_ms, True)
        p = start_harbor(args.harbor, cfg)
        procs.append(p)
        time.sleep(3)  # first probes and warm-up
        c0, t0 = cpu_seconds(p.pid), time.time()
        time.sleep(args.seconds)
        c1, t1 = cpu_seconds(p.pid), time.time()
        results["probes_per_second"] = args.backends * 1000 / args.interval_ms
        results["cpu_share_of_one_core"] = (c1 - c0) / (t1 - t0)
        results["rss_with_checks_kib"] = rss_kib(p.pid)
        p.kill()
        p.wait()

        # Harbor with the same backends and no checks: what it costs when idle.
        cfg = os.path.join(tmp, "idle.toml")
        write_config(cfg, ports, args.kind, args.interval_ms, False)
        p = start_harbor(args.harbor, cfg)
        procs.append(p)
        time.sleep(3)
        c0, t0 = cpu_seconds(p.pid), time.time()
        time.sleep(min(args.seconds, 10))
        results["idle_share_of_one_core"] = (cpu_seconds(p.pid) - c0) / (time.time() - t0)
        p.kill()
        p.wait()

        if args.haproxy:
            servers = "\n".join(
                f"    server s{i} 127.0.0.1:{port} check inter {args.interval_ms} rise 2 fall 3"
                for i, port in enumerate(ports)
            )
            conf = os.path.join(tmp, "haproxy.cfg")
            with open(conf, "w") as f:
                f.write(
                    "global\n    maxconn 4000\n    nbthread 1\n"
                    "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 10s\n"
                    "    timeout server 10s\n    timeout check 1s\n"
                    f"listen fleet\n    bind 127.0.0.1:{free_port()}\n    balance leastconn\n{servers}\n"
                )
            p = subprocess.Popen(["haproxy", "-db", "-f", conf], stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "haproxy.log"), "w"))
            procs.append(p)
            time.sleep(3)
            c0, t0 = cpu_seconds(p.pid), time.time()
            time.sleep(args.seconds)
            results["haproxy_share_of_one_core"] = (cpu_seconds(p.pid) - c0) / (time.time() - t0)
            p.kill()
            p.wait()
    finally:
        stop_all()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    print(f"control-plane cost, {args.backends} backends, {args.kind} checks every {args.interval_ms} ms:")
    print(f"  health checks: {results['cpu_share_of_one_core'] * 100:.2f} % of one core "
          f"({results['probes_per_second']:.0f} probes/s, over {args.seconds:.0f} s)")
    print(f"  Harbor idle with the same backends and no checks: {results['idle_share_of_one_core'] * 100:.2f} % of one core")
    if "haproxy_share_of_one_core" in results:
        h = results["haproxy_share_of_one_core"]
        print(f"  HAProxy, the same checks (tcp, nbthread 1): {h * 100:.2f} % of one core; "
              f"Harbor / HAProxy = {results['cpu_share_of_one_core'] / h:.2f}")
    print(f"  memory: {results['bytes_per_backend'] / 1024:.1f} KiB per backend "
          f"(RSS {results['rss_1_kib']} KiB with 1 backend, {results[f'rss_{args.backends}_kib']} KiB with {args.backends}; "
          f"{results['rss_with_checks_kib']} KiB with checks running)")


if __name__ == "__main__":
    main()
