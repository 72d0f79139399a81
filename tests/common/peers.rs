//! Real databases as backends: Redis (a primary and its replicas), PostgreSQL (a primary
//! and a streaming standby) and MariaDB, each on 127.0.0.1 in a directory of the test's own,
//! stopped when dropped. `cargo xtask test` installs them (Debian's redis-server,
//! redis-tools, postgresql, mariadb-server and mariadb-client).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::{free_port, temp_dir};

/// How long a database has to start, a standby to copy its primary, a promotion to end.
const START: Duration = Duration::from_secs(60);

fn require(path: &str, package: &str) {
    assert!(Path::new(path).exists(), "{path} is missing: `cargo xtask test` installs it (Debian package {package})");
}

fn output(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// Stops a server process when dropped (its stop signal, then SIGKILL after 5 s).
struct Server(Child, libc::c_int);

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill sends a signal; nothing else is touched.
        unsafe { libc::kill(self.0.id() as i32, self.1) };
        for _ in 0..250 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One redis-server, with no persistence (or a client's view of an address that leads to one).
pub struct Redis {
    pub addr: SocketAddr,
    server: Option<Server>,
    dir: PathBuf,
}

impl Redis {
    /// Only a client of whatever answers at `addr` (Harbor, say): `cli` works, nothing is
    /// started or stopped.
    pub fn at(addr: SocketAddr) -> Redis {
        Redis { addr, server: None, dir: PathBuf::new() }
    }

    /// A primary.
    pub async fn primary() -> Redis {
        Redis::start(None).await
    }

    /// A replica of `primary`, once it has synced.
    pub async fn replica_of(primary: &Redis) -> Redis {
        let replica = Redis::start(Some(primary.addr)).await;
        let deadline = Instant::now() + START;
        while !replica.cli(&["INFO", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica did not sync with {}", primary.addr);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        replica
    }

    async fn start(replica_of: Option<SocketAddr>) -> Redis {
        require("/usr/bin/redis-server", "redis-server");
        let dir = temp_dir("redis");
        // redis-server cannot listen on port 0: a free port, again if another process took it.
        for _ in 0..5 {
            let port = free_port();
            let mut command = Command::new("/usr/bin/redis-server");
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"])
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(dir.join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            if let Some(primary) = replica_of {
                command.args(["--replicaof", &primary.ip().to_string(), &primary.port().to_string()]);
            }
            let mut server = Server(command.spawn().expect("start redis-server"), libc::SIGTERM);
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + START;
            while Instant::now() < deadline && server.0.try_wait().ok().flatten().is_none() {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return Redis { addr, server: Some(server), dir };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            assert!(log.contains("Address already in use"), "redis-server did not start: {log}");
            drop(server);
        }
        panic!("no free port for redis-server after 5 tries");
    }

    /// `redis-cli` against this server; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = output(
            Command::new("/usr/bin/redis-cli")
                .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
                .args(args),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Makes this server a primary (`REPLICAOF NO ONE`), or a replica of `primary`.
    pub fn set_primary(&self, primary: Option<&Redis>) {
        let port = primary.map(|p| p.addr.port().to_string());
        let args = match &port {
            None => vec!["REPLICAOF", "NO", "ONE"],
            Some(port) => vec!["REPLICAOF", "127.0.0.1", port.as_str()],
        };
        assert!(self.cli(&args).contains("OK"));
    }

    /// Where its log is.
    pub fn log(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(|s| s.0.id())
    }
}

/// The newest installed PostgreSQL's programs.
fn pg_bin(program: &str) -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql").unwrap_or_else(|_| {
        panic!("/usr/lib/postgresql is missing: `cargo xtask test` installs it (Debian package postgresql)")
    });
    let newest = versions
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|v| v.parse::<u32>().ok()))
        .max()
        .expect("an installed PostgreSQL version");
    PathBuf::from(format!("/usr/lib/postgresql/{newest}/bin/{program}"))
}

/// The `postgres` account's uid and gid: PostgreSQL refuses to run as root.
fn postgres_account() -> (u32, u32) {
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    unsafe {
        let entry = libc::getpwnam(c"postgres".as_ptr());
        assert!(!entry.is_null(), "no postgres account: `cargo xtask test` installs it (Debian package postgresql)");
        ((*entry).pw_uid, (*entry).pw_gid)
    }
}

/// A command run as the `postgres` account.
fn as_postgres(program: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let (uid, gid) = postgres_account();
    let mut command = Command::new(program);
    command.uid(uid).gid(gid).env_remove("PGDATA").stdin(Stdio::null());
    command
}

/// One PostgreSQL server: a primary, or a streaming standby of one.
pub struct Postgres {
    pub addr: SocketAddr,
    pub data: PathBuf,
    server: Option<Server>,
}

impl Postgres {
    /// Only a client of whatever answers at `addr`: `query` works, nothing is started.
    pub fn at(addr: SocketAddr) -> Postgres {
        Postgres { addr, data: PathBuf::new(), server: None }
    }

    /// A new primary: trust authentication from 127.0.0.1 (user `postgres`), replication on.
    pub async fn primary() -> Postgres {
        let dir = pg_dir();
        let data = dir.join("data");
        output(
            as_postgres(&pg_bin("initdb"))
                .args(["--auth=trust", "--username=postgres", "--no-sync", "--encoding=UTF8", "--locale=C"])
                .arg("-D")
                .arg(&data),
        );
        Postgres::start(data).await
    }

    /// A streaming standby of `primary`, copied with pg_basebackup.
    pub async fn standby_of(primary: &Postgres) -> Postgres {
        let data = pg_dir().join("data");
        output(
            as_postgres(&pg_bin("pg_basebackup"))
                .args(["-h", "127.0.0.1", "-p", &primary.addr.port().to_string(), "-U", "postgres"])
                .args(["-X", "stream", "-R", "--no-sync"])
                .arg("-D")
                .arg(&data),
        );
        let standby = Postgres::start(data).await;
        assert_eq!(standby.query("SELECT pg_is_in_recovery()"), "t");
        standby
    }

    async fn start(data: PathBuf) -> Postgres {
        for _ in 0..5 {
            let port = free_port();
            let log = data.parent().expect("a data dir's parent").join(format!("postgres-{port}.log"));
            let mut server = Server(
                as_postgres(&pg_bin("postgres"))
                    .arg("-D")
                    .arg(&data)
                    .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                    .args(["-c", "wal_level=replica", "-c", "max_wal_senders=4", "-c", "hot_standby=on"])
                    .arg("-c")
                    .arg(format!("unix_socket_directories={}", data.parent().expect("parent").display()))
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).expect("a log file"))
                    .spawn()
                    .expect("start postgres"),
                // Fast shutdown: SIGTERM would wait for every client to leave.
                libc::SIGINT,
            );
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + START;
            while Instant::now() < deadline && server.0.try_wait().ok().flatten().is_none() {
                if ready(addr) {
                    return Postgres { addr, data, server: Some(server) };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(text.contains("Address already in use"), "postgres did not start: {text}");
            drop(server);
        }
        panic!("no free port for postgres after 5 tries");
    }

    /// One SQL statement through psql; its unaligned output, trimmed.
    pub fn query(&self, sql: &str) -> String {
        let out = output(
            Command::new("psql")
                .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string(), "-U", "postgres", "-d", "postgres"])
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Promotes a standby, and waits until it takes writes.
    pub async fn promote(&self) {
        assert_eq!(self.query("SELECT pg_promote(true, 60)"), "t");
        let deadline = Instant::now() + START;
        while self.query("SELECT pg_is_in_recovery()") != "f" {
            assert!(Instant::now() < deadline, "the standby was not promoted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server now (fast shutdown: clients are disconnected).
    pub fn stop(&mut self) {
        self.server.take();
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        let dir = self.data.parent().expect("parent");
        let mut text = String::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().ends_with(".log") {
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        text
    }
}

/// A directory the `postgres` account owns, for one server.
fn pg_dir() -> PathBuf {
    let dir = temp_dir("postgres");
    let (uid, gid) = postgres_account();
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown the postgres dir");
    dir
}

/// True once the server at `addr` accepts connections (`pg_isready`).
fn ready(addr: SocketAddr) -> bool {
    Command::new(pg_bin("pg_isready"))
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "-t", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One MariaDB server (Debian's mariadb-server), with a user `harbor` that has no password
/// and may connect from 127.0.0.1.
pub struct Mariadb {
    pub addr: SocketAddr,
    dir: PathBuf,
    server: Option<Server>,
}

impl Mariadb {
    pub async fn start() -> Mariadb {
        require("/usr/sbin/mariadbd", "mariadb-server");
        let dir = temp_dir("mariadb");
        let data = dir.join("data");
        output(
            Command::new("/usr/bin/mariadb-install-db")
                .args(["--no-defaults", "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"])
                .arg(format!("--datadir={}", data.display()))
                .stdin(Stdio::null()),
        );
        let init = dir.join("init.sql");
        std::fs::write(&init, "CREATE USER IF NOT EXISTS 'harbor'@'127.0.0.1';\n").expect("write init.sql");
        for _ in 0..5 {
            let port = free_port();
            let log = dir.join("mariadb.log");
            let mut server = Server(
                Command::new("/usr/sbin/mariadbd")
                    .args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1", "--skip-name-resolve"])
                    .args(["--innodb-buffer-pool-size=16M", "--skip-log-bin"])
                    .arg(format!("--port={port}"))
                    .arg(format!("--datadir={}", data.display()))
                    .arg(format!("--socket={}", dir.join("mariadb.sock").display()))
                    .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
                    .arg(format!("--init-file={}", init.display()))
                    .arg(format!("--log-error={}", log.display()))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start mariadbd"),
                libc::SIGTERM,
            );
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut db = Mariadb { addr, dir: dir.clone(), server: None };
            let deadline = Instant::now() + START;
            while Instant::now() < deadline && server.0.try_wait().ok().flatten().is_none() {
                if db.try_query(addr, "SELECT 1").as_deref() == Some("1") {
                    db.server = Some(server);
                    return db;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let text = db.log();
            assert!(text.contains("Address already in use"), "mariadbd did not start: {text}");
            drop(server);
        }
        panic!("no free port for mariadbd after 5 tries");
    }

    fn try_query(&self, addr: SocketAddr, sql: &str) -> Option<String> {
        let out = Command::new("/usr/bin/mariadb")
            .args(["--no-defaults", "-h", "127.0.0.1", "-P", &addr.port().to_string(), "-u", "harbor"])
            .args(["--batch", "--skip-column-names", "--connect-timeout=2", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// One SQL statement through the `mariadb` client, as `harbor`, against `addr` (this
    /// server, or Harbor in front of it); its tab-separated output, trimmed.
    pub fn query_via(&self, addr: SocketAddr, sql: &str) -> String {
        self.try_query(addr, sql)
            .unwrap_or_else(|| panic!("{sql} via {addr} failed; the server logged:\n{}", self.log()))
    }

    /// Stops the server now.
    pub fn stop(&mut self) {
        self.server.take();
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mariadb.log")).unwrap_or_default()
    }
}

/// nginx (Debian's) with the caller's `server { … }` blocks, run from `dir` (its pid, logs and
/// temporary files go there), stopped when dropped. Returns once every address of `ready`
/// accepts connections.
pub struct Nginx {
    _server: Server,
    pub dir: PathBuf,
}

impl Nginx {
    pub async fn start(dir: PathBuf, servers: &str, ready: &[SocketAddr]) -> Nginx {
        require("/usr/sbin/nginx", "nginx");
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{servers}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).expect("write nginx.conf");
        let child = Command::new("/usr/sbin/nginx")
            .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let nginx = Nginx { _server: Server(child, libc::SIGQUIT), dir };
        let deadline = Instant::now() + START;
        for addr in ready {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                assert!(Instant::now() < deadline, "nginx did not come up on {addr}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        nginx
    }
}
