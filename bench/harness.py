#!/usr/bin/env python3
"""Side-by-side benchmark of Harbor against HAProxy and nginx-stream (stdlib only).

Started by bench/run.sh, which installs the tools and builds Harbor first; see
bench/README.md. Everything runs on loopback. Per round, targets in rotating order:

  1. memory: a fresh proxy process, baseline PSS, N idle connections held
     end-to-end (bench/idle_conns.py), PSS again -> KiB per connection;
     once per size in --idle (a fresh process for each size);
  2. keep-alive: wrk -t1 -cC --latency /1k -> req/s, p50, p99, CPU per request;
  3. new connections: the same with "Connection: close" -> conn/s, CPU per conn;
  4. bulk: curl downloads the bulk file -> MiB/s, CPU per GiB.

Each phase visits every target before the next phase starts, so targets alternate.
Medians over rounds are reported. CPU is utime+stime from /proc/PID/stat summed
over the proxy's process tree; memory is Pss from /proc/PID/smaps_rollup summed
the same way. For "direct" (the backend itself, no proxy), the CPU and memory
columns are the backend nginx's own cost.
"""

import argparse
import contextlib
import json
import os
import platform
import random
import re
import resource
import signal
import shlex
import socket
import ssl
import statistics
import string
import subprocess
import sys
import time
import types
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONF = os.path.join(HERE, "conf")
TICK = os.sysconf("SC_CLK_TCK")
ALL_TARGETS = ["direct", "haproxy", "nginx", "harbor", "harbor-rr", "harbor-kernel"]
# Not in the default set: ask for it with --targets.
EXTRA_TARGETS = ["harbor-accesslog", "harbor-peek", "harbor-x", "harbor-shards", "harbor-percore", "floor",
                 "harbor-base"]
LABELS = {"direct": "direct (ceiling)", "haproxy": "HAProxy", "nginx": "nginx-stream", "harbor": "Harbor",
          "harbor-rr": "Harbor, built-in round-robin",
          "harbor-accesslog": "Harbor with --access-log (tmpfs)",
          "harbor-peek": "Harbor with --peek tls",
          "harbor-x": "Harbor with $HARBOR_X_ARGS (and $HARBOR_X_ENV)",
          "harbor-kernel": "Harbor with --relay kernel",
          "harbor-shards": "Harbor, one --workers 1 process per CPU on one --reuse-port address",
          "harbor-percore": "Harbor with --runtime per-core --reuse-port",
          "floor": "floor: a bare io_uring relay (bench/floor)",
          "harbor-base": "Harbor at the base revision (--harbor-base)"}
# Targets measured in the keep-alive and new-connection phases only: harbor-rr is the same
# binary and data path as harbor without the wasm strategy, there to price the strategy call.
# harbor-accesslog is harbor with the access log on (to tmpfs), to price the log in the same run.
# harbor-x is harbor plus the flags in $HARBOR_X_ARGS and the variables in $HARBOR_X_ENV
# (space-separated), to try one change against harbor in the same run.
# harbor-shards is thread-per-core taken to its limit: as many single-threaded Harbor processes
# as the proxy has CPUs, sharing nothing but one SO_REUSEPORT address, against harbor's one
# work-stealing runtime of that many workers (CPU is the sum over the processes).
# harbor-percore is the same idea inside one process: a runtime per worker thread, each
# accepting on its own socket of the address's SO_REUSEPORT group.
# harbor-base is harbor as built from an earlier revision (--harbor-base, made by `cargo xtask
# bench --compare REV`), with the same flags, in every phase: the A/B of a change in one run.
# floor is bench/floor: a relay with no feature at all on one io_uring thread, the least a
# user-space relay costs here (one instance per proxy CPU on one SO_REUSEPORT address).
THROUGHPUT_ONLY = {"harbor-rr", "harbor-accesslog", "harbor-peek", "harbor-x", "harbor-shards", "harbor-percore",
                   "floor"}
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

# (key, column title, better, decimals)
METRICS = [
    ("ka_rps", "ka req/s", "higher", 0),
    ("ka_p50_us", "p50 µs", "lower", 0),
    ("ka_p99_us", "p99 µs", "lower", 0),
    ("conn_rps", "new conn/s", "higher", 0),
    ("bulk_mib_s", "bulk MiB/s", "higher", 0),
    ("cpu_us_per_req", "CPU µs/req", "lower", 2),
    ("cpu_us_per_conn", "CPU µs/conn", "lower", 1),
    ("cpu_with_backend_us_per_req", "CPU+backend µs/req", "lower", 2),
    ("cpu_with_backend_us_per_conn", "CPU+backend µs/conn", "lower", 1),
    ("cpu_ms_per_gib", "CPU ms/GiB", "lower", 0),
]
# Why "CPU+backend": the CPU columns are the proxy's own time as the kernel accounts it per
# process, and in one-core mode the backend nginx shares the proxy's core. For an io_uring relay
# (the floor) the kernel puts part of the relay's work on the backend's account: perf's task
# clock gives the floor 70 % of the core and nginx 28 %, /proc 56 % and 41 % (2026-12-06). The
# proxy-plus-backend sum does not depend on who is charged; the backend's own share of it is
# about the same behind every proxy.
# With --tls: new connections carrying a real TLS handshake (wrk https://, the backend nginx
# terminates TLS; the proxies only relay), so `--peek tls` reads real ClientHellos.
TLS_METRICS = [
    ("tls_conn_rps", "TLS conn/s", "higher", 0),
    ("cpu_us_per_tls_conn", "CPU µs/TLS conn", "lower", 1),
]


# How the CPUs are shared out; see mode_cpus.
MODES = ["one-core", "all-cores"]


# The nginx backends of bench/http.py and bench/tls.py: files from {data} on two ports.
NGINX_BACKEND = """daemon off;
master_process on;
user root;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {run}/nginx-backend.pid;
error_log {run}/nginx-backend-error.log warn;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    sendfile on;
    client_body_temp_path {run}/b-body;
    proxy_temp_path {run}/b-proxy;
    fastcgi_temp_path {run}/b-fcgi;
    uwsgi_temp_path {run}/b-uwsgi;
    scgi_temp_path {run}/b-scgi;
    server {{
        listen 127.0.0.1:{b1} backlog=4096;
        listen 127.0.0.1:{b2} backlog=4096;
        root {data};
        location / {{ }}
    }}
}}
"""


def mode_cpus(mode, ncpu):
    """(load generator CPUs, proxy-and-backend CPUs) as taskset lists; "" = not pinned."""
    if mode == "one-core":
        return "0", "1"
    if ncpu >= 3:
        return "0", f"1-{ncpu - 1}"
    # Two CPUs: a proxy cannot have "all but the load generator's" and more than one, so
    # nothing is pinned and everyone (load generator, proxies, backends) shares both.
    return "", ""


class BenchError(Exception):
    pass


class TargetBroken(Exception):
    """A target started but does not proxy: its measurements are skipped."""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc readers


def read_stat(pid):
    """(ppid, utime+stime ticks) of one process (all its threads), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); ppid is field 4; utime, stime are fields 14, 15;
    # cutime, cstime (16, 17) are reaped children, e.g. nginx workers that exited.
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def process_tree(root):
    """root and all its live descendants."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st:
                children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo and len(out) < 10000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_ticks(pids):
    total = 0
    for pid in pids:
        st = read_stat(pid)
        if st:
            total += st[1]
    return total


def tree_pss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def per_cpu_jiffies():
    """{cpuN: [user, nice, system, idle, iowait, irq, softirq, steal]} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                out[parts[0]] = [int(x) for x in parts[1:9]]
    return out


def kworker_ticks():
    """CPU ticks used so far by the kernel's worker threads (kworker/*). The kernel relay's
    bytes are sent from a workqueue, so that work is the relay's cost, not the machine's noise."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, _, rest = stat.partition(") ")
        if name.split("(", 1)[-1].startswith("kworker"):
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])
    return total


def cpu_jiffies():
    """Aggregate /proc/stat: (busy, steal). busy = user+nice+system+irq+softirq."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
    return user + nice + system + irq + softirq, steal


NETSTAT_KEYS = (
    "TcpExt:PruneCalled", "TcpExt:RcvPruned", "TcpExt:TCPRcvCollapsed", "TcpExt:TCPMemoryPressures",
    "TcpExt:TCPAbortOnMemory", "TcpExt:ListenOverflows", "TcpExt:ListenDrops", "TcpExt:TCPBacklogDrop",
    "TcpExt:TCPTimeWaitOverflow", "TcpExt:TCPRcvQDrop", "TcpExt:TCPZeroWindowDrop", "TcpExt:TCPOFOQueue",
    "Tcp:RetransSegs", "Tcp:ActiveOpens", "Tcp:PassiveOpens", "Tcp:AttemptFails", "Tcp:EstabResets",
)


def netstat_counters():
    """Selected kernel TCP counters (/proc/net/netstat and /proc/net/snmp), for diagnosis."""
    out = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            with open(path) as f:
                rows = f.read().splitlines()
        except OSError:
            continue
        for head, vals in zip(rows[::2], rows[1::2]):
            prefix, names = head.split(":", 1)
            for name, val in zip(names.split(), vals.split(":", 1)[1].split()):
                key = f"{prefix}:{name}"
                if key in NETSTAT_KEYS:
                    out[key] = int(val)
    return out


def established_on(ports):
    """Number of ESTABLISHED sockets whose local port is one of ports (IPv4 and IPv6)."""
    hexports = {f"{p:04X}" for p in ports}
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    parts = line.split(None, 4)
                    if parts[3] == "01" and parts[1].rsplit(":", 1)[1] in hexports:
                        n += 1
        except OSError:
            pass
    return n


# ---------------------------------------------------------------- processes


class Server:
    """A server started in its own process group, pinned with taskset."""

    registry = {}  # pgid -> Server, for cleanup
    pidfile = None

    def __init__(self, name, argv, run_dir, ports, cpus, env=None):
        self.name, self.run_dir, self.ports = name, run_dir, ports
        os.makedirs(run_dir, exist_ok=True)
        self.log_path = os.path.join(run_dir, "stdout.log")
        cmd = (["taskset", "-c", cpus] if cpus else []) + argv
        self.cmd = cmd
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd=run_dir,
                start_new_session=True, env=env,
            )
        Server.registry[self.proc.pid] = self
        Server.write_pidfile()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    @classmethod
    def write_pidfile(cls):
        if cls.pidfile:
            with open(cls.pidfile, "w") as f:
                f.write("".join(f"{pgid}\n" for pgid in cls.registry))

    def tail(self, n=15):
        texts = []
        for path in (self.log_path, os.path.join(self.run_dir, "error.log")):
            try:
                with open(path, errors="replace") as f:
                    texts.append(f"--- {path}\n" + "".join(f.readlines()[-n:]))
            except OSError:
                pass
        return "\n".join(texts)

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} at startup:\n"
                                 f"  {' '.join(self.cmd)}\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", pending[0]), timeout=1):
                    pending.pop(0)
            except OSError:
                time.sleep(0.05)
        if pending:
            raise BenchError(f"{self.name} not listening on {pending} after {timeout:.0f}s\n{self.tail()}")

    def pids(self):
        return process_tree(self.proc.pid) if self.proc.poll() is None else []

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=10.0):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {timeout:.0f}s, killing it")
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        # the group may still hold stragglers (e.g. nginx workers)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        Server.registry.pop(self.proc.pid, None)
        Server.write_pidfile()
        return self.proc.returncode

    @classmethod
    def stop_all(cls):
        for srv in list(cls.registry.values()):
            try:
                srv.stop(timeout=5)
            except Exception as e:  # keep cleaning up
                log(f"cleanup of {srv.name}: {e}")


# ---------------------------------------------------------------- helpers


def pick_ports(n):
    """n free loopback ports, below the ephemeral range when there is room."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except OSError:
        low = 32768
    lo, hi = (20000, low - 1) if low > 21000 else (1025, 65535)
    chosen, tries = [], 0
    start = random.randint(lo, hi)
    while len(chosen) < n and tries < 2000:
        port = lo + (start - lo + tries * 7) % (hi - lo)
        tries += 1
        if port in chosen:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            chosen.append(port)
        except OSError:
            pass
        finally:
            s.close()
    if len(chosen) < n:
        raise BenchError("could not find free loopback ports")
    return chosen


def render(template, dest, **values):
    with open(os.path.join(CONF, template)) as f:
        text = string.Template(f.read()).substitute(**{k: str(v) for k, v in values.items()})
    with open(dest, "w") as f:
        f.write(text)
    return dest


def run_capture(cmd, timeout):
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def tool_version(cmd):
    try:
        rc, out, err = run_capture(cmd, 10)
        return (out + err).strip().splitlines()[0]
    except Exception:
        return "?"


def to_us(value, unit):
    return float(value) * {"us": 1.0, "ms": 1e3, "s": 1e6}[unit]


def parse_wrk(out):
    res = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not m:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    res["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        res[f"p{pct}_us"] = to_us(m.group(1), m.group(2)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


# ---------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args):
        self.a = args
        self.work = args.workdir
        self.warnings = []
        self.targets = args.targets
        self.data_dir = os.path.join(self.work, "data")
        self.loadgen_cpus = args.loadgen_cpus
        self.server_cpus = args.server_cpus
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.results = {t: {"rounds": []} for t in self.targets}
        self.backends = None
        self.broken = {}  # target -> why it is no longer measured

    def warn(self, msg):
        log(f"WARNING: {msg}")
        self.warnings.append(msg)

    # ---- setup

    def prepare_data(self):
        os.makedirs(self.data_dir, exist_ok=True)
        with open(os.path.join(self.data_dir, "1k"), "wb") as f:
            f.write(bytes(random.getrandbits(8) for _ in range(1024)))
        size = self.a.bulk_mib * 1024 * 1024
        path = os.path.join(self.data_dir, "bulk")
        log(f"writing the {self.a.bulk_mib} MiB bulk file (zeros, not sparse) to {path}")
        chunk = bytes(4 << 20)
        with open(path, "wb") as f:
            written = 0
            while written < size:  # bounded by size
                n = min(len(chunk), size - written)
                f.write(chunk[:n])
                written += n
            f.flush()
            os.fsync(f.fileno())  # no writeback of it may overlap a measurement
        self.bulk_bytes = size

    def touch_bulk_file(self):
        """Read the bulk file once (unmeasured) so the downloads find it in the page cache."""
        with open(os.path.join(self.data_dir, "bulk"), "rb", buffering=0) as f:
            buf = bytearray(8 << 20)
            for _ in range(self.bulk_bytes // len(buf) + 2):  # bounded by the file size
                if not f.readinto(buf):
                    break

    def start_backend(self, tag):
        ports = pick_ports(4 if self.a.tls else 2)
        run_dir = os.path.join(self.work, tag)
        os.makedirs(run_dir, exist_ok=True)
        tls = ""
        if self.a.tls:
            tls = (f"listen 127.0.0.1:{ports[2]} ssl backlog=4096;\n        "
                   f"listen 127.0.0.1:{ports[3]} ssl backlog=4096;\n        "
                   f"ssl_certificate {self.data_dir}/cert.pem;\n        "
                   f"ssl_certificate_key {self.data_dir}/key.pem;\n        "
                   f"ssl_session_tickets off;\n        ssl_session_cache off;")
        conf = render("nginx-backend.conf", os.path.join(run_dir, "nginx.conf"), run_dir=run_dir,
                      data_dir=self.data_dir, port1=ports[0], port2=ports[1], nofile=self.nofile,
                      worker_connections=self.nofile - 64, workers=self.server_ncpus, tls=tls)
        srv = Server(tag, ["nginx", "-p", run_dir, "-c", conf, "-e", os.path.join(run_dir, "error.log")],
                     run_dir, ports, self.server_cpus)
        return srv

    def start_target(self, target, tag, tls=False):
        """Start a fresh instance of target; returns (Server, port to load). With tls, the
        proxy relays to the backends' TLS ports, and the probe speaks TLS."""
        if target == "direct":
            if tls:
                return None, self.backends.ports[2]
            srv = self.start_backend(f"{tag}-direct")
            return srv, srv.ports[0]
        b1, b2 = self.backends.ports[2:4] if tls else self.backends.ports[:2]
        port = pick_ports(1)[0]
        run_dir = os.path.join(self.work, f"{tag}-{target}")
        os.makedirs(run_dir, exist_ok=True)
        if target == "haproxy":
            conf = render("haproxy.cfg", os.path.join(run_dir, "haproxy.cfg"), run_dir=run_dir, port=port,
                          backend1=b1, backend2=b2, nbthread=self.server_ncpus, maxconn=self.haproxy_maxconn)
            argv = ["haproxy", "-db", "-f", conf]
        elif target == "nginx":
            load = f"load_module {STREAM_MODULE};" if os.path.exists(STREAM_MODULE) else ""
            conf = render("nginx-stream.conf", os.path.join(run_dir, "nginx.conf"), run_dir=run_dir, port=port,
                          backend1=b1, backend2=b2, load_module=load, nofile=self.nofile,
                          worker_connections=self.nofile - 64, workers=self.server_ncpus,
                          reuseport=" reuseport" if self.server_ncpus > 1 else "")
            argv = ["nginx", "-p", run_dir, "-c", conf, "-e", os.path.join(run_dir, "error.log")]
        elif target == "floor":
            binary = os.path.join(REPO, "target", "release", "floor-relay")
            if not os.access(binary, os.X_OK):
                raise BenchError(f"{binary} is missing (run: cargo build --release -p floor-relay)")
            argv = [binary, f"127.0.0.1:{port}", f"127.0.0.1:{b1},127.0.0.1:{b2}"]
        elif target == "harbor-shards":
            shards = max(1, self.server_ncpus)
            admins = pick_ports(shards)
            common = [self.a.harbor, "--listen", f"127.0.0.1:{port}", "--backends",
                      f"127.0.0.1:{b1},127.0.0.1:{b2}", "--max-connections", str(self.a.harbor_max_connections),
                      "--strategy", self.a.strategy, "--reuse-port"]
            extra = list(self.harbor_extra)
            if "--workers" in extra:
                at = extra.index("--workers")
                del extra[at:at + 2]
            common += extra
            procs = [" ".join(shlex.quote(x) for x in common + ["--admin", f"127.0.0.1:{a}", "--workers", "1"])
                     for a in admins]
            # The harness's SIGTERM goes to the whole process group, so it reaches every Harbor
            # itself; the shell ignores it (set after the Harbors start, so they do not inherit
            # that) and exits with the first Harbor's failure, if any. (A `kill 0` trap re-entered
            # itself and crashed dash with SIGSEGV.)
            script = ("pids=''\n" + "".join(f"{p} & pids=\"$pids $!\"\n" for p in procs)
                      + "trap '' TERM INT\nrc=0\nfor p in $pids; do wait $p; c=$?; [ $rc -ne 0 ] || rc=$c; done\nexit $rc\n")
            env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
            srv = Server(f"{tag}-{target}", ["sh", "-c", script], run_dir, [port] + admins, self.server_cpus, env=env)
            try:
                probe(port, tls=tls)
            except TargetBroken as e:
                srv.stop()
                raise TargetBroken(f"{target} listens on :{port} but does not proxy: {e}") from None
            return srv, port
        elif target in ("harbor", "harbor-rr", "harbor-accesslog", "harbor-peek", "harbor-x", "harbor-kernel",
                        "harbor-percore", "harbor-base"):
            strategy = ["--strategy", self.a.strategy] if target != "harbor-rr" else []
            if target == "harbor-kernel":
                # Every phase, like harbor: the relay is what it changes (needs root).
                strategy += ["--relay", "kernel"]
            if target == "harbor-peek":
                strategy += ["--peek", "tls"]
            if target == "harbor-percore":
                strategy += ["--runtime", "per-core", "--reuse-port"]
            if target == "harbor-accesslog":
                logdir = "/dev/shm" if os.path.isdir("/dev/shm") else run_dir
                strategy += ["--access-log", os.path.join(logdir, f"harbor-bench-access-{os.getpid()}-{tag}.log")]
            binary = self.a.harbor_base if target == "harbor-base" else self.a.harbor
            argv = [binary, "--listen", f"127.0.0.1:{port}", "--backends", f"127.0.0.1:{b1},127.0.0.1:{b2}",
                    "--admin", f"127.0.0.1:{pick_ports(1)[0]}",
                    "--max-connections", str(self.a.harbor_max_connections)] + strategy + self.harbor_extra
        else:
            raise BenchError(f"unknown target {target}")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        if target == "harbor-x":
            env.update(dict(x.split("=", 1) for x in os.environ.get("HARBOR_X_ENV", "").split() if "=" in x))
            argv += os.environ.get("HARBOR_X_ARGS", "").split()
        srv = Server(f"{tag}-{target}", argv, run_dir, [port], self.server_cpus, env=env)
        try:
            probe(port, tls=tls)
        except TargetBroken as e:
            srv.stop()
            raise TargetBroken(f"{target} listens on :{port} but does not proxy: {e}") from None
        return srv, port

    def check_harbor(self):
        if not any(t.startswith("harbor") for t in self.targets):
            return
        if not (os.path.isfile(self.a.harbor) and os.access(self.a.harbor, os.X_OK)):
            raise BenchError(f"Harbor binary {self.a.harbor} is missing (run: cargo build --release -p harbor)")
        if not os.path.isfile(self.a.strategy):
            raise BenchError(f"strategy {self.a.strategy} is missing (run: cargo xtask build)")
        try:
            rc, out, err = run_capture([self.a.harbor, "--help"], 20)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.a.harbor} --help hung")
        helptext = out + err
        if rc != 0:
            raise BenchError(f"{self.a.harbor} --help exited {rc}:\n{helptext}")
        # Match the other proxies: long idle timeouts, as many workers as CPUs it is pinned to.
        self.harbor_extra = []
        for flag, value in (("--log-level", "warn"), ("--idle-timeout-ms", "600000"),
                            ("--workers", str(self.server_ncpus))):
            if flag in helptext:
                self.harbor_extra += [flag, value]
        # Extra flags from the command line, e.g. --harbor-arg=--access-log=/tmp/access.log
        self.harbor_extra += list(self.a.harbor_arg or [])
        for flag in ("--listen", "--backends", "--strategy", "--admin", "--max-connections"):
            if flag not in helptext:
                self.warn(f"`harbor --help` does not mention {flag}; starting it may fail")

    def setup(self):
        ncpu = os.cpu_count() or 1
        if ncpu < 2 and (self.loadgen_cpus or self.server_cpus):
            self.warn("fewer than 2 CPUs: no pinning")
            self.loadgen_cpus = self.server_cpus = ""
        self.server_ncpus = len(os.sched_getaffinity(0)) if not self.server_cpus else count_cpus(self.server_cpus)
        # A proxy holds two descriptors per connection; everything must fit in RLIMIT_NOFILE.
        max_idle = max(100, (self.nofile - 200) // 2 // 100 * 100)
        self.idle_sizes = []
        for n in self.a.idle:
            if n > max_idle:
                self.warn(f"{n} idle connections need ~{2 * n + 200} descriptors per proxy but RLIMIT_NOFILE "
                          f"is {self.nofile} (hard limit; raising it needs CAP_SYS_RESOURCE): using {max_idle}")
                n = max_idle
            if n not in self.idle_sizes:
                self.idle_sizes.append(n)
        self.haproxy_maxconn = (self.nofile - 100) // 2
        self.check_harbor()
        self.prepare_data()
        if self.a.tls:
            self.make_certificate()
        self.backends = self.start_backend("backends")
        log(f"backends: nginx on 127.0.0.1:{self.backends.ports[0]} and :{self.backends.ports[1]}")

    # ---- measurement

    def snapshot(self, srv):
        busy, steal = cpu_jiffies()
        return {
            "t": time.monotonic(),
            "proxy": tree_cpu_ticks(srv.pids()) if srv is not None else 0,
            "backend": tree_cpu_ticks(self.backends.pids()),
            "kworker": kworker_ticks(),
            "children": sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]),
            "self": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
            "busy": busy,
            "steal": steal,
            "netstat": netstat_counters(),
            "per_cpu": per_cpu_jiffies(),
        }

    def cpu_delta(self, before, after, what, check_quiet=True):
        wall = after["t"] - before["t"]
        proxy_s = (after["proxy"] - before["proxy"]) / TICK
        backend_s = (after["backend"] - before["backend"]) / TICK
        loadgen_s = (after["children"] - before["children"]) + (after["self"] - before["self"])
        busy_s = (after["busy"] - before["busy"]) / TICK
        steal_s = (after["steal"] - before["steal"]) / TICK
        kworker_s = (after["kworker"] - before["kworker"]) / TICK
        others_s = max(0.0, busy_s - proxy_s - backend_s - loadgen_s - kworker_s) + steal_s
        d = {
            "wall_s": round(wall, 3),
            "proxy_cpu_s": round(proxy_s, 3),
            "backend_cpu_s": round(backend_s, 3),
            "loadgen_cpu_s": round(loadgen_s, 3),
            "kworker_cpu_s": round(kworker_s, 3),
            "others_cpu_s": round(others_s, 3),
            "others_core_frac": round(others_s / wall, 3) if wall > 0 else 0.0,
            # per CPU, seconds of user, system, softirq and idle during the measurement
            "per_cpu_s": {c: {name: round((after["per_cpu"][c][i] - before["per_cpu"][c][i]) / TICK, 2)
                              for name, i in (("user", 0), ("system", 2), ("softirq", 6), ("idle", 3))}
                          for c in after["per_cpu"] if c in before["per_cpu"]},
            "tcp_counters": {k.split(":")[1]: after["netstat"][k] - before["netstat"].get(k, 0)
                             for k in after["netstat"] if after["netstat"][k] != before["netstat"].get(k, 0)},
        }
        if check_quiet and wall > 0 and others_s / wall > self.a.quiet_threshold:
            self.warn(f"machine not quiet during {what}: other processes used {100 * others_s / wall:.0f}% "
                      f"of a core (threshold {100 * self.a.quiet_threshold:.0f}%)")
        return d

    def wrk(self, srv, port, duration, close, what, check_quiet=True, scheme="http"):
        cmd = (["taskset", "-c", self.loadgen_cpus] if self.loadgen_cpus else []) + [
            "wrk", "-t1", f"-c{self.a.connections}", f"-d{duration}s", "--latency"]
        if close:
            cmd += ["-H", "Connection: close"]
        cmd.append(f"{scheme}://127.0.0.1:{port}/1k")
        before = self.snapshot(srv)
        try:
            rc, out, err = run_capture(cmd, duration + 60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish: {' '.join(cmd)}")
        after = self.snapshot(srv)
        if rc != 0:
            raise BenchError(f"wrk exited {rc}: {' '.join(cmd)}\n{out}\n{err}")
        res = parse_wrk(out)
        res["wrk_output"] = out
        res["cpu"] = self.cpu_delta(before, after, what, check_quiet)
        if res["requests"] == 0:
            self.warn(f"{what}: no request completed")
            return None
        errs = sum(res["socket_errors"].values()) + res["non_2xx"]
        # With Connection: close some read errors at close are normal for wrk; flag the rest.
        if res["non_2xx"] or res["socket_errors"].get("connect") or res["socket_errors"].get("timeout") or (
                errs > 0.01 * max(1, res["requests"])):
            self.warn(f"{what}: wrk reported errors {res['socket_errors']}, non-2xx {res['non_2xx']}")
        return res

    def bulk(self, srv, port, what):
        cmd = (["taskset", "-c", self.loadgen_cpus] if self.loadgen_cpus else []) + [
            "curl", "-sS", "-o", "/dev/null", "--max-time", str(self.a.bulk_timeout),
            "--speed-limit", str(1 << 20), "--speed-time", "10",  # give up below 1 MiB/s for 10 s
            "-w", "%{size_download} %{time_total} %{http_code}", f"http://127.0.0.1:{port}/bulk"]
        before = self.snapshot(srv)
        try:
            rc, out, err = run_capture(cmd, self.a.bulk_timeout + 30)
        except subprocess.TimeoutExpired:
            raise BenchError(f"curl did not finish: {' '.join(cmd)}")
        after = self.snapshot(srv)
        parts = out.split()
        if rc != 0 or len(parts) != 3 or parts[2] != "200" or int(parts[0]) != self.bulk_bytes:
            self.warn(f"{what}: bulk download failed (curl rc {rc}, '{out.strip()}', {err.strip()})")
            return None
        size, secs = int(parts[0]), float(parts[1])
        return {"bytes": size, "seconds": secs, "mib_s": size / secs / 2**20,
                "cpu": self.cpu_delta(before, after, what)}

    def idle_memory(self, target, n, tag):
        """Fresh target, baseline PSS, n idle connections end-to-end, PSS again."""
        srv, port = self.start_target(target, tag)
        try:
            # Settle: start-up work (config parsing, Harbor's strategy compile on a helper
            # thread) has finished and freed what it will free before the baseline is read.
            time.sleep(2.0)
            backend_ports = srv.ports if target == "direct" else self.backends.ports
            base_est = established_on(backend_ports)
            base_pss = tree_pss_kib(srv.pids())
            cmd = (["taskset", "-c", self.loadgen_cpus] if self.loadgen_cpus else []) + [
                sys.executable, os.path.join(HERE, "idle_conns.py"), "--port", str(port), "-n", str(n),
                "--settle", "1", "--hold-max", "120"]
            holder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                line = read_line(holder, 120)
                m = re.match(r"READY (\d+) (\d+) (\d+)", line or "")
                if not m:
                    raise BenchError(f"idle_conns.py did not get ready: {line!r}")
                opened, failed, dead = map(int, m.groups())
                # wait (bounded) until the backends see every connection
                deadline, est = time.monotonic() + 20, 0
                while time.monotonic() < deadline:
                    est = established_on(backend_ports) - base_est
                    if est >= opened:
                        break
                    time.sleep(0.2)
                time.sleep(0.5)
                pss = tree_pss_kib(srv.pids())
                alive = srv.alive()
            finally:
                try:
                    holder.stdin.write("close\n")
                    holder.stdin.close()
                except OSError:
                    pass
                try:
                    holder.wait(30)
                except subprocess.TimeoutExpired:
                    holder.kill()
                    holder.wait(5)
            if failed or dead or est < opened or not alive:
                self.warn(f"{tag} {target} @{n}: opened {opened}, failed {failed}, closed by proxy {dead}, "
                          f"established at backends {est}, proxy alive {alive}")
            # only connections that reached the backends count; a partial result is no result
            per_conn = (pss - base_pss) / opened if opened and est >= 0.98 * opened and not failed else None
            return {"n": n, "opened": opened, "failed": failed, "closed_by_peer": dead, "backend_established": est,
                    "pss_base_kib": base_pss, "pss_kib": pss, "kib_per_conn": per_conn}
        finally:
            self.stop_checked(target, srv, tag)

    def tls_round(self, rnd, tag, per):
        """New TLS connections through a fresh instance of each target, relaying to the
        backends' TLS ports: every connection opens with a real ClientHello."""
        servers = {}
        try:
            for t in rnd:
                if t in self.broken or t == "harbor-rr" or t == "harbor-accesslog":
                    continue
                try:
                    servers[t] = self.start_target(t, f"{tag}-tls", tls=True)
                except TargetBroken as e:
                    self.mark_broken(t, str(e))
            for t in servers:
                if self.a.warmup > 0:
                    self.wrk(*servers[t], self.a.warmup, True, f"{tag} {t} TLS warm-up", check_quiet=False,
                             scheme="https")
                log(f"  {t}: new TLS connections {self.a.duration}s")
                per[t]["tls"] = self.wrk(*servers[t], self.a.duration, True, f"{tag} {t} TLS new-connections",
                                         scheme="https")
                time.sleep(self.a.pause)
        finally:
            for t, (srv, _) in servers.items():
                if srv is not None:
                    self.stop_checked(t, srv, tag)

    def make_certificate(self):
        """A throwaway self-signed P-256 certificate for the backends' TLS ports."""
        cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
               "-days", "2", "-subj", "/CN=bench.harbor", "-keyout", os.path.join(self.data_dir, "key.pem"),
               "-out", os.path.join(self.data_dir, "cert.pem")]
        rc, out, err = run_capture(cmd, 30)
        if rc != 0:
            raise BenchError(f"openssl could not make a certificate: {err}")

    def mark_broken(self, target, why):
        self.broken[target] = why
        self.warn(f"{why}: {target} is skipped from now on")

    def stop_checked(self, target, srv, tag):
        rc = srv.stop()
        if target.startswith("harbor") and rc != 0:
            self.warn(f"{tag} harbor exited {rc} on SIGTERM (expected 0)")
        if target == "harbor-accesslog":
            for arg in srv.cmd:
                if arg.startswith("/dev/shm/harbor-bench-access-") and os.path.exists(arg):
                    os.unlink(arg)

    # ---- the run

    def run(self):
        self.setup()
        order = list(self.targets)
        for r in range(self.a.rounds):
            k = r % len(order)
            rnd = order[k:] + order[:k]
            tag = f"r{r + 1}"
            log(f"round {r + 1}/{self.a.rounds}, order: {', '.join(rnd)}")
            per = {t: {"round": r + 1} for t in rnd}
            # memory, each size on a fresh process
            for t in rnd:
                for n in ([] if t in THROUGHPUT_ONLY else self.idle_sizes):
                    if t in self.broken:
                        break
                    log(f"  {t}: {n} idle connections")
                    try:
                        per[t][f"idle_{n}"] = self.idle_memory(t, n, f"{tag}-mem{n}")
                    except TargetBroken as e:
                        self.mark_broken(t, str(e))
            # throughput, latency and CPU: one fresh process per target for the round
            servers = {}
            try:
                for t in rnd:
                    if t in self.broken:
                        continue
                    try:
                        servers[t] = (None, self.backends.ports[0]) if t == "direct" else \
                            self.start_target(t, f"{tag}-load")
                    except TargetBroken as e:
                        self.mark_broken(t, str(e))
                live = [t for t in rnd if t in servers]
                if self.a.warmup > 0:
                    for t in live:
                        self.wrk(*servers[t], self.a.warmup, False, f"{tag} {t} warm-up", check_quiet=False)
                for t in live:
                    log(f"  {t}: keep-alive {self.a.duration}s")
                    per[t]["keepalive"] = self.wrk(*servers[t], self.a.duration, False, f"{tag} {t} keep-alive")
                    time.sleep(self.a.pause)
                for t in live:
                    log(f"  {t}: new connections {self.a.duration}s")
                    per[t]["close"] = self.wrk(*servers[t], self.a.duration, True, f"{tag} {t} new-connections")
                    time.sleep(self.a.pause)
                self.touch_bulk_file()
                for t in (t for t in live if t not in THROUGHPUT_ONLY):
                    log(f"  {t}: bulk {self.a.bulk_mib} MiB")
                    per[t]["bulk"] = self.bulk(*servers[t], f"{tag} {t} bulk")
                    time.sleep(self.a.pause)
                for t in live:
                    srv = servers[t][0]
                    if srv is not None and not srv.alive():
                        self.warn(f"{tag} {t}: process died during the round\n{srv.tail()}")
            finally:
                for t, (srv, _) in servers.items():
                    if srv is not None:
                        self.stop_checked(t, srv, tag)
            if self.a.tls:
                self.tls_round(rnd, tag, per)
            for t in rnd:
                per[t]["metrics"] = round_metrics(per[t], self.idle_sizes, direct=(t == "direct"))
                self.results[t]["rounds"].append(per[t])
        for t in self.targets:
            summarize(self.results[t], self.idle_sizes)


def probe(port, timeout=5.0, tls=False):
    """One GET /1k through port (over TLS with tls) must answer 200 within timeout, or TargetBroken."""
    deadline = time.monotonic() + timeout
    try:
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=timeout))
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                s = stack.enter_context(context.wrap_socket(s, server_hostname="bench.harbor"))
            s.sendall(b"GET /1k HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 1024 and time.monotonic() < deadline:  # bounded by time
                s.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        raise TargetBroken(f"probe GET /1k failed: {e}") from None
    if not data.startswith(b"HTTP/1.1 200"):
        raise TargetBroken(f"probe GET /1k answered {data[:40]!r}")


def read_line(proc, timeout):
    """One line from proc.stdout within timeout seconds (None on EOF/timeout)."""
    import select
    poller = select.poll()
    poller.register(proc.stdout, select.POLLIN | select.POLLHUP)
    if poller.poll(timeout * 1000):
        return proc.stdout.readline().strip()
    return None


def cpu_set(spec):
    cpus = set()
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            cpus.update(range(int(a), int(b) + 1))
        elif part.strip():
            cpus.add(int(part))
    return cpus


def count_cpus(spec):
    return max(1, len(cpu_set(spec)))


def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def minmax(values, fn):
    vals = [v for v in values if v is not None]
    return fn(vals) if vals else None


def summarize(result, idle_sizes):
    """Adds the median, min and max over a target's rounds to its result."""
    rounds = [x["metrics"] for x in result["rounds"]]
    keys = [m[0] for m in METRICS + TLS_METRICS] + [f"kib_per_idle_conn_{n}" for n in idle_sizes]
    result["median"] = {k: median([x.get(k) for x in rounds]) for k in keys}
    result["min"] = {k: minmax([x.get(k) for x in rounds], min) for k in keys}
    result["max"] = {k: minmax([x.get(k) for x in rounds], max) for k in keys}


def saved_report(path):
    """The report of a saved run (latest-*.json or bench/reference/*.json), its metrics computed
    again from the raw measurements, so an old run gains the columns added since."""
    with open(path) as f:
        saved = json.load(f)
    meta = saved["meta"]
    bench = types.SimpleNamespace(targets=meta["targets"], results=saved["results"], broken={},
                                  idle_sizes=meta.get("idle_sizes", []), warnings=saved.get("warnings", []))
    for t in bench.targets:
        for rnd in bench.results[t]["rounds"]:
            rnd["metrics"] = round_metrics(rnd, bench.idle_sizes, direct=(t == "direct"))
        summarize(bench.results[t], bench.idle_sizes)
    return markdown(bench, meta)


def round_metrics(per, idle_sizes, direct):
    m = {}
    ka, cl, bk = per.get("keepalive"), per.get("close"), per.get("bulk")

    def cpu_of(res):
        # For "direct" there is no proxy: the CPU columns are the backend's own cost. A proxy's
        # cost includes the kernel worker threads' CPU (the kernel relay sends from them; for
        # the others it is close to 0).
        cpu = res["cpu"]
        return cpu["backend_cpu_s"] if direct else cpu["proxy_cpu_s"] + cpu.get("kworker_cpu_s", 0.0)

    def cpu_with_backend_of(res):
        return cpu_of(res) + (0.0 if direct else res["cpu"]["backend_cpu_s"])

    def us_per_request(cpu_s, res):
        return cpu_s * 1e6 / res["requests"] if res["requests"] else None
    if ka:
        m["ka_rps"] = ka["rps"]
        m["ka_p50_us"] = ka["p50_us"]
        m["ka_p99_us"] = ka["p99_us"]
        m["cpu_us_per_req"] = us_per_request(cpu_of(ka), ka)
        m["cpu_with_backend_us_per_req"] = us_per_request(cpu_with_backend_of(ka), ka)
    if cl:
        m["conn_rps"] = cl["rps"]
        m["cpu_us_per_conn"] = us_per_request(cpu_of(cl), cl)
        m["cpu_with_backend_us_per_conn"] = us_per_request(cpu_with_backend_of(cl), cl)
    tls = per.get("tls")
    if tls:
        m["tls_conn_rps"] = tls["rps"]
        m["cpu_us_per_tls_conn"] = us_per_request(cpu_of(tls), tls)
    if bk:
        m["bulk_mib_s"] = bk["mib_s"]
        m["cpu_ms_per_gib"] = cpu_of(bk) * 1e3 / (bk["bytes"] / 2**30)
    for n in idle_sizes:
        idle = per.get(f"idle_{n}")
        m[f"kib_per_idle_conn_{n}"] = idle["kib_per_conn"] if idle else None
    return m


# ---------------------------------------------------------------- reporting


def fmt(v, decimals):
    if v is None:
        return "—"
    if decimals == 0:
        return f"{v:,.0f}".replace(",", " ")
    return f"{v:.{decimals}f}"


def short_n(n):
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n / 1000:.1f}k"


def markdown(bench, meta):
    sizes = bench.idle_sizes
    cols = METRICS + (TLS_METRICS if meta.get("tls") else []) + [
        (f"kib_per_idle_conn_{n}", f"KiB/idle conn @{short_n(n)}", "lower", 1) for n in sizes]
    lines = [f"# Harbor side-by-side benchmark, {meta['mode']} — {meta['date']}", ""]
    lines.append(f"Commit `{meta['commit']}`; {meta['rounds']} round(s), {meta['duration_s']} s per wrk run, "
                 f"wrk -t1 -c{meta['connections']}, bulk {meta['bulk_mib']} MiB, medians over rounds. "
                 f"Load generator on CPU {meta['loadgen_cpus'] or 'any'}, proxies and backends on CPU "
                 f"{meta['server_cpus'] or 'any'}, each proxy (and the backend nginx) with "
                 f"{meta['server_threads']} thread(s)/worker(s) (HAProxy nbthread, nginx worker_processes"
                 f"{' + reuseport' if meta['server_threads'] > 1 else ''}, Harbor --workers); "
                 f"{meta['cpus']} CPUs, kernel {meta['kernel']}.")
    lines.append("")
    lines.append("| target | " + " | ".join(c[1] for c in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for t in bench.targets:
        med = bench.results[t]["median"]
        name = LABELS[t] + (" †" if t == "direct" else "")
        lines.append(f"| {name} | " + " | ".join(fmt(med.get(c[0]), c[3]) for c in cols) + " |")
    lines.append("")
    for t, why in bench.broken.items():
        lines.append(f"**{LABELS[t]} was not measured (or only partly)**: {why}")
        lines.append("")
    if "direct" in bench.targets:
        lines.append("† direct = wrk/curl straight to one backend, no proxy: the throughput ceiling. Its CPU and "
                     "memory columns are the backend nginx's own cost, so Harbor/direct for those reads as "
                     "\"proxy cost relative to the origin's cost\".")
        lines.append("")
    if "harbor" in bench.targets and len(bench.targets) > 1:
        lines.append("Ratios (Harbor ÷ other; for req/s, conn/s and MiB/s higher is better for Harbor, "
                     "for latency, CPU and memory lower is better):")
        lines.append("")
        lines.append("| ratio | " + " | ".join(c[1] for c in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        hb = bench.results["harbor"]["median"]
        for other in ["haproxy", "nginx", "direct", "harbor-rr", "harbor-accesslog", "harbor-peek"]:
            if other not in bench.targets:
                continue
            om = bench.results[other]["median"]
            cells = []
            for c in cols:
                a, b = hb.get(c[0]), om.get(c[0])
                cells.append(f"{a / b:.2f}" if a is not None and b else "—")
            lines.append(f"| Harbor / {LABELS[other]} | " + " | ".join(cells) + " |")
        lines.append("")
    def ratio_table(subject, title, label, others):
        if subject not in bench.targets or len(bench.targets) < 2:
            return
        lines.append(title)
        lines.append("")
        lines.append("| ratio | " + " | ".join(c[1] for c in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        sm = bench.results[subject]["median"]
        for other in others:
            if other not in bench.targets:
                continue
            om = bench.results[other]["median"]
            cells = [f"{sm[c[0]] / om[c[0]]:.2f}" if sm.get(c[0]) is not None and om.get(c[0]) else "—"
                     for c in cols]
            lines.append(f"| {label} / {LABELS[other]} | " + " | ".join(cells) + " |")
        lines.append("")

    ratio_table("harbor-kernel", "The kernel relay (Harbor with --relay kernel ÷ other):", "kernel relay",
                ["haproxy", "nginx", "harbor"])
    if "harbor-base" in bench.targets:
        ratio_table("harbor", "This revision against the base (Harbor ÷ Harbor at --harbor-base):", "Harbor",
                    ["harbor-base"])
    ratio_table("harbor-percore", "Per-core shards (Harbor with --runtime per-core --reuse-port ÷ other):",
                "per-core", ["haproxy", "nginx", "harbor", "harbor-shards"])
    if meta["rounds"] > 1:
        lines.append("Spread (min–max over rounds):")
        lines.append("")
        lines.append("| target | " + " | ".join(c[1] for c in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        for t in bench.targets:
            lo, hi = bench.results[t]["min"], bench.results[t]["max"]
            lines.append(f"| {LABELS[t]} | " + " | ".join(
                f"{fmt(lo.get(c[0]), c[3])}–{fmt(hi.get(c[0]), c[3])}" if lo.get(c[0]) is not None else "—"
                for c in cols) + " |")
        lines.append("")
    quiet = [x for t in bench.targets for r in bench.results[t]["rounds"]
             for k in ("keepalive", "close", "bulk") if r.get(k) for x in [r[k]["cpu"]["others_core_frac"]]]
    if quiet:
        lines.append(f"Other processes used at most {100 * max(quiet):.0f}% of a core during a measurement "
                     f"(median {100 * statistics.median(quiet):.0f}%; the warning threshold is "
                     f"{100 * meta['quiet_threshold']:.0f}%).")
        lines.append("")
    noisy = [w for w in bench.warnings if w.startswith("machine not quiet")]
    others = [w for w in bench.warnings if not w.startswith("machine not quiet")]
    if noisy or others:
        lines.append("**WARNINGS**:")
        lines.append("")
        if noisy:
            lines.append(f"- machine NOT QUIET during {len(noisy)} of {len(quiet)} measurements: other processes "
                         f"competed for the CPUs, so treat these figures as rough (details in latest.json)")
        for w in dedupe(others):
            lines.append(f"- {w.splitlines()[0]}")
        lines.append("")
    else:
        lines.append("No warnings: the machine was quiet and every measurement completed cleanly.")
        lines.append("")
    return "\n".join(lines)


def dedupe(items):
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def git_commit():
    try:
        rc, out, _ = run_capture(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], 10)
        commit = out.strip() if rc == 0 else "?"
        rc, out, _ = run_capture(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], 10)
        return commit + ("-dirty" if rc == 0 and out.strip() else "")
    except Exception:
        return "?"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench/run.sh", description="Harbor vs HAProxy vs nginx-stream, on loopback.")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help="comma-separated subset of direct,haproxy,nginx,harbor (default: all)")
    ap.add_argument("--rounds", type=int, help="rounds; medians are reported (default 3)")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 10)")
    ap.add_argument("--warmup", type=int, help="seconds of wrk warm-up per target and round (default 2)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--idle", default="1000,10000", help="idle-connection counts for memory (default 1000,10000)")
    ap.add_argument("--bulk-mib", type=int, default=1024, help="bulk file size in MiB (default 1024)")
    ap.add_argument("--bulk-timeout", type=int, default=120, help="seconds allowed per bulk download")
    ap.add_argument("--pause", type=float, help="seconds between measurements (default 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 round, 3 s runs, 1 s warm-up (explicit options still win)")
    ap.add_argument("--mode", choices=MODES, default="one-core",
                    help="one-core: load generator on CPU 0, proxies and backends on CPU 1 (default); "
                         "all-cores: proxies get every CPU but the load generator's (on 2 CPUs: nothing is "
                         "pinned and everyone shares both), with threads/workers to match")
    ap.add_argument("--tls", action="store_true",
                    help="add a phase of new TLS connections (wrk https://; the backend nginx terminates "
                         "TLS, proxies relay): prices `--peek tls` on real ClientHellos")
    ap.add_argument("--loadgen-cpus", help="taskset CPU list for wrk/curl/idle_conns (default: by --mode)")
    ap.add_argument("--server-cpus", help="taskset CPU list for proxies and backends (default: by --mode)")
    ap.add_argument("--quiet-threshold", type=float, default=0.10,
                    help="warn when others used more than this fraction of a core (default 0.10)")
    ap.add_argument("--harbor", default=os.path.join(REPO, "target", "release", "harbor"), help="Harbor binary")
    ap.add_argument("--strategy", default=os.path.join(REPO, "strategies", "least_conn.wasm"),
                    help="Harbor's strategy component (default strategies/least_conn.wasm)")
    ap.add_argument("--harbor-base", default=None,
                    help="the Harbor binary of an earlier revision, for the harbor-base target "
                         "(cargo xtask bench --compare REV builds it)")
    ap.add_argument("--harbor-max-connections", type=int, default=20000, help="Harbor --max-connections")
    ap.add_argument("--harbor-arg", action="append", default=[],
                    help="an extra Harbor flag, repeatable: --harbor-arg=--access-log=/tmp/a.log")
    ap.add_argument("--no-build", action="store_true",
                    help="run.sh: do not `cargo build --release -p harbor` (implied by --harbor)")
    ap.add_argument("--render", metavar="FILE.json",
                    help="print the report of a saved run, its metrics computed again (runs nothing)")
    ap.add_argument("--workdir", help=argparse.SUPPRESS)  # scratch directory, made by run.sh
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.render:
        return args
    if not args.workdir or not os.path.isdir(args.workdir):
        ap.error("--workdir DIR is required (bench/run.sh makes one)")
    defaults = dict(rounds=1, duration=3, warmup=1, pause=0.5) if args.quick else \
        dict(rounds=3, duration=10, warmup=2, pause=1.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    loadgen, server = mode_cpus(args.mode, os.cpu_count() or 1)
    if args.loadgen_cpus is None:
        args.loadgen_cpus = loadgen
    if args.server_cpus is None:
        args.server_cpus = server
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS + EXTRA_TARGETS]
    if bad or not args.targets:
        ap.error(f"unknown target(s) {bad}; choose from {ALL_TARGETS + EXTRA_TARGETS}")
    if "harbor-base" in args.targets and not (args.harbor_base and os.access(args.harbor_base, os.X_OK)):
        ap.error("the harbor-base target needs --harbor-base BINARY (cargo xtask bench --compare REV makes it)")
    args.idle = [int(x) for x in args.idle.split(",") if x.strip()]
    if args.rounds < 1 or args.duration < 1 or args.rounds > 50 or args.duration > 600:
        ap.error("--rounds must be 1..50 and --duration 1..600")
    return args


def main(argv):
    args = parse_args(argv)
    if args.render:
        print(saved_report(args.render))
        return 0
    def on_signal(signum, _frame):
        log(f"interrupted by signal {signum}: stopping everything")
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    Server.pidfile = os.path.join(args.workdir, "pids")
    # raise the descriptor limit as far as allowed; children inherit it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.loadgen_cpus and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, cpu_set(args.loadgen_cpus))  # keep the orchestration off the servers' CPU
    started = time.monotonic()
    bench = Bench(args)
    try:
        bench.run()
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        Server.stop_all()
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
        "connections": args.connections, "bulk_mib": args.bulk_mib, "idle_sizes": bench.idle_sizes,
        "targets": args.targets, "mode": args.mode, "tls": args.tls, "server_threads": bench.server_ncpus,
        "loadgen_cpus": bench.loadgen_cpus, "server_cpus": bench.server_cpus,
        "cpus": os.cpu_count(), "kernel": platform.release(), "nofile": bench.nofile,
        "quiet_threshold": args.quiet_threshold,
        "elapsed_s": round(time.monotonic() - started, 1),
        "versions": {
            "haproxy": tool_version(["haproxy", "-v"]), "nginx": tool_version(["nginx", "-v"]),
            "wrk": tool_version(["wrk", "--version"]), "curl": tool_version(["curl", "--version"]),
            "harbor": tool_version([args.harbor, "--version"]) if "harbor" in args.targets else None,
            "harbor_base": tool_version([args.harbor_base, "--version"]) if "harbor-base" in args.targets else None,
        },
        "harbor_args": getattr(bench, "harbor_extra", None),
    }
    md = markdown(bench, meta)
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"latest-{args.mode}"
    with open(os.path.join(args.results_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "results": bench.results, "warnings": bench.warnings}, f, indent=2)
    with open(os.path.join(args.results_dir, f"{name}.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    log(f"done in {meta['elapsed_s']:.0f} s; wrote {args.results_dir}/{name}.md and {name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
