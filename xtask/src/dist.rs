//! `cargo xtask dist`: what is shipped. A stripped release binary beside its debug info, a
//! static one (musl) that runs on any Linux, and an OCI image built from scratch around it,
//! checked by running the image's own entry point from its unpacked root.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cargo, install_packages, run, split_debug_info, target_dir, RUST_STRATEGIES};

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the image keeps its parts; `deploy/kubernetes/harbor.yaml` names the same paths.
const IMAGE_BINARY: &str = "usr/local/bin/harbor";
const IMAGE_STRATEGIES: &str = "usr/share/harbor/strategies";
const IMAGE_CACHE: &str = "var/cache/harbor";
/// The unprivileged user the image runs as (`nobody`).
const IMAGE_USER: &str = "65534:65534";

/// What `cargo xtask dist` was asked for.
pub struct Wanted {
    pub static_binary: bool,
    pub image: bool,
}

impl Wanted {
    pub fn parse(args: &[String]) -> Result<Wanted> {
        let mut wanted = Wanted { static_binary: false, image: false };
        for arg in args {
            match arg.as_str() {
                "--static" => wanted.static_binary = true,
                "--image" => wanted.image = true,
                other => bail!("dist: unknown option {other:?} (--static, --image)"),
            }
        }
        Ok(wanted)
    }
}

pub fn dist(root: &Path, wanted: &Wanted) -> Result<()> {
    let target = target_dir(root);
    if !wanted.static_binary && !wanted.image {
        run(cargo().args(["build", "--release", "-p", "harbor"]))?;
        let out = target.join("dist");
        let (whole, stripped, debug) = split_debug_info(&target.join("release").join("harbor"), &out)?;
        report(&out, whole, stripped, debug);
        return Ok(());
    }
    let out = static_binary(root)?;
    if wanted.image {
        crate::build_strategies(root)?;
        let archive = image(root, &out.join("harbor"))?;
        check_image(&archive, &target.join("dist").join("image-check"))?;
    }
    Ok(())
}

fn report(out: &Path, whole: u64, stripped: u64, debug: u64) {
    println!(
        "{}/harbor: {:.1} MB (was {:.1} MB); harbor.debug: {:.1} MB",
        out.display(),
        stripped as f64 / 1e6,
        whole as f64 / 1e6,
        debug as f64 / 1e6
    );
}

/// `target/dist/x86_64-unknown-linux-musl/harbor`: static, stripped, and checked to be so.
fn static_binary(root: &Path) -> Result<PathBuf> {
    run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    // wasmtime's build compiles a little C (its trap handling helpers) with the target's cc.
    install_packages(&[("musl-tools", "/usr/bin/x86_64-linux-musl-gcc")])?;
    run(cargo().args(["build", "--release", "-p", "harbor", "--target", MUSL_TARGET]))?;
    let target = target_dir(root);
    let out = target.join("dist").join(MUSL_TARGET);
    let (whole, stripped, debug) = split_debug_info(&target.join(MUSL_TARGET).join("release").join("harbor"), &out)?;
    // Static PIE: a dynamic section for its own relocations, but no loader and no library.
    let headers =
        Command::new("readelf").args(["--program-headers", "--dynamic", "--wide"]).arg(out.join("harbor")).output()?;
    let headers = String::from_utf8_lossy(&headers.stdout);
    if headers.contains("INTERP") || headers.contains("(NEEDED)") {
        bail!("{}/harbor is not static: it names a dynamic loader or libraries", out.display());
    }
    report(&out, whole, stripped, debug);
    Ok(out)
}

/// Builds the image from scratch with buildah and writes it as an OCI archive,
/// `target/dist/harbor-VERSION.oci.tar`; also tagged `localhost/harbor:VERSION` in buildah's
/// store. Returns the archive.
fn image(root: &Path, binary: &Path) -> Result<PathBuf> {
    install_packages(&[("buildah", "/usr/bin/buildah"), ("umoci", "/usr/bin/umoci")])?;
    let version = env!("CARGO_PKG_VERSION");
    let dist = target_dir(root).join("dist");
    let tree = dist.join("image-root");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    for dir in ["usr/local/bin", IMAGE_STRATEGIES, IMAGE_CACHE, "etc/harbor", "tmp", "proc"] {
        std::fs::create_dir_all(tree.join(dir))?;
    }
    copy(binary, &tree.join(IMAGE_BINARY))?;
    for name in RUST_STRATEGIES {
        copy(
            &root.join("strategies").join(format!("{name}.wasm")),
            &tree.join(IMAGE_STRATEGIES).join(format!("{name}.wasm")),
        )?;
    }
    // The smallest passwd and group that name the image's user, for tools that look it up.
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    )?;
    std::fs::write(tree.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;

    let layer = dist.join("image-layer.tar");
    run(Command::new("tar")
        .args(["--create", "--numeric-owner", "--owner=0", "--group=0", "--sort=name", "--file"])
        .arg(&layer)
        .arg("-C")
        .arg(&tree)
        .args(["--exclude", IMAGE_CACHE, "."]))?;
    let cache_layer = dist.join("image-cache.tar");
    run(Command::new("tar")
        .args(["--create", "--numeric-owner", "--owner=65534", "--group=65534", "--file"])
        .arg(&cache_layer)
        .arg("-C")
        .arg(&tree)
        .arg(IMAGE_CACHE))?;
    run(Command::new("tar").arg("--concatenate").arg("--file").arg(&layer).arg(&cache_layer))?;
    std::fs::remove_file(&cache_layer)?;
    let container = output(Command::new("buildah").args(["from", "scratch"]))?;
    let container = container.trim();
    let built = (|| -> Result<PathBuf> {
        // One layer from a tar with numeric owners: root owns everything but the cache,
        // which the image's user owns (buildah add unpacks it as it is).
        run(Command::new("buildah").args(["add", "--quiet", container]).arg(&layer).arg("/"))?;
        run(Command::new("buildah")
            .args(["config"])
            .args(["--entrypoint", &format!("[\"/{IMAGE_BINARY}\"]")])
            .args(["--cmd", "--config /etc/harbor/harbor.toml"])
            .args(["--user", IMAGE_USER, "--workingdir", "/"])
            .args(["--env", &format!("HARBOR_CACHE_DIR=/{IMAGE_CACHE}")])
            .args(["--port", "8080/tcp", "--port", "9100/tcp", "--stop-signal", "SIGTERM"])
            .args(["--label", &format!("org.opencontainers.image.version={version}")])
            .args(["--label", "org.opencontainers.image.title=harbor"])
            .arg(container))?;
        run(Command::new("buildah").args([
            "commit",
            "--quiet",
            "--rm",
            container,
            &format!("localhost/harbor:{version}"),
        ]))?;
        let archive = dist.join(format!("harbor-{version}.oci.tar"));
        let _ = std::fs::remove_file(&archive);
        run(Command::new("buildah")
            .args(["push", "--quiet", &format!("localhost/harbor:{version}")])
            .arg(format!("oci-archive:{}:harbor:{version}", archive.display())))?;
        Ok(archive)
    })();
    if built.is_err() {
        let _ = Command::new("buildah").args(["rm", container]).stdout(Stdio::null()).status();
    }
    let archive = built?;
    std::fs::remove_dir_all(&tree)?;
    std::fs::remove_file(&layer)?;
    println!("{}: {:.1} MB", archive.display(), std::fs::metadata(&archive)?.len() as f64 / 1e6);
    Ok(archive)
}

/// Unpacks the archive with umoci and runs the image's entry point, as its configured user,
/// chrooted in its root, with a config written where a mount would put it: a loopback
/// listener in front of an echo backend, the admin API beside it. Bytes must come back
/// through Harbor, `/readyz` must answer 200, and SIGTERM must end it cleanly.
fn check_image(archive: &Path, work: &Path) -> Result<()> {
    if work.exists() {
        std::fs::remove_dir_all(work)?;
    }
    std::fs::create_dir_all(work)?;
    let layout = work.join("layout");
    let version = env!("CARGO_PKG_VERSION");
    run(Command::new("tar").arg("-xf").arg(archive).arg("-C").arg({
        std::fs::create_dir_all(&layout)?;
        &layout
    }))?;
    let bundle = work.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:harbor:{version}", layout.display()))
        .arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    let args: Vec<String> = spec["process"]["args"]
        .as_array()
        .context("config.json: no process.args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let user = format!("{}:{}", spec["process"]["user"]["uid"], spec["process"]["user"]["gid"]);
    let env: Vec<String> = spec["process"]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect();
    if args.first().map(String::as_str) != Some(&format!("/{IMAGE_BINARY}")) || user != IMAGE_USER {
        bail!("the image runs {args:?} as {user}, not /{IMAGE_BINARY} as {IMAGE_USER}");
    }

    let backend = echo_backend()?;
    let (listen, admin) = (free_port()?, free_port()?);
    let config = format!(
        "admin = \"127.0.0.1:{admin}\"\n\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:{listen}\"\n\
         backends = [\"{backend}\"]\nstrategy = \"/{IMAGE_STRATEGIES}/least_conn.wasm\"\n"
    );
    std::fs::write(rootfs.join("etc/harbor/harbor.toml"), config)?;
    // The cache is the only place the image's user writes (an emptyDir in Kubernetes).
    let owner = std::fs::metadata(rootfs.join(IMAGE_CACHE))?;
    if std::os::unix::fs::MetadataExt::uid(&owner) != 65534 {
        bail!("/{IMAGE_CACHE} in the image is not owned by {IMAGE_USER}");
    }
    // /proc, as a container runtime mounts it (the upgrade and the process metrics read it).
    run(Command::new("mount").args(["-t", "proc", "proc"]).arg(rootfs.join("proc")))?;
    let harbor = Command::new("chroot")
        .arg(format!("--userspec={user}"))
        .arg(&rootfs)
        .args(&args)
        .env_clear()
        .envs(env.iter().filter_map(|e| e.split_once('=')))
        .stdin(Stdio::null())
        .spawn();
    let mut harbor = match harbor {
        Ok(child) => child,
        Err(error) => {
            let _ = Command::new("umount").arg(rootfs.join("proc")).status();
            return Err(error).context("chroot into the unpacked image");
        }
    };
    let checked = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, admin));
        while http_status(admin_addr, "/readyz").ok() != Some(200) {
            if let Some(status) = harbor.try_wait()? {
                bail!("Harbor from the image exited with {status} before it was ready");
            }
            if Instant::now() > deadline {
                bail!("Harbor from the image was not ready in 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for round in 0..20u32 {
            let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, listen))?;
            client.set_read_timeout(Some(Duration::from_secs(5)))?;
            let sent = format!("hello from the image, round {round}\n").repeat(1000);
            client.write_all(sent.as_bytes())?;
            client.shutdown(std::net::Shutdown::Write)?;
            let mut back = Vec::new();
            client.read_to_end(&mut back)?;
            if back != sent.as_bytes() {
                bail!("round {round}: {} bytes sent, {} came back different", sent.len(), back.len());
            }
        }
        let metrics = http_get(admin_addr, "/metrics")?;
        if !metrics.contains("harbor_accepts_total{service=\"web\"} 20") || !metrics.contains("process_open_fds") {
            bail!("/metrics from the image does not count 20 accepts and the process: {metrics}");
        }
        Ok(())
    })();
    let _ = Command::new("kill").args(["-TERM", &harbor.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = harbor.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = harbor.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    run(Command::new("umount").arg(rootfs.join("proc")))?;
    checked?;
    match status {
        Some(s) if s.success() => {}
        other => bail!("Harbor from the image did not exit cleanly on SIGTERM: {other:?}"),
    }
    std::fs::remove_dir_all(work)?;
    eprintln!(
        "xtask: the image's entry point started from its unpacked root, relayed 20 connections and stopped cleanly"
    );
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// A loopback echo server on a thread of its own, for as long as xtask runs.
fn echo_backend() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = match stream.try_clone() {
                    Ok(s) => s,
                    Err(_) => return,
                };
                let _ = std::io::copy(&mut reader, &mut stream);
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: harbor\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let text = http_get(addr, path)?;
    text.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")
}
