#!/usr/bin/env python3
"""The database trial of issue 29, repeatable: Harbor and HAProxy side by side in front of
real databases, with their default settings.

1. Redis: `redis-benchmark -q -n 200000 -c 50 -t set,get` through each proxy while the proxy
   is upgraded in place (Harbor: SIGUSR2; HAProxy: a master-worker reload), alternating
   Harbor and HAProxy 3 times. Reports requests/s (medians) and errors.
2. PostgreSQL: a primary and a streaming standby behind Harbor with the `pgsql` primary check;
   `pgbench` runs through Harbor while the primary is stopped and the standby promoted.
   Reports the seconds until transactions succeed again and the failed transactions.

Usage: python3 bench/databases.py [--harbor target/release/harbor] [--rounds 3]
Needs redis-server, redis-tools, haproxy and postgresql (Debian), run as root (PostgreSQL runs
as the `postgres` account). Everything listens on 127.0.0.1 and is stopped at the end.
"""

import argparse
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def read_pid(path, old=None, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            pid = int(open(path).read().strip())
            if pid != old:
                return pid
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{path} names no new process")


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def redis_round(proxy, listen, upgrade):
    """One redis-benchmark run through `listen`, upgrading the proxy 1 s in."""
    bench = subprocess.Popen(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(listen), "-q", "-n", "200000", "-c", "50", "-t", "set,get"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    upgrade()
    out, _ = bench.communicate(timeout=600)
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(r"(SET|GET): ([0-9.]+) requests per second", out)}
    errors = len(re.findall(r"(?i)error|reset|refused", out))
    return rates, errors, bench.returncode


def trial_redis(args, work, procs):
    redis_port = free_port()
    procs.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL)
    wait_port(redis_port)

    # Harbor, defaults only.
    h_listen, h_admin = free_port(), free_port()
    pidfile = os.path.join(work, "harbor.pid")
    conf = os.path.join(work, "harbor.toml")
    with open(conf, "w") as f:
        f.write(f'admin = "127.0.0.1:{h_admin}"\npidfile = "{pidfile}"\n\n[[service]]\nname = "redis"\n'
                f'listen = "127.0.0.1:{h_listen}"\nbackends = ["127.0.0.1:{redis_port}"]\n')
    procs.start([args.harbor, "--config", conf, "--log-level", "warn"], stdout=subprocess.DEVNULL)
    wait_port(h_listen)

    def upgrade_harbor():
        pid = read_pid(pidfile)
        os.kill(pid, signal.SIGUSR2)
        read_pid(pidfile, old=pid)

    # HAProxy, master-worker, defaults but for timeouts every config needs.
    x_listen = free_port()
    hconf = os.path.join(work, "haproxy.cfg")
    with open(hconf, "w") as f:
        f.write("global\n  master-worker\n  maxconn 4096\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
                f"frontend fe\n  bind 127.0.0.1:{x_listen}\n  default_backend be\n"
                f"backend be\n  server r1 127.0.0.1:{redis_port}\n")
    master = procs.start(["haproxy", "-W", "-f", hconf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(x_listen)

    def upgrade_haproxy():
        master.send_signal(signal.SIGUSR2)  # master-worker reload: new workers, old ones drain
        time.sleep(0.5)

    results = {"harbor": [], "haproxy": []}
    for _ in range(args.rounds):
        for name, port, upgrade in (("harbor", h_listen, upgrade_harbor), ("haproxy", x_listen, upgrade_haproxy)):
            results[name].append(redis_round(name, port, upgrade))
    print("## Redis: redis-benchmark -q -n 200000 -c 50 -t set,get, one in-place upgrade during each run")
    print(f"{args.rounds} alternations, medians\n")
    print("| proxy | SET req/s | GET req/s | error lines | runs that failed |")
    print("|---|---|---|---|---|")
    for name in ("harbor", "haproxy"):
        runs = results[name]
        sets = [r[0].get("SET", 0.0) for r in runs]
        gets = [r[0].get("GET", 0.0) for r in runs]
        print(f"| {name} | {statistics.median(sets):.0f} | {statistics.median(gets):.0f} | "
              f"{sum(r[1] for r in runs)} | {sum(1 for r in runs if r[2] != 0)} |")
    h = statistics.median([r[0].get("GET", 0.0) for r in results["harbor"]])
    x = statistics.median([r[0].get("GET", 0.0) for r in results["haproxy"]])
    print(f"\nHarbor / HAProxy, GET: {h / x:.2f}" if x else "")


def pg_bin(program):
    versions = sorted(int(v) for v in os.listdir("/usr/lib/postgresql") if v.isdigit())
    return f"/usr/lib/postgresql/{versions[-1]}/bin/{program}"


def as_postgres():
    account = pwd.getpwnam("postgres")

    def demote():
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)
    return demote


def trial_pgsql(args, work, procs):
    account = pwd.getpwnam("postgres")
    base = tempfile.mkdtemp(prefix="pg-", dir=work)
    os.chown(base, account.pw_uid, account.pw_gid)
    primary, standby = os.path.join(base, "primary"), os.path.join(base, "standby")
    subprocess.run([pg_bin("initdb"), "--auth=trust", "-U", "postgres", "--no-sync", "-D", primary],
                   preexec_fn=as_postgres(), check=True, stdout=subprocess.DEVNULL)
    p_port, s_port = free_port(), free_port()

    def start(data, port):
        return procs.start([pg_bin("postgres"), "-D", data, "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                            "-c", f"unix_socket_directories={base}", "-c", "fsync=off"],
                           preexec_fn=as_postgres(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p_proc = start(primary, p_port)
    wait_port(p_port)
    subprocess.run([pg_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(p_port), "-U", "postgres", "-X", "stream",
                    "-R", "--no-sync", "-D", standby], preexec_fn=as_postgres(), check=True)
    start(standby, s_port)
    wait_port(s_port)

    listen, admin = free_port(), free_port()
    conf = os.path.join(work, "harbor-pg.toml")
    with open(conf, "w") as f:
        f.write(f'admin = "127.0.0.1:{admin}"\n\n[[service]]\nname = "pg"\nlisten = "127.0.0.1:{listen}"\n'
                f'backends = [{{ address = "127.0.0.1:{p_port}", name = "pg-a" }}, '
                f'{{ address = "127.0.0.1:{s_port}", name = "pg-b" }}]\n'
                'health = { kind = "pgsql", role = "primary", interval_ms = 500, rise = 1, fall = 1 }\n')
    procs.start([args.harbor, "--config", conf, "--log-level", "warn"], stdout=subprocess.DEVNULL)
    wait_port(listen)
    time.sleep(1.5)
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(listen), PGUSER="postgres", PGDATABASE="postgres")
    subprocess.run(["pgbench", "-i", "-q", "-s", "2"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # the standby has the tables too
    # pgbench reconnects for every transaction (-C), so each one is placed anew; it goes on
    # through errors and reports them per second.
    bench = subprocess.Popen(["pgbench", "-C", "-c", "4", "-T", "20", "-P", "1", "--max-tries", "1",
                              "--failures-detailed"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(5)
    stopped = time.time()
    p_proc.send_signal(signal.SIGINT)  # fast shutdown of the primary
    p_proc.wait(timeout=30)
    subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(s_port), "-U", "postgres", "-Atc", "SELECT pg_promote()"],
                   check=True, stdout=subprocess.DEVNULL)
    promoted = time.time()
    # When does a write through Harbor work again?
    follows = None
    while time.time() - stopped < 30:
        r = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(listen), "-U", "postgres", "-Atc",
                            "CREATE TABLE IF NOT EXISTS failover_probe (x int); INSERT INTO failover_probe VALUES (1)"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            follows = time.time()
            break
        time.sleep(0.05)
    out, _ = bench.communicate(timeout=120)
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    aborted = len(re.findall(r"aborted", out))
    print("\n## PostgreSQL: primary stopped, standby promoted, pgbench -C -c 4 through Harbor (pgsql primary check, 500 ms)")
    print(f"- promotion took {promoted - stopped:.2f} s after the primary stopped;")
    print(f"- writes through Harbor worked again {follows - stopped:.2f} s after the primary stopped "
          f"({follows - promoted:.2f} s after the promotion);" if follows else "- writes never came back within 30 s;")
    print(f"- pgbench: {processed.group(1) if processed else '?'} transactions, "
          f"{failed.group(1) if failed else '?'} failed, {aborted} lines about aborted clients "
          "(pgbench ends a client whose connection fails: the ones that connected while no primary was up).")
    print("\n```\n" + "\n".join(l for l in out.splitlines() if not l.startswith("progress")) + "\n```")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--harbor", default="target/release/harbor")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", default="", help="redis or pgsql")
    args = parser.parse_args()
    for tool in ("redis-server", "redis-benchmark", "haproxy", "pgbench", "psql"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing")
    work = tempfile.mkdtemp(prefix="harbor-db-trial-")
    os.chmod(work, 0o755)
    procs = Procs()
    try:
        if args.skip != "redis":
            trial_redis(args, work, procs)
        if args.skip != "pgsql":
            trial_pgsql(args, work, procs)
    finally:
        procs.stop()
        # Old Harbor processes that served the benchmark's connections exit once they end.
        subprocess.run(["pkill", "-f", os.path.join(work, "harbor")], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
