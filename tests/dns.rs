//! DNS backends against a real DNS server: dnsmasq on loopback, started by the test, changes
//! its answer while clients keep going; Harbor follows within the refresh interval, keeps the
//! last good answer when the server dies, and reads SRV hosts, ports and weights.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use common::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// dnsmasq serving the names in `hosts` (and `srv` records) on 127.0.0.1:`port`, with a TTL
/// of 0. SIGHUP makes it read `hosts` again.
struct Dnsmasq {
    child: Child,
    port: u16,
}

/// A loopback port free for UDP and TCP both (dnsmasq takes the two), below the kernel's
/// ephemeral range: ports that tests and Harbor take for their own connections and `:0`
/// listeners come from that range, so none of them can take this one before dnsmasq binds it.
fn dns_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 21_000 { (20_000u32, u32::from(low) - 1) } else { (1025, 65535) };
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.subsec_nanos());
    (0..500u32)
        .map(|i| (from + (seed.wrapping_add(i.wrapping_mul(7919)) % (to - from))) as u16)
        .find(|p| {
            std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
        })
        .expect("a port free for UDP and TCP below the ephemeral range")
}

impl Dnsmasq {
    fn start(hosts: &Path, srv: &[&str]) -> Dnsmasq {
        Dnsmasq::start_on(dns_port(), hosts, srv)
    }

    fn start_on(port: u16, hosts: &Path, srv: &[&str]) -> Dnsmasq {
        let (binary, args) = dnsmasq_command(port, hosts, 0);
        let mut cmd = Command::new(binary);
        cmd.args(args).args(["--log-facility=-", "--log-queries"]);
        for record in srv {
            cmd.arg(format!("--srv-host={record}"));
        }
        let log = std::fs::File::create(hosts.with_extension("dnsmasq.log")).expect("dnsmasq log");
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("start dnsmasq");
        // Ready once it answers on TCP (it binds UDP first).
        let mut mine = Dnsmasq { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return mine;
            }
            if let Ok(Some(status)) = mine.child.try_wait() {
                let log = std::fs::read_to_string(hosts.with_extension("dnsmasq.log")).unwrap_or_default();
                panic!("dnsmasq on port {port} exited ({status}): {log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        mine.stop();
        panic!("dnsmasq did not answer on port {port} within 2 s");
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Makes dnsmasq read its hosts file again.
    fn reload(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An echo backend greeting with `name` on `ip:port`.
async fn echo_at(ip: &str, port: u16, name: &str) -> CancellationToken {
    let listener = TcpListener::bind(format!("{ip}:{port}")).await.expect("bind a loopback address");
    let stop = CancellationToken::new();
    tokio::spawn(harbor::echo::serve_echo(listener, Some(name.to_string()), stop.clone()));
    stop
}

/// A port free on 127.0.0.2 to 127.0.0.5.
fn port_free_on_four_addresses() -> u16 {
    for _ in 0..50 {
        let port = free_port();
        if (2..=5).all(|i| std::net::TcpListener::bind(format!("127.0.0.{i}:{port}")).is_ok()) {
            return port;
        }
    }
    panic!("no port free on 127.0.0.2-5");
}

fn backend_addrs(harbor: &harbor::RunningHarbor, service: &str) -> HashSet<String> {
    let service = harbor.control.service(service).unwrap();
    let pool = service.context.load().pool.load_full();
    pool.members().iter().filter(|m| !m.removing).map(|m| m.backend.address.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_backends_follow_a_real_dns_server_and_keep_the_last_answer_when_it_dies() {
    let dir = temp_dir("dns");
    let hosts: PathBuf = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.2 web.harbor.test\n127.0.0.3 web.harbor.test\n127.0.0.5 srv-target.harbor.test\n")
        .unwrap();
    let port = port_free_on_four_addresses();
    let _b2 = echo_at("127.0.0.2", port, "b2").await;
    let _b3 = echo_at("127.0.0.3", port, "b3").await;
    let _b4 = echo_at("127.0.0.4", port, "b4").await;
    let _b5 = echo_at("127.0.0.5", port, "b5").await;
    let srv = format!("_web._tcp.harbor.test,srv-target.harbor.test,{port},0,7");
    let mut dns = Dnsmasq::start(&hosts, &[srv.as_str()]);
    let refresh_ms = 200;
    let harbor = TestHarbor::new()
        .set("dns_servers", vec![dns.addr().to_string()])
        .service("web", |s| {
            let names = format!(r#"[{{ dns = "web.harbor.test:{port}", tags = ["eu-west", "canary"] }}]"#);
            s.set("dns_refresh_ms", refresh_ms as i64).set_toml("backends", &names)
        })
        .service("srv", |s| {
            s.set("dns_refresh_ms", refresh_ms as i64)
                .set_toml("backends", r#"[{ srv = "_web._tcp.harbor.test", tags = ["srv-pool"] }]"#)
        })
        .start()
        .await;
    let addr = harbor.addr_of("web").unwrap();
    let first: HashSet<String> = [format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}")].into();
    let resolved = eventually(Duration::from_secs(10), || backend_addrs(&harbor, "web") == first).await;
    assert!(
        resolved.is_some(),
        "the name's two A records became backends: {:?}; dnsmasq said: {}",
        backend_addrs(&harbor, "web"),
        std::fs::read_to_string(hosts.with_extension("dnsmasq.log")).unwrap_or_default()
    );
    let (_, list) = admin_get(harbor.admin_addr.unwrap(), "/services/web/backends").await;
    assert!(list.contains("\"source\": \"dns\""), "{list}");
    // Every address of the name carries the entry's tags, as strategies see them.
    let web_pool = harbor.control.service("web").unwrap().context.load().pool.load_full();
    for member in web_pool.members() {
        assert_eq!(&member.tags[..], ["eu-west", "canary"], "{list}");
    }

    // SRV: the target's address, at the record's port, with its weight.
    let srv_ok = eventually(Duration::from_secs(10), || !backend_addrs(&harbor, "srv").is_empty()).await;
    assert!(srv_ok.is_some(), "the SRV record became a backend");
    let srv_pool = harbor.control.service("srv").unwrap().context.load().pool.load_full();
    let member = &srv_pool.members()[0];
    assert_eq!((member.backend.address.to_string(), member.weight), (format!("127.0.0.5:{port}"), 7));
    assert_eq!(&member.tags[..], ["srv-pool"]);
    assert_eq!(echo_roundtrip(harbor.addr_of("srv").unwrap(), b"srv").await, "b5");

    // The answer changes while four clients keep going.
    let load = ClientLoad::start(addr, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&hosts, "127.0.0.3 web.harbor.test\n127.0.0.4 web.harbor.test\n127.0.0.5 srv-target.harbor.test\n")
        .unwrap();
    dns.reload();
    let changed_at = Instant::now();
    let second: HashSet<String> = [format!("127.0.0.3:{port}"), format!("127.0.0.4:{port}")].into();
    let followed = eventually(Duration::from_secs(10), || backend_addrs(&harbor, "web") == second).await;
    let membership_took = changed_at.elapsed();
    assert!(followed.is_some(), "Harbor followed the new answer: {:?}", backend_addrs(&harbor, "web"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let tally = load.stop().await;
    tally.assert_all_succeeded("while the DNS answer changes", 1);
    let first_b4 = tally.answers.iter().filter(|(n, _)| n == "b4").map(|(_, at)| *at).min();
    let traffic_took = first_b4.map(|at| at.saturating_duration_since(changed_at));
    assert!(traffic_took.is_some(), "the new backend got traffic");
    let late_b2 = tally
        .answers
        .iter()
        .filter(|(n, at)| n == "b2" && *at > changed_at + membership_took + Duration::from_millis(300))
        .count();
    assert_eq!(late_b2, 0, "the backend dropped from DNS got traffic after it left");
    // Margin for a loaded CI machine; measured 10-100 ms on a quiet one.
    let bound = Duration::from_millis(refresh_ms) + Duration::from_millis(3000);
    assert!(membership_took <= bound, "followed in {membership_took:?}, bound {bound:?}");
    println!(
        "DNS change to membership: {membership_took:?}; to the first connection on the new backend: {:?}; {} round trips, 0 failed",
        traffic_took.unwrap_or_default(),
        tally.ok
    );

    // The server dies: lookups fail, are counted, and the last good answer stays.
    dns.stop();
    let admin = harbor.admin_addr.unwrap();
    let failed =
        format!("harbor_dns_lookups_total{{service=\"web\",name=\"web.harbor.test:{port}\",outcome=\"failed\"}}");
    // A lookup gives up after the resolver's timeouts (1 s per server and query): poll for 20 s.
    let died_at = Instant::now();
    let mut counted = 0.0;
    while died_at.elapsed() < Duration::from_secs(20) && counted < 1.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        counted = Scrape::fetch(admin).await.try_get(&failed).unwrap_or(0.0);
    }
    assert!(counted >= 1.0, "a failed lookup is counted");
    println!("dead DNS server: first failed lookup counted after {:?}", died_at.elapsed());
    assert_eq!(backend_addrs(&harbor, "web"), second, "the last good answer is kept");
    let mut names = HashSet::new();
    for _ in 0..8 {
        names.insert(echo_roundtrip(addr, b"still").await);
    }
    assert_eq!(names, HashSet::from(["b3".to_string(), "b4".to_string()]));
    harbor.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// A DNS server that is down when Harbor starts: lookups fail (counted), and once it comes up
/// the name's records become backends without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_that_comes_up_late_is_followed_once_it_answers() {
    let dir = temp_dir("dns-late");
    let hosts: PathBuf = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.2 late.harbor.test\n").unwrap();
    let port = port_free_on_four_addresses();
    let _b2 = echo_at("127.0.0.2", port, "late").await;
    // Chosen now, served only later: below the ephemeral range, so no connection of the tests
    // running beside this one takes it meanwhile (one did, and dnsmasq could not bind).
    let dns_port = dns_port();
    let harbor = TestHarbor::new()
        .set("dns_servers", vec![format!("127.0.0.1:{dns_port}")])
        .service("web", |s| {
            s.set("dns_refresh_ms", 200).set_toml("backends", &format!(r#"[{{ dns = "late.harbor.test:{port}" }}]"#))
        })
        .start()
        .await;
    // Two failed lookups counted: the follower runs and has nothing to follow yet.
    let admin = harbor.admin_addr.unwrap();
    let mut failed = 0.0;
    for _ in 0..500 {
        failed = Scrape::fetch(admin).await.sum("harbor_dns_lookups_total");
        if failed >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failed >= 2.0, "no failed lookup counted while the server is down: {failed}");
    assert!(backend_addrs(&harbor, "web").is_empty());
    let _dns = Dnsmasq::start_on(dns_port, &hosts, &[]);
    let started = Instant::now();
    let want: HashSet<String> = [format!("127.0.0.2:{port}")].into();
    let found = eventually(Duration::from_secs(10), || backend_addrs(&harbor, "web") == want).await;
    assert!(found.is_some(), "the late server's answer was never used");
    println!("late DNS server: followed {:?} after it came up", started.elapsed());
    assert_eq!(echo_roundtrip(harbor.addr_of("web").unwrap(), b"late").await, "late");
    harbor.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
