//! Records the commit Harbor is built from (`harbor --version`, `harbor_build_info`), and
//! compiles the kernel relay's BPF program (`bpf/relay.bpf.c`) with clang if clang can target
//! BPF here. Without it Harbor still builds; `--relay kernel` then says why in one line and
//! relays in user space.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    record_commit();
    println!("cargo:rerun-if-changed=bpf/relay.bpf.c");
    println!("cargo:rerun-if-env-changed=HARBOR_BPF_CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("relay.bpf.o");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let unbuilt = if linux { compile(&object).err() } else { Some("not a Linux build".to_string()) };
    if let Some(reason) = &unbuilt {
        println!("cargo:warning=the kernel relay is not built ({reason}); --relay kernel will fall back to the user-space relay");
        // An empty object: the loader sees it and names the reason.
        std::fs::write(&object, b"").expect("OUT_DIR is writable");
    }
    println!("cargo:rustc-env=HARBOR_BPF_UNBUILT={}", unbuilt.unwrap_or_default());
}

fn compile(object: &std::path::Path) -> Result<(), String> {
    let clang = std::env::var("HARBOR_BPF_CLANG").unwrap_or_else(|_| "clang".to_string());
    // linux/bpf.h includes <asm/types.h>, which Debian keeps under the multiarch directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => other,
    };
    let output = Command::new(&clang)
        .args(["-O2", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", "bpf/relay.bpf.c", "-o"])
        .arg(object)
        .output()
        .map_err(|e| format!("{clang}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("{clang} failed: {}", stderr.lines().next().unwrap_or("")));
    }
    Ok(())
}

fn record_commit() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HARBOR_COMMIT={commit}");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
}
