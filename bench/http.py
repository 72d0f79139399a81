#!/usr/bin/env python3
"""HTTP mode, side by side: Harbor (`--mode http`, a wasm pick on every request) against
HAProxy (`mode http`, `http-reuse safe`) and nginx (`proxy_pass` with an upstream keepalive
pool), all in front of the same nginx backends serving a 1 KiB object.

Loads: wrk HTTP/1.1 keep-alive (-t1 -c64), wrk with `Connection: close`, and h2load over h2c
(-c64 -m10). `--cpu one-core`: the load generator on CPU 0, every proxy and the backend on
CPU 1, each proxy with one thread/worker. `--cpu all-cores`: nothing pinned, each proxy with
a thread/worker per core (Harbor with its defaults). Rounds alternate the proxies; medians are
reported with CPU microseconds per request (the proxy's own, from /proc) and the ratios
Harbor ÷ each peer. `--baseline BINARY` adds another Harbor build (the commit before, say) as
a fourth proxy, for the cost of a change in the same run. `--costs` adds Harbor three more
times on the keep-alive load, each with one thing changed, for what each costs per request:
`harbor-log` writes the access log, `harbor-builtin` picks with the built-in round-robin
instead of the wasm strategy, `harbor-noforward` leaves the forwarding headers alone.

Usage: python3 bench/http.py [--harbor target/release/harbor] [--baseline OLD] [--cpu one-core]
                             [--rounds 3] [--duration 10]
Needs nginx, haproxy, wrk and nghttp2-client (h2load), as `cargo xtask bench` installs them.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (the bench's process and /proc helpers)

HAPROXY = """global
    nbthread {threads}
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 600s
    http-reuse safe
frontend fe
    bind 127.0.0.1:{port} proto h2
    bind 127.0.0.1:{port_h1}
    default_backend be
backend be
    balance leastconn
    server b1 127.0.0.1:{b1}
    server b2 127.0.0.1:{b2}
"""

NGINX = """daemon off;
master_process on;
user root;
worker_processes {threads};
worker_rlimit_nofile 20000;
pid {run}/nginx-proxy.pid;
error_log {run}/nginx-proxy-error.log warn;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_body_temp_path {run}/nginx-proxy-body;
    proxy_temp_path {run}/nginx-proxy-temp;
    fastcgi_temp_path {run}/nginx-proxy-fcgi;
    uwsgi_temp_path {run}/nginx-proxy-uwsgi;
    scgi_temp_path {run}/nginx-proxy-scgi;
    upstream be {{
        least_conn;
        server 127.0.0.1:{b1};
        server 127.0.0.1:{b2};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port_h1};
        listen 127.0.0.1:{port} http2;
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

BACKEND = harness.NGINX_BACKEND

LOADGEN_CPU, SERVER_CPU = "0", "1"


def start_proxy(name, args, run, ports, b1, b2):
    port, port_h1 = ports
    one_core = args.cpu == "one-core"
    threads = 1 if one_core else os.cpu_count()
    if name == "haproxy":
        conf = os.path.join(run, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(HAPROXY.format(port=port, port_h1=port_h1, b1=b1, b2=b2, threads=threads))
        argv = ["haproxy", "-db", "-f", conf]
    elif name == "nginx":
        conf = os.path.join(run, "nginx-proxy.conf")
        with open(conf, "w") as f:
            f.write(NGINX.format(port=port, port_h1=port_h1, b1=b1, b2=b2, run=run, threads=threads))
        argv = ["nginx", "-c", conf, "-p", run]
    elif name in ("floor", "floor-inline"):
        # hyper with nothing else, HTTP/1.1 keep-alive only (it passes `Connection: close` on
        # to the backend, as it rewrites no header): what Harbor's HTTP mode stands on.
        argv = [args.floor] + (["--inline"] if name == "floor-inline" else []) + [
            f"127.0.0.1:{port_h1}", f"127.0.0.1:{b1},127.0.0.1:{b2}"]
        return harness.Server(name, argv, os.path.join(run, name), [port_h1], SERVER_CPU if one_core else None)
    else:
        # One listener serves HTTP/1.1 and h2c alike; the second port is the same service.
        # On all cores Harbor runs with its defaults (a worker per core).
        workers = "workers = 1\n" if one_core else ""
        if name == "harbor-percore":
            workers += 'runtime = "per-core"\nreuse_port = true\n'
        globals_extra = f'access_log = "{run}/access.log"\n' if name == "harbor-log" else ""
        strategy = "" if name == "harbor-builtin" else f'strategy = "{args.strategy}"\n'
        forwarded = 'forwarded = "off"\n' if name == "harbor-noforward" else ""
        conf = os.path.join(run, "harbor.toml")
        with open(conf, "w") as f:
            f.write(f'admin = "off"\n{workers}log_level = "warn"\n{globals_extra}\n[[service]]\nname = "web"\n'
                    f'listen = ["127.0.0.1:{port}", "127.0.0.1:{port_h1}"]\n'
                    f'backends = ["127.0.0.1:{b1}", "127.0.0.1:{b2}"]\nmode = "http"\n'
                    f'{strategy}{forwarded}max_connections = 20000\n')
        argv = [args.baseline if name == "baseline" else args.harbor, "--config", conf]
    return harness.Server(name, argv, os.path.join(run, name), [port, port_h1], SERVER_CPU if one_core else None)


def loadgen(args, cmd):
    """The load generator's command line: pinned to its core in one-core mode."""
    return (["taskset", "-c", LOADGEN_CPU] if args.cpu == "one-core" else []) + cmd


def measure(args, server, cmd, duration):
    """Runs the load; returns (requests/s, proxy CPU µs per request, p99 µs or None, errors)."""
    pids = server.pids()
    cpu0 = harness.tree_cpu_ticks(pids)
    out = subprocess.run(loadgen(args, cmd), capture_output=True, text=True, timeout=duration + 60).stdout
    cpu = (harness.tree_cpu_ticks(pids) - cpu0) / os.sysconf("SC_CLK_TCK")
    if cmd[0] == "wrk":
        r = harness.parse_wrk(out)
        errors = sum(r["socket_errors"].values()) + r["non_2xx"]
        return r["rps"], cpu * 1e6 / max(r["requests"], 1), r["p99_us"], errors
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not done or not rps:
        raise harness.BenchError(f"cannot parse h2load output:\n{out}")
    requests = int(done.group(2))
    return float(rps.group(1)), cpu * 1e6 / max(requests, 1), None, int(done.group(3)) + int(done.group(4))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--harbor", default="target/release/harbor")
    ap.add_argument("--strategy", default=os.path.abspath("strategies/least_conn.wasm"))
    ap.add_argument("--baseline", help="another Harbor binary, measured beside (the commit before)")
    ap.add_argument("--cpu", choices=["one-core", "all-cores"], default="one-core")
    ap.add_argument("--costs", action="store_true", help="measure the access log, the wasm pick and the "
                    "forwarding headers, each on its own (keep-alive load)")
    ap.add_argument("--loads", default="keep-alive,close,h2c", help="which loads, comma-separated")
    ap.add_argument("--peers", default="haproxy,nginx", help="which peers beside Harbor, comma-separated "
                    "(none: an empty string)")
    ap.add_argument("--floor", default="target/release/floor-http", help="the `floor` peer: hyper as a "
                    "proxy with nothing else (`cargo build --release -p floor-relay`)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    args = ap.parse_args()
    args.harbor = os.path.abspath(args.harbor)
    args.floor = os.path.abspath(args.floor)
    if args.baseline:
        args.baseline = os.path.abspath(args.baseline)
    for tool in ("nginx", "haproxy", "wrk", "h2load", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing")
    run = tempfile.mkdtemp(prefix="harbor-http-bench-", dir="/dev/shm")
    data = os.path.join(run, "data")
    os.makedirs(data)
    with open(os.path.join(data, "1k"), "wb") as f:
        f.write(b"x" * 1024)
    b1, b2, *proxy_ports = harness.pick_ports(4)
    conf = os.path.join(run, "nginx-backend.conf")
    with open(conf, "w") as f:
        f.write(BACKEND.format(b1=b1, b2=b2, data=data, run=run))
    results = {}
    loads = {
        "keep-alive": lambda port, port_h1: ["wrk", "-t1", "-c64", f"-d{args.duration}s", "--latency",
                                             f"http://127.0.0.1:{port_h1}/1k"],
        "close": lambda port, port_h1: ["wrk", "-t1", "-c64", f"-d{args.duration}s", "--latency",
                                        "-H", "Connection: close", f"http://127.0.0.1:{port_h1}/1k"],
        "h2c": lambda port, port_h1: ["h2load", "-c64", "-m10", f"-D{args.duration}",
                                      f"http://127.0.0.1:{port}/1k"],
    }
    backend = harness.Server("backend", ["nginx", "-c", conf, "-p", run], os.path.join(run, "backend"),
                             [b1, b2], SERVER_CPU if args.cpu == "one-core" else None)
    loads = {k: v for k, v in loads.items() if k in args.loads.split(",")}
    peers = [p for p in args.peers.split(",") if p]
    proxies = ["harbor"] + peers + (["baseline"] if args.baseline else [])
    variants = ["harbor-log", "harbor-builtin", "harbor-noforward"] if args.costs else []
    proxies += variants
    try:
        for rnd in range(args.rounds):
            order = proxies[rnd % len(proxies):] + proxies[:rnd % len(proxies)]
            for name in order:
                server = start_proxy(name, args, run, proxy_ports, b1, b2)
                try:
                    for load, cmd in loads.items():
                        if (name in variants and load != "keep-alive") or (name.startswith("floor") and load != "keep-alive"):
                            continue
                        # Warm-up, then the measured run.
                        subprocess.run(loadgen(args, [c if not c.startswith(("-d", "-D"))
                                       else c[:2] + "2" + ("s" if c.startswith("-d") else "") for c in
                                       cmd(*proxy_ports)]), capture_output=True, timeout=60)
                        got = measure(args, server, cmd(*proxy_ports), args.duration)
                        results.setdefault((name, load), []).append(got)
                        harness.log(f"round {rnd + 1} {name} {load}: {got[0]:.0f} req/s, "
                                    f"{got[1]:.1f} CPU µs/req, errors {got[3]}")
                finally:
                    server.stop()
                    time.sleep(1)
    finally:
        backend.stop()
        harness.Server.stop_all()
        shutil.rmtree(run, ignore_errors=True)

    def med(name, load, i):
        values = [r[i] for r in results.get((name, load), []) if r[i] is not None]
        return statistics.median(values) if values else None

    print(f"\n## HTTP mode, {args.cpu}, {args.rounds} rounds × {args.duration} s, medians\n")
    print("| load | proxy | req/s | CPU µs/req | p99 µs | errors |")
    print("|---|---|---:|---:|---:|---:|")
    for load in loads:
        for name in [p for p in proxies if load == "keep-alive" or p not in variants]:
            if (name, load) not in results:
                continue
            rps, cpu, p99, errors = (med(name, load, i) for i in range(4))
            print(f"| {load} | {name} | {rps:.0f} | {cpu:.2f} | {p99:.0f} | {errors:.0f} |" if p99 is not None
                  else f"| {load} | {name} | {rps:.0f} | {cpu:.2f} | – | {errors:.0f} |")
    print("\n| load | Harbor ÷ | req/s | CPU µs/req | p99 |")
    print("|---|---|---:|---:|---:|")
    for load in loads:
        for peer in [p for p in proxies[1:] if p not in variants]:
            cells = []
            for i in range(3):
                a, b = med("harbor", load, i), med(peer, load, i)
                cells.append(f"{a / b:.2f}" if a and b else "–")
            print(f"| {load} | {peer} | {' | '.join(cells)} |")

    if variants:
        print("\n| keep-alive, one thing changed | CPU µs/req | Harbor's − this: the cost per request |")
        print("|---|---:|---:|")
        full = med("harbor", "keep-alive", 1)
        for name in variants:
            cpu = med(name, "keep-alive", 1)
            if cpu is None or full is None:
                continue
            # The log adds work; the other two take work away.
            cost = cpu - full if name == "harbor-log" else full - cpu
            what = {"harbor-log": "the access log", "harbor-builtin": "the wasm pick (least_conn)",
                    "harbor-noforward": "the forwarding headers"}[name]
            print(f"| {name} | {cpu:.2f} | {what}: {cost:+.2f} µs |")


if __name__ == "__main__":
    main()
