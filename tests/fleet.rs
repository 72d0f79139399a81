//! N Harbors that share nothing and agree: real `harbor` processes on one address with
//! SO_REUSEPORT (one stops, no client is refused), and three "hosts" (network namespaces)
//! behind an ECMP route, where the `maglev` strategy sends each client to the same backend
//! whichever Harbor it lands on. Every namespace, link and address is made and removed by the
//! test itself.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::netns::Lab;
use common::{echo_backends, strategy, ClientLoad, Scrape, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

const HARBOR: &str = env!("CARGO_BIN_EXE_harbor");

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Connects until `addr` accepts, at most 10 s.
async fn wait_for_listener(addr: SocketAddr) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

/// Three Harbor processes bind one address with `--reuse-port`; clients keep connecting while
/// one of them stalls and is stopped. The kernel spreads clients over all three, then over the
/// two left, and not one connection is refused or reset: the stopping Harbor finishes what it
/// accepted, and what was queued on its socket moves to the others (`net.ipv4.tcp_migrate_req`,
/// set in this test's own namespace; `MIGRATE=0` shows what happens without it).
#[test]
fn harbors_sharing_a_port_lose_no_connection_when_one_stops() {
    let mut lab = Lab::new("rp");
    let ns = lab.namespace("a");
    lab.sysctl(&ns, "net.ipv4.tcp_migrate_req", &std::env::var("MIGRATE").unwrap_or("1".into()));
    let (backends, backend_addrs) = serve_in(&lab, &ns, |stop| async move {
        let (addrs, stops) = echo_backends(3).await;
        (addrs, async move {
            stop.cancelled().await;
            stops.iter().for_each(CancellationToken::cancel);
        })
    });
    let list = backend_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");

    let listen: SocketAddr = "127.0.0.1:7400".parse().unwrap();
    let admins: Vec<SocketAddr> = (0..3).map(|i| format!("127.0.0.1:{}", 7410 + i).parse().unwrap()).collect();
    let least_conn = strategy("least_conn").display().to_string();
    let pids: Vec<u32> = admins
        .iter()
        .map(|admin| {
            let argv = args(&["--listen", &listen.to_string(), "--reuse-port", "--backends", &list]);
            let more = args(&["--strategy", &least_conn, "--admin", &admin.to_string(), "--log-level", "warn"]);
            lab.spawn(&ns, HARBOR, &[argv, more].concat())
        })
        .collect();

    let (phase_one, first_phase) = std::sync::mpsc::channel::<Vec<f64>>();
    let (stopped, first_stopped) = std::sync::mpsc::channel::<()>();
    let client = lab.spawn_in(&ns, move || async move {
        for admin in &admins {
            wait_for_listener(*admin).await;
        }
        let load = ClientLoad::start(listen, 32);
        // Phase 1: all three serve, until each has taken a share.
        let mut before = accepts_of(&admins).await;
        for _ in 0..500 {
            if before.iter().all(|n| *n >= 60.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            before = accepts_of(&admins).await;
        }
        phase_one.send(before).expect("phase 1 over");
        // Phase 2: the test thread stops the first while the load goes on.
        tokio::task::spawn_blocking(move || first_stopped.recv_timeout(Duration::from_secs(30)))
            .await
            .expect("join")
            .expect("the first harbor was stopped");
        let survivors = &admins[1..];
        let at_stop = accepts_of(survivors).await;
        let gained = |now: &[f64]| now.iter().zip(&at_stop).map(|(n, t)| n - t).collect::<Vec<_>>();
        let mut after = gained(&at_stop);
        for _ in 0..500 {
            if after.iter().all(|n| *n >= 150.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = gained(&accepts_of(survivors).await);
        }
        (load.stop().await, after)
    });
    let before = first_phase.recv_timeout(Duration::from_secs(60)).expect("phase 1 in time");
    // The first Harbor stalls (SIGSTOP) while clients go on connecting, so the kernel queues
    // a third of them on its socket; then it is told to stop (SIGTERM) and let run again. It
    // stops accepting, drains what it has, and exits 0; the queued clients move to the others.
    lab.signal(pids[0], libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    lab.signal(pids[0], libc::SIGTERM);
    lab.signal(pids[0], libc::SIGCONT);
    let exited = lab.wait_exit(pids[0], Duration::from_secs(15));
    stopped.send(()).expect("tell the clients");
    let (tally, gained) = client.join().expect("client thread");
    backends.cancel();
    let failed = tally.failures.len();
    eprintln!(
        "reuse-port: accepts per harbor before the stop {before:?}; the two left then gained {gained:?}; {} round trips, {failed} failed",
        tally.ok + failed as u64
    );
    for failure in tally.failures.iter().take(5) {
        eprintln!("reuse-port: failure: {failure}");
    }
    assert!(exited, "the stopped harbor exits 0 after its drain");
    assert!(before.iter().all(|n| *n >= 60.0), "each of the three takes a share: {before:?}");
    assert!(gained.iter().all(|n| *n >= 150.0), "the two left take the stopped one's share: {gained:?}");
    assert_eq!(failed, 0, "connections refused or cut: {:?}", &tally.failures[..failed.min(5)]);
}

/// `harbor_accepts_total` of the default service, per admin address.
async fn accepts_of(admins: &[SocketAddr]) -> Vec<f64> {
    let mut all = Vec::new();
    for admin in admins {
        all.push(Scrape::fetch(*admin).await.get("harbor_accepts_total{service=\"default\"}"));
    }
    all
}

/// Starts servers inside `ns` on a thread of their own: `start` gets a stop token and returns
/// what the test needs (addresses) and a future that serves until the token is cancelled.
fn serve_in<T, S, F>(
    lab: &Lab,
    ns: &str,
    start: impl FnOnce(CancellationToken) -> S + Send + 'static,
) -> (StopOnDrop, T)
where
    T: Send + 'static,
    S: std::future::Future<Output = (T, F)>,
    F: std::future::Future<Output = ()>,
{
    let stop = CancellationToken::new();
    let (ready, started) = std::sync::mpsc::channel();
    let token = stop.clone();
    let thread = lab.spawn_in(ns, move || async move {
        let (value, serve) = start(token).await;
        ready.send(value).expect("send what the servers give");
        serve.await;
    });
    let value = started.recv_timeout(STEP).expect("servers up in the namespace");
    (StopOnDrop { stop, thread: Some(thread) }, value)
}

/// Stops servers started by [`serve_in`] (and waits for their thread) when dropped.
struct StopOnDrop {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopOnDrop {
    fn cancel(mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Backends inside the backends' namespace: each greets with `<name> via <the address that
/// reached it>\n` (so a client learns which Harbor carried it), then echoes until EOF.
async fn naming_backends(addrs: Vec<SocketAddr>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (i, addr) in addrs.into_iter().enumerate() {
        let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind backend {addr}: {e}"));
        tasks.push(tokio::spawn(async move {
            while let Ok((mut stream, peer)) = listener.accept().await {
                tokio::spawn(async move {
                    let greeting = format!("b{i} via {}\n", peer.ip());
                    if stream.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        }));
    }
    tasks
}

/// One echo round trip to `target` from source address `from`: (backend name, address of the
/// Harbor that reached it), or what went wrong.
async fn round_trip_from(from: std::net::IpAddr, target: SocketAddr) -> Result<(String, String), String> {
    let run = async {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket.bind(SocketAddr::new(from, 0)).map_err(|e| format!("bind {from}: {e}"))?;
        let mut stream = socket.connect(target).await.map_err(|e| format!("connect from {from}: {e}"))?;
        let payload = format!("hello from {from}");
        stream.write_all(payload.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        stream.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut all = String::new();
        stream.read_to_string(&mut all).await.map_err(|e| format!("read: {e}"))?;
        let (greeting, echoed) = all.split_once('\n').ok_or(format!("no greeting in {all:?}"))?;
        if echoed != payload {
            return Err(format!("echo differs: {echoed:?}"));
        }
        let (backend, via) = greeting.split_once(" via ").ok_or(format!("bad greeting {greeting:?}"))?;
        Ok((backend.to_string(), via.to_string()))
    };
    tokio::time::timeout(STEP, run).await.map_err(|_| format!("from {from}: timed out"))?
}

/// `rounds` round trips from each source, all sources at once: per source, its answers.
async fn from_every_source(
    sources: &[std::net::IpAddr],
    target: SocketAddr,
    rounds: usize,
) -> BTreeMap<std::net::IpAddr, Vec<Result<(String, String), String>>> {
    let mut tasks = tokio::task::JoinSet::new();
    for source in sources.iter().copied() {
        tasks.spawn(async move {
            let mut answers = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                answers.push(round_trip_from(source, target).await);
            }
            (source, answers)
        });
    }
    let mut all = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (source, answers) = joined.expect("client task");
        all.insert(source, answers);
    }
    all
}

/// Three "hosts" (namespaces h1..h3), each with a Harbor on the same virtual address with the
/// same four backends and `maglev`, behind an ECMP route in the client's namespace that hashes
/// each flow (addresses and ports) onto one of them; the backends live in a fifth namespace.
/// 200 client addresses connect 6 times each: every client lands on several Harbors, and
/// always on the same backend. Then host h2 goes down (link down, Harbor killed): new
/// connections all succeed through h1 and h3, still each client on its backend.
#[test]
fn harbors_behind_ecmp_send_each_client_to_the_same_backend() {
    let mut lab = Lab::new("ec");
    let client = lab.namespace("c");
    let backends_ns = lab.namespace("b");
    let hosts: Vec<String> = (1..=3).map(|i| lab.namespace(&format!("h{i}"))).collect();
    for ns in [&client, &backends_ns].into_iter().chain(&hosts) {
        lab.sysctl(ns, "net.ipv4.conf.all.rp_filter", "0");
        lab.sysctl(ns, "net.ipv4.conf.default.rp_filter", "0");
    }
    // The client's router: hash on the 5-tuple, and stop using a next hop whose link is down.
    lab.sysctl(&client, "net.ipv4.fib_multipath_hash_policy", "1");
    lab.sysctl(&client, "net.ipv4.conf.all.ignore_routes_with_linkdown", "1");
    let vip: SocketAddr = "10.80.0.1:80".parse().unwrap();
    let backend_addrs: Vec<SocketAddr> = (1..=4).map(|k| format!("10.79.0.{k}:9000").parse().unwrap()).collect();
    for k in 1..=4 {
        lab.ip(&backends_ns, &["addr", "add", &format!("10.79.0.{k}/32"), "dev", "lo"]);
    }
    let mut nexthops = vec!["route add 10.80.0.1/32".to_string()];
    for (i, host) in hosts.iter().enumerate().map(|(i, h)| (i + 1, h)) {
        let (c_end, b_end) = (format!("c{i}"), format!("h{i}"));
        lab.veth((&client, &c_end, &format!("10.77.{i}.1/24")), (host, "front", &format!("10.77.{i}.2/24")));
        lab.veth((host, "back", &format!("10.78.{i}.2/24")), (&backends_ns, &b_end, &format!("10.78.{i}.1/24")));
        lab.ip(host, &["addr", "add", "10.80.0.1/32", "dev", "lo"]);
        lab.ip(host, &["route", "add", "10.79.0.0/24", "via", &format!("10.78.{i}.1")]);
        lab.ip(host, &["route", "add", "10.90.0.0/16", "via", &format!("10.77.{i}.1")]);
        nexthops[0].push_str(&format!(" nexthop via 10.77.{i}.2 dev {c_end}"));
    }
    lab.ip_batch(&client, &nexthops);
    let sources: Vec<std::net::IpAddr> =
        (0..200).map(|n| format!("10.90.{}.{}", n / 250, n % 250 + 1).parse().unwrap()).collect();
    let adds: Vec<String> = sources.iter().map(|s| format!("addr add {s}/32 dev lo")).collect();
    lab.ip_batch(&client, &adds);

    let (backends, _) = serve_in(&lab, &backends_ns, move |stop| async move {
        let tasks = naming_backends(backend_addrs.clone()).await;
        ((), async move {
            stop.cancelled().await;
            tasks.iter().for_each(tokio::task::JoinHandle::abort);
        })
    });
    let list = (1..=4).map(|k| format!("10.79.0.{k}:9000")).collect::<Vec<_>>().join(",");
    let maglev = strategy("maglev").display().to_string();
    let pids: Vec<u32> = hosts
        .iter()
        .map(|host| {
            let argv = args(&["--listen", &vip.to_string(), "--backends", &list, "--strategy", &maglev]);
            lab.spawn(host, HARBOR, &[argv, args(&["--log-level", "warn"])].concat())
        })
        .collect();
    for host in &hosts {
        lab.run_in(host, move || wait_for_listener(vip));
    }

    // Which Harbor carried a connection: the address it reached the backend from.
    let harbor_of = |via: &str| -> usize {
        (1..=3).find(|i| via == format!("10.78.{i}.2")).unwrap_or_else(|| panic!("unknown harbor address {via}"))
    };
    let srcs = sources.clone();
    let before = lab.run_in(&client, move || async move { from_every_source(&srcs, vip, 6).await });
    let mut backend_of = BTreeMap::new();
    let mut per_harbor = [0usize; 3];
    let mut on_several = 0;
    for (source, answers) in &before {
        let mut seen_backends = BTreeSet::new();
        let mut seen_harbors = BTreeSet::new();
        for answer in answers {
            let (backend, via) = answer.as_ref().unwrap_or_else(|e| panic!("from {source}: {e}"));
            seen_backends.insert(backend.clone());
            let harbor = harbor_of(via);
            seen_harbors.insert(harbor);
            per_harbor[harbor - 1] += 1;
        }
        assert_eq!(
            seen_backends.len(),
            1,
            "{source} reached {seen_backends:?} through harbors {seen_harbors:?}: {answers:?}"
        );
        on_several += usize::from(seen_harbors.len() >= 2);
        backend_of.insert(*source, seen_backends.into_iter().next().unwrap_or_default());
    }
    let spread: BTreeSet<&String> = backend_of.values().collect();
    eprintln!("ecmp: connections per harbor {per_harbor:?}; {on_several} of 200 clients crossed several harbors, each kept one backend; backends used {spread:?}");
    assert!(on_several >= 180, "ECMP spreads each client's connections: only {on_several} of 200 crossed harbors");
    assert!(per_harbor.iter().all(|n| *n >= 200), "every harbor carries a share: {per_harbor:?}");
    assert_eq!(spread.len(), 4, "maglev uses every backend");

    // Host h2 goes down: its link, then its Harbor.
    lab.ip(&hosts[1], &["link", "set", "dev", "front", "down"]);
    lab.signal(pids[1], libc::SIGKILL);
    assert!(!lab.wait_exit(pids[1], STEP), "a killed harbor does not exit 0");
    let srcs = sources.clone();
    let after = lab.run_in(&client, move || async move { from_every_source(&srcs, vip, 3).await });
    let mut per_harbor_after = [0usize; 3];
    for (source, answers) in &after {
        for answer in answers {
            let (backend, via) = answer.as_ref().unwrap_or_else(|e| panic!("from {source} with h2 down: {e}"));
            per_harbor_after[harbor_of(via) - 1] += 1;
            assert_eq!(Some(backend), backend_of.get(source), "{source} moved backend when h2 went down");
        }
    }
    eprintln!("ecmp: with h2 down, 600 of 600 new connections succeeded, per harbor {per_harbor_after:?}, each client on its backend");
    assert_eq!(per_harbor_after[1], 0, "nothing goes through the host that is down");
    backends.cancel();
}

/// The `harbor.toml` embedded in the Kubernetes example's ConfigMap, with the image's paths
/// (strategies, token, cache) replaced by this checkout's.
fn kubernetes_example_config(token: &std::path::Path, cache: &std::path::Path) -> (String, String) {
    let manifest_path = common::workspace_root().join("deploy/kubernetes/harbor.yaml");
    let manifest = std::fs::read_to_string(&manifest_path).expect("read deploy/kubernetes/harbor.yaml");
    let mut lines = manifest.lines().skip_while(|l| l.trim() != "harbor.toml: |").skip(1);
    let mut toml = String::new();
    for line in lines.by_ref() {
        match line.strip_prefix("    ") {
            Some(body) => toml.push_str(body),
            None if line.trim().is_empty() => {}
            None => break,
        }
        toml.push('\n');
    }
    assert!(toml.contains("[[service]]"), "no harbor.toml in the ConfigMap of {}", manifest_path.display());
    let strategies = common::workspace_root().join("strategies");
    let toml = toml
        .replace("/usr/share/harbor/strategies", &strategies.display().to_string())
        .replace("/etc/harbor/token/token", &token.display().to_string())
        .replace("/var/cache/harbor", &cache.display().to_string());
    (manifest, toml)
}

/// The Kubernetes example's own configuration, run as a pod would run it: in a namespace whose
/// `resolv.conf` names a real DNS server (dnsmasq) that answers the headless Service's name
/// with three backend addresses, in a second namespace (the backends' pods). Harbor resolves them, health-checks them, answers the
/// probes the Deployment declares, and places clients with `maglev`, each client address on
/// one backend.
#[test]
fn the_kubernetes_example_serves_backends_found_through_dns() {
    let mut lab = Lab::new("k8");
    let pod = lab.namespace("p");
    let dir = common::temp_dir("k8s-example");
    let token = dir.join("token");
    std::fs::write(&token, "an-admin-token-of-32-characters!\n").expect("write token");
    let (manifest, toml) = kubernetes_example_config(&token, &dir.join("cache"));
    for probe in ["path: /readyz", "path: /healthz", "port: admin", "containerPort: 9100", "containerPort: 8080"] {
        assert!(manifest.contains(probe), "the Deployment declares {probe}");
    }
    assert!(toml.contains("admin = \"0.0.0.0:9100\"") && toml.contains("listen = \"0.0.0.0:8080\""));
    let config = dir.join("harbor.toml");
    std::fs::write(&config, &toml).expect("write harbor.toml");

    // The backends' pods: a namespace of their own, one address each, routed from Harbor's.
    let backend_pods = lab.namespace("b");
    lab.veth((&pod, "eth0", "10.61.0.1/24"), (&backend_pods, "eth0", "10.61.0.2/24"));
    lab.ip(&pod, &["route", "add", "10.60.0.0/24", "via", "10.61.0.2"]);
    let backend_ips = ["10.60.0.11", "10.60.0.12", "10.60.0.13"];
    for ip in backend_ips {
        lab.ip(&backend_pods, &["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    let hosts = dir.join("hosts");
    let name = "web-backends.default.svc.cluster.local";
    std::fs::write(&hosts, backend_ips.iter().map(|ip| format!("{ip} {name}\n")).collect::<String>()).expect("hosts");
    let (dnsmasq, dns_args) = common::dnsmasq_command(53, &hosts, 1);
    lab.spawn(&pod, dnsmasq, &dns_args);
    lab.resolv_conf(
        &pod,
        "nameserver 127.0.0.1\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
    );
    let addrs: Vec<SocketAddr> = backend_ips.iter().map(|ip| format!("{ip}:8080").parse().unwrap()).collect();
    let (backends, _) = serve_in(&lab, &backend_pods, move |stop| async move {
        let tasks = naming_backends(addrs).await;
        ((), async move {
            stop.cancelled().await;
            tasks.iter().for_each(tokio::task::JoinHandle::abort);
        })
    });
    lab.spawn(&pod, HARBOR, &args(&["--config", &config.display().to_string()]));

    let (ready, backends_seen, answers) = lab.run_in(&pod, || async {
        let admin: SocketAddr = "127.0.0.1:9100".parse().unwrap();
        wait_for_listener(admin).await;
        // Ready once the name is resolved and a backend passed its health check.
        let mut ready = 0;
        for _ in 0..500 {
            ready = common::admin_get(admin, "/readyz").await.0;
            if ready == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every backend from DNS, and healthy (until then, maglev rightly moves the clients
        // of a backend not yet checked to another).
        let mut seen = Vec::new();
        for _ in 0..500 {
            let (_, body) = common::admin_get(admin, "/services/web/backends").await;
            let list: serde_json::Value = serde_json::from_str(&body).expect("backends JSON");
            seen = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| format!("{} {} {}", b["address"], b["source"], b["state"]).replace('"', ""))
                .collect();
            seen.sort();
            if seen.len() == 3 && seen.iter().all(|b| b.ends_with(" healthy")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let target: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mut answers = BTreeMap::new();
        for client in 1..=20u8 {
            for _ in 0..3 {
                let from = std::net::IpAddr::from([127, 0, 1, client]);
                let answer = round_trip_from(from, target).await.map(|(backend, _)| backend);
                answers.entry(from).or_insert_with(Vec::new).push(answer);
            }
        }
        (ready, seen, answers)
    });
    backends.cancel();
    assert_eq!(ready, 200, "GET /readyz once the DNS backends are up");
    let want = ["10.60.0.11:8080 dns healthy", "10.60.0.12:8080 dns healthy", "10.60.0.13:8080 dns healthy"];
    assert_eq!(backends_seen, want, "the pool is the DNS answer, health-checked");
    let mut used = BTreeSet::new();
    for (client, answers) in &answers {
        let distinct: BTreeSet<&String> =
            answers.iter().map(|a| a.as_ref().unwrap_or_else(|e| panic!("from {client}: {e}"))).collect();
        assert_eq!(distinct.len(), 1, "maglev keeps {client} on one backend: {answers:?}");
        used.extend(distinct);
    }
    eprintln!("kubernetes example: ready, pool {backends_seen:?} from DNS, 60 round trips from 20 clients on backends {used:?}");
    assert!(used.len() >= 2, "clients spread over the backends: {used:?}");
}
