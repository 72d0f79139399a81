//! Network namespaces a test makes and removes itself: a [`Lab`] creates namespaces and veth
//! pairs with iproute2, runs processes and async code inside them, and on drop (also when the
//! test panics) kills what it started and deletes every namespace it made.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Namespaces, links and processes of one test.
pub struct Lab {
    /// Prefix of every name this lab makes: unique per process and lab.
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    /// A new lab; `tag` (a few letters) tells its namespaces from other tests'. Panics, saying
    /// why, if this process cannot make namespaces (not root, or no iproute2).
    pub fn new(tag: &str) -> Lab {
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        assert!(root, "network-namespace tests need root (they create namespaces and veth pairs)");
        let ip = Command::new("ip").arg("-V").output();
        assert!(ip.is_ok_and(|o| o.status.success()), "network-namespace tests need iproute2's `ip`");
        Lab { prefix: format!("hb{}{tag}", std::process::id() % 100_000), namespaces: Vec::new(), children: Vec::new() }
    }

    /// Makes namespace `name` (prefixed) with its loopback up; returns its full name.
    pub fn namespace(&mut self, name: &str) -> String {
        let full = format!("{}{name}", self.prefix);
        run(Command::new("ip").args(["netns", "add", &full]));
        self.namespaces.push(full.clone());
        self.ip(&full, &["link", "set", "lo", "up"]);
        full
    }

    /// A veth pair between two namespaces, each end up with its address (`10.0.0.1/24`).
    /// End names are short (`<a>-<b>` of the caller's choosing, at most 15 bytes).
    pub fn veth(&self, (ns_a, end_a, addr_a): (&str, &str, &str), (ns_b, end_b, addr_b): (&str, &str, &str)) {
        self.ip(ns_a, &["link", "add", end_a, "type", "veth", "peer", "name", end_b, "netns", ns_b]);
        for (ns, end, addr) in [(ns_a, end_a, addr_a), (ns_b, end_b, addr_b)] {
            self.ip(ns, &["addr", "add", addr, "dev", end]);
            self.ip(ns, &["link", "set", "dev", end, "up"]);
        }
    }

    /// `ip -n NS ARGS...`; panics with its stderr if it fails.
    pub fn ip(&self, ns: &str, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(ns).args(args));
    }

    /// Many `ip` commands at once (`ip -n NS -batch -`), one per line.
    pub fn ip_batch(&self, ns: &str, lines: &[String]) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["-n", ns, "-batch", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip -batch");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(lines.join("\n").as_bytes()).expect("write ip batch");
        }
        let out = child.wait_with_output().expect("ip -batch");
        assert!(out.status.success(), "ip -n {ns} -batch failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Gives processes started in the namespace their own `/etc/resolv.conf` (`ip netns exec`
    /// mounts `/etc/netns/NS/resolv.conf` over it), as a pod gets one; removed on drop.
    pub fn resolv_conf(&self, ns: &str, contents: &str) {
        let dir = std::path::Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NS");
        std::fs::write(dir.join("resolv.conf"), contents).expect("write resolv.conf");
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.tcp_migrate_req`); networking sysctls
    /// are per namespace, so the host's stay as they are.
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", &format!("echo {value} > {path}")]));
    }

    /// Starts `program args...` inside the namespace; the lab kills it on drop unless it
    /// was taken back with [`Lab::stop`] first. Returns its pid.
    pub fn spawn(&mut self, ns: &str, program: &str, args: &[String]) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn in namespace");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Sends `signal` to a process this lab started and has not reaped.
    pub fn signal(&self, pid: u32, signal: i32) {
        assert!(self.children.iter().any(|c| c.id() == pid), "{pid} is not running in this lab");
        // SAFETY: kill(2) on a live child of this lab.
        unsafe { libc::kill(pid as i32, signal) };
    }

    /// Sends SIGTERM to the process started as `pid` and waits (at most `within`) for it to
    /// exit; returns whether it exited successfully in time.
    pub fn stop(&mut self, pid: u32, within: Duration) -> bool {
        self.signal(pid, libc::SIGTERM);
        self.wait_exit(pid, within)
    }

    /// Waits (at most `within`) for the process started as `pid` to exit, and reaps it;
    /// kills it if it is still running then. Returns whether it exited successfully in time.
    pub fn wait_exit(&mut self, pid: u32, within: Duration) -> bool {
        let Some(at) = self.children.iter().position(|c| c.id() == pid) else { return false };
        let mut child = self.children.remove(at);
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Runs `work` to completion on a new thread inside the namespace, on a runtime of its
    /// own: every socket it makes belongs to that namespace.
    pub fn run_in<F, T>(&self, ns: &str, work: impl FnOnce() -> F + Send + 'static) -> T
    where
        F: Future<Output = T>,
        T: Send + 'static,
    {
        self.spawn_in(ns, work).join().expect("namespace thread panicked")
    }

    /// [`Lab::run_in`] without waiting: the thread's handle.
    pub fn spawn_in<F, T>(&self, ns: &str, work: impl FnOnce() -> F + Send + 'static) -> std::thread::JoinHandle<T>
    where
        F: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) on a namespace file this thread holds open; it moves only this thread.
            let moved = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(moved, 0, "setns {path}: {}", std::io::Error::last_os_error());
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(work())
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            // Deleting a namespace also removes its veth ends (and their peers).
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(ns));
        }
    }
}

fn run(command: &mut Command) {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}
