#!/usr/bin/env python3
"""TLS termination, side by side: Harbor (`[service.tls]`, HTTP mode, a wasm pick on every
request) against HAProxy (OpenSSL 3.0, `ssl crt`) and nginx (OpenSSL 3.0, `ssl_certificate`,
a shared session cache), all with the same certificate (ECDSA P-256 or RSA-2048, `--key`) in
front of the same nginx backends serving a 1 KiB object and a 16 MiB one over plain HTTP.

Loads: full handshakes (8 `openssl s_time -new`, a GET of 1 KiB on each new connection: no
client resumes), resumed handshakes (wrk -c64 with `Connection: close`: wrk resumes every
session by its ticket after the first; Harbor counts them as resumed), keep-alive requests over
TLS (wrk -c64), and bulk (wrk -c4, the 16 MiB object: MiB/s).
`harbor-tcp` terminates TLS on a TCP-mode service and `harbor-tcp-plain` is the same service
without TLS (plain HTTP loads): their difference is what terminating TLS costs a TCP service,
per connection and per GiB. `--cpu one-core`: the load generator on CPU 0, every proxy and the
backend on CPU 1, each proxy with one thread; `all-cores`: nothing pinned, a thread per core.
Medians over rounds, CPU from /proc (the proxy's own), and ratios Harbor ÷ each peer.
`--no-resumption` turns session tickets and caches off in every proxy, and the `new` load
(wrk -c64 with `Connection: close`) is then full handshakes from a client fast enough to
keep a proxy's core busy, where 8 s_time clients are not on one core.

Usage: python3 bench/tls.py [--harbor target/release/harbor] [--cpu one-core] [--key ecdsa]
                            [--rounds 3] [--duration 10]
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
import harness  # noqa: E402

HAPROXY = """global
    nbthread {threads}
    maxconn 9000
    tune.ssl.default-dh-param 2048
{resumption}defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 600s
    http-reuse safe
frontend fe
    bind 127.0.0.1:{port} ssl crt {pem} alpn h2,http/1.1{no_tickets}
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
    ssl_session_cache {session_cache};
    ssl_session_tickets {tickets};
    upstream be {{
        least_conn;
        server 127.0.0.1:{b1};
        server 127.0.0.1:{b2};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""

BACKEND = harness.NGINX_BACKEND

LOADGEN_CPU, SERVER_CPU = "0", "1"
BULK_MIB = 16
# What each proxy is, and whether its loads are TLS.
TLS_PROXIES = ("harbor", "haproxy", "nginx", "harbor-tcp")


def make_certificate(run, key):
    cert, keyfile = os.path.join(run, "cert.pem"), os.path.join(run, "key.pem")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if key == "ecdsa" else ["-newkey", "rsa:2048"]
    subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-days", "2", "-subj", "/CN=bench.harbor",
                    "-addext", "subjectAltName=DNS:bench.harbor", "-keyout", keyfile, "-out", cert],
                   check=True, capture_output=True)
    combined = os.path.join(run, "combined.pem")
    with open(combined, "w") as f:
        f.write(open(cert).read() + open(keyfile).read())
    return cert, keyfile, combined


def start_proxy(name, args, run, port, b1, b2, certs):
    cert, key, combined = certs
    one_core = args.cpu == "one-core"
    threads = 1 if one_core else os.cpu_count()
    if name == "haproxy":
        conf = os.path.join(run, "haproxy.cfg")
        with open(conf, "w") as f:
            off = args.no_resumption
            f.write(HAPROXY.format(port=port, pem=combined, b1=b1, b2=b2, threads=threads,
                                   resumption="    tune.ssl.cachesize 0\n" if off else "",
                                   no_tickets=" no-tls-tickets" if off else ""))
        argv = ["haproxy", "-db", "-f", conf]
    elif name == "nginx":
        conf = os.path.join(run, "nginx-proxy.conf")
        with open(conf, "w") as f:
            f.write(NGINX.format(port=port, cert=cert, key=key, b1=b1, b2=b2, run=run, threads=threads,
                                 session_cache="off" if args.no_resumption else "shared:SSL:20m",
                                 tickets="off" if args.no_resumption else "on"))
        argv = ["nginx", "-c", conf, "-p", run]
    else:
        workers = "workers = 1\n" if one_core else ""
        tcp = name.startswith("harbor-tcp")
        mode = "" if tcp else 'mode = "http"\n'
        resumption = "session_tickets = false\nsession_cache = 0\n" if args.no_resumption else ""
        tls = "" if name == "harbor-tcp-plain" else (
            f'[service.tls]\ncertificates = [ {{ cert = "{cert}", key = "{key}" }} ]\n{resumption}')
        conf = os.path.join(run, "harbor.toml")
        with open(conf, "w") as f:
            f.write(f'admin = "off"\n{workers}log_level = "warn"\n\n[[service]]\nname = "web"\n'
                    f'listen = ["127.0.0.1:{port}"]\nbackends = ["127.0.0.1:{b1}", "127.0.0.1:{b2}"]\n{mode}'
                    f'strategy = "{args.strategy}"\nmax_connections = 20000\n{tls}')
        argv = [args.harbor, "--config", conf]
    return harness.Server(name, argv, os.path.join(run, name), [port], SERVER_CPU if one_core else None)


def loadgen(args, cmd):
    return (["taskset", "-c", LOADGEN_CPU] if args.cpu == "one-core" else []) + cmd


def run_load(args, name, load, port, duration):
    """Runs one load; returns (operations, seconds, p99 µs or None, errors)."""
    scheme = "http" if name == "harbor-tcp-plain" else "https"
    base = f"{scheme}://127.0.0.1:{port}"
    if load == "full":
        if scheme == "http":
            cmd = ["wrk", "-t1", "-c64", f"-d{duration}s", "-H", "Connection: close", f"{base}/1k"]
            out = subprocess.run(loadgen(args, cmd), capture_output=True, text=True, timeout=duration + 60).stdout
            r = harness.parse_wrk(out)
            return r["requests"], float(duration), r["p99_us"], sum(r["socket_errors"].values()) + r["non_2xx"]
        clients = [subprocess.Popen(loadgen(args, ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                                                    "-www", "/1k", "-time", str(duration)]),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for _ in range(8)]
        total = 0
        for c in clients:
            out, _ = c.communicate(timeout=duration + 60)
            found = re.findall(r"(\d+) connections in [\d.]+ real seconds", out)
            total += int(found[-1]) if found else 0
        return total, float(duration), None, 0
    if load == "bulk":
        cmd = ["wrk", "-t1", "-c4", f"-d{duration}s", f"{base}/{BULK_MIB}m"]
    else:
        if load == "resumed" and scheme == "http":
            return None
        close = ["-H", "Connection: close"] if load in ("resumed", "new") else []
        cmd = ["wrk", "-t1", "-c64", f"-d{duration}s", "--latency", *close, f"{base}/1k"]
    out = subprocess.run(loadgen(args, cmd), capture_output=True, text=True, timeout=duration + 60).stdout
    r = harness.parse_wrk(out)
    secs = float(re.search(r"requests in ([\d.]+)s", out).group(1)) if re.search(r"requests in ([\d.]+)s", out) else duration
    return r["requests"], secs, r["p99_us"], sum(r["socket_errors"].values()) + r["non_2xx"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--harbor", default="target/release/harbor")
    ap.add_argument("--strategy", default=os.path.abspath("strategies/least_conn.wasm"))
    ap.add_argument("--cpu", choices=["one-core", "all-cores"], default="one-core")
    ap.add_argument("--key", choices=["ecdsa", "rsa"], default="ecdsa")
    ap.add_argument("--loads", default="full,resumed,keep-alive,bulk", help="full, resumed, keep-alive, bulk, "
                    "new (wrk with Connection: close: full handshakes with --no-resumption)")
    ap.add_argument("--no-resumption", action="store_true", help="session tickets and caches off in every proxy")
    ap.add_argument("--proxies", default="harbor,haproxy,nginx,harbor-tcp,harbor-tcp-plain")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    args = ap.parse_args()
    args.harbor = os.path.abspath(args.harbor)
    for tool in ("nginx", "haproxy", "wrk", "openssl", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing")
    run = tempfile.mkdtemp(prefix="harbor-tls-bench-", dir="/dev/shm")
    data = os.path.join(run, "data")
    os.makedirs(data)
    with open(os.path.join(data, "1k"), "wb") as f:
        f.write(b"x" * 1024)
    with open(os.path.join(data, f"{BULK_MIB}m"), "wb") as f:
        f.write(os.urandom(BULK_MIB << 20))
    certs = make_certificate(run, args.key)
    b1, b2, port = harness.pick_ports(3)
    conf = os.path.join(run, "nginx-backend.conf")
    with open(conf, "w") as f:
        f.write(BACKEND.format(b1=b1, b2=b2, data=data, run=run))
    backend = harness.Server("backend", ["nginx", "-c", conf, "-p", run], os.path.join(run, "backend"),
                             [b1, b2], SERVER_CPU if args.cpu == "one-core" else None)
    loads = args.loads.split(",")
    proxies = args.proxies.split(",")
    results = {}
    try:
        for rnd in range(args.rounds):
            order = proxies[rnd % len(proxies):] + proxies[:rnd % len(proxies)]
            for name in order:
                server = start_proxy(name, args, run, port, b1, b2, certs)
                try:
                    for load in loads:
                        run_load(args, name, load, port, 2)  # warm-up
                        pids = server.pids()
                        cpu0 = harness.tree_cpu_ticks(pids)
                        got = run_load(args, name, load, port, args.duration)
                        if got is None:
                            continue
                        cpu = (harness.tree_cpu_ticks(pids) - cpu0) / os.sysconf("SC_CLK_TCK")
                        ops, secs, p99, errors = got
                        rate = ops / secs
                        per_op_us = cpu * 1e6 / max(ops, 1)
                        results.setdefault((name, load), []).append((rate, per_op_us, p99, errors))
                        harness.log(f"round {rnd + 1} {name} {load}: {rate:.0f}/s, {per_op_us:.1f} CPU µs/op, "
                                    f"errors {errors}")
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

    unit = {"full": "handshakes/s", "resumed": "handshakes/s", "new": "handshakes/s", "keep-alive": "req/s",
            "bulk": "MiB/s"}
    resumption = ", no resumption" if args.no_resumption else ""
    print(f"\n## TLS, {args.key}, {args.cpu}{resumption}, {args.rounds} rounds × {args.duration} s, medians\n")
    print("| load | proxy | rate | CPU µs per op | p99 µs | errors |")
    print("|---|---|---:|---:|---:|---:|")
    for load in loads:
        for name in proxies:
            rate, cpu, p99, errors = (med(name, load, i) for i in range(4))
            if rate is None:
                continue
            if load == "bulk":
                rate, cpu = rate * BULK_MIB, cpu / BULK_MIB * 1024  # MiB/s; CPU µs per MiB -> ms per GiB
                print(f"| bulk | {name} | {rate:.0f} MiB/s | {cpu / 1000:.1f} ms/GiB | – | {errors:.0f} |")
                continue
            p99s = f"{p99:.0f}" if p99 is not None else "–"
            print(f"| {load} | {name} | {rate:.0f} {unit[load]} | {cpu:.1f} | {p99s} | {errors:.0f} |")
    print("\n| load | Harbor ÷ | rate | CPU per op |")
    print("|---|---|---:|---:|")
    for load in loads:
        for peer in ("haproxy", "nginx"):
            if peer not in proxies:
                continue
            cells = []
            for i in range(2):
                a, b = med("harbor", load, i), med(peer, load, i)
                cells.append(f"{a / b:.2f}" if a and b else "–")
            print(f"| {load} | {peer} | {' | '.join(cells)} |")
    if "harbor-tcp" in proxies and "harbor-tcp-plain" in proxies:
        print("\n| TCP mode | with TLS | without | what TLS costs |")
        print("|---|---:|---:|---:|")
        a, b = med("harbor-tcp", "full", 1), med("harbor-tcp-plain", "full", 1)
        if a and b:
            print(f"| CPU µs per new connection | {a:.1f} | {b:.1f} | {a - b:+.1f} µs |")
        a, b = med("harbor-tcp", "bulk", 1), med("harbor-tcp-plain", "bulk", 1)
        if a and b:
            a, b = a / BULK_MIB * 1024 / 1e6, b / BULK_MIB * 1024 / 1e6
            print(f"| CPU s per GiB | {a:.2f} | {b:.2f} | {a - b:+.2f} s |")


if __name__ == "__main__":
    main()
