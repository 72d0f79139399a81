//! The WASI 0.2 sandbox for components built with a toolchain's defaults (Rust
//! `wasm32-wasip2`, componentize-py, componentize-js, C with wasi-libc): no files, no network,
//! no environment or arguments, an empty stdin; stdout and stderr go to the strategy's log,
//! rate-limited; clocks and random are allowed. The interfaces are wasmtime-wasi's.
//!
//! A component that imports WASI is instantiated with [`linker`] and called asynchronously,
//! each call driven to its end on the calling thread by [`finish`]: wasmtime-wasi's blocking
//! calls would otherwise start a runtime inside Harbor's own. Nothing in the sandbox waits
//! (stdout never pushes back, stdin is closed), so a call that does wait (a guest asking to
//! sleep) is a fault, like a trap. A pure component is linked without any of this.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::v2::LogLevel;
use super::guest_host::{GuestContext, MAX_LOG_CHARS};

/// The WASI interfaces (any 0.2 patch release) a sandboxed strategy may import. They are what
/// wasmtime-wasi provides for `wasi:cli/command` without a `run` export; the filesystem and
/// sockets ones answer with errors, since nothing is opened or allowed.
const INTERFACES: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/ip-name-lookup",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
];

/// WASI 0.2 interfaces the sandbox does not implement but lets a component import, because
/// toolchains import them by default (componentize-js: `wasi:http`): every function of them
/// traps when called, so a strategy that tries an HTTP request faults, and one that only
/// imports them loads.
const TRAPPING_INTERFACES: &[&str] = &["wasi:http/types", "wasi:http/outgoing-handler"];

/// `name` split into interface and patch version, if it is `<interface>@0.2.<patch>`.
fn wasi_0_2(name: &str) -> Option<&str> {
    let (interface, version) = name.split_once('@')?;
    let patch = version.strip_prefix("0.2.")?;
    (!patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit())).then_some(interface)
}

/// True for an import the sandbox accepts: `wasi:<package>/<interface>@0.2.<patch>`,
/// implemented (denying files and network) or trapping (`wasi:http`).
pub fn is_sandbox_import(name: &str) -> bool {
    wasi_0_2(name).is_some_and(|i| INTERFACES.contains(&i) || TRAPPING_INTERFACES.contains(&i))
}

/// True for an import the sandbox links as functions that trap.
pub fn is_trapping_import(name: &str) -> bool {
    wasi_0_2(name).is_some_and(|i| TRAPPING_INTERFACES.contains(&i))
}

/// True if any of `imports` is a WASI one: the component needs the sandbox.
pub fn needs_sandbox<'a>(mut imports: impl Iterator<Item = &'a str>) -> bool {
    imports.any(|name| name.starts_with("wasi:"))
}

/// Defines, in a copy of `linker`, every function of the trapping interfaces `component`
/// imports as one that traps, and their resources; the resources they take from `wasi:io`
/// are wasmtime-wasi's own, so the component's other imports still match.
pub fn with_trapping_imports<T: 'static>(
    linker: &Linker<T>,
    component: &wasmtime::component::Component,
    engine: &wasmtime::Engine,
) -> wasmtime::Result<Linker<T>> {
    use wasmtime::component::types::ComponentItem;
    use wasmtime::component::ResourceType;
    let mut linker = linker.clone();
    for (name, item) in component.component_type().imports(engine) {
        let ComponentItem::ComponentInstance(instance) = item.ty else { continue };
        if !is_trapping_import(name) {
            continue;
        }
        let mut defined = linker.instance(name)?;
        for (export, item) in instance.exports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(_) => {
                    let what = format!("{name}#{export}");
                    defined.func_new(export, move |_, _, _, _| {
                        wasmtime::bail!(
                            "{what}: a strategy may not make HTTP requests (Harbor's sandbox has no network)"
                        )
                    })?;
                }
                ComponentItem::Resource(_) => {
                    let ty = match export {
                        "input-stream" => ResourceType::host::<wasmtime_wasi::p2::DynInputStream>(),
                        "output-stream" => ResourceType::host::<wasmtime_wasi::p2::DynOutputStream>(),
                        "pollable" => ResourceType::host::<wasmtime_wasi::p2::DynPollable>(),
                        "io-error" => ResourceType::host::<wasmtime_wasi::p2::IoError>(),
                        _ => ResourceType::host::<TrappingResource>(),
                    };
                    defined.resource(export, ty, |_, _| Ok(()))?;
                }
                _ => {}
            }
        }
    }
    Ok(linker)
}

/// The resources of a trapping interface: none is ever made, since every function traps.
struct TrappingResource;

/// Adds the WASI interfaces to `linker` (asynchronous: see the module's notes).
pub fn add_to_linker<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)
}

/// One instance's sandbox: a WASI context with nothing granted, and its resources.
pub struct Sandbox {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl Sandbox {
    /// Nothing to read, nowhere to connect: stdout and stderr go to `context`'s log.
    pub fn new(context: Option<Arc<GuestContext>>) -> Sandbox {
        let mut builder = WasiCtx::builder();
        builder
            .stdout(LogStream { context: context.clone(), level: LogLevel::Info })
            .stderr(LogStream { context, level: LogLevel::Warn })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        Sandbox { ctx: builder.build(), table: ResourceTable::new() }
    }
}

impl Sandbox {
    /// The WASI context and resource table a call sees.
    pub fn view(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.ctx, table: &mut self.table }
    }
}

/// A call that waited for something that never comes (nothing wakes it in the sandbox).
#[derive(Debug)]
pub struct Waited;

/// Runs a sandboxed call to its end on this thread. Every host call of the sandbox is ready at
/// once, so the call finishes in one poll; one that is still pending waited for I/O or a
/// timer, and is abandoned (the caller drops the instance).
pub fn finish<F: Future>(call: F) -> Result<F::Output, Waited> {
    let mut call = pin!(call);
    let mut context = Context::from_waker(Waker::noop());
    match call.as_mut().poll(&mut context) {
        Poll::Ready(value) => Ok(value),
        Poll::Pending => Err(Waited),
    }
}

/// Stdout or stderr of a sandboxed strategy: whole lines go to its log at `level` (the log's
/// budget applies), a line longer than the log keeps is cut there. Writing never waits.
#[derive(Clone)]
struct LogStream {
    context: Option<Arc<GuestContext>>,
    level: LogLevel,
}

/// The part of a line written so far, per stream handle.
struct LogLines {
    stream: LogStream,
    line: Vec<u8>,
}

impl LogLines {
    fn push(&mut self, bytes: &[u8]) {
        for chunk in bytes.split_inclusive(|b| *b == b'\n') {
            let room = (MAX_LOG_CHARS * 4).saturating_sub(self.line.len());
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if chunk.ends_with(b"\n") {
                self.emit();
            }
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches(['\n', '\r']);
        if !text.is_empty() {
            if let Some(context) = &self.stream.context {
                context.log(self.stream.level, text);
            }
        }
        self.line.clear();
    }
}

impl Drop for LogLines {
    fn drop(&mut self) {
        self.emit();
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogLines { stream: self.clone(), line: Vec::new() })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LogLines { stream: self.clone(), line: Vec::new() })
    }
}

/// Most bytes one write may carry (what `check-write` answers).
const WRITE_PERMIT: usize = 64 << 10;

impl OutputStream for LogLines {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogLines {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogLines {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(bytes);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wasi_0_2_interfaces_the_sandbox_has_are_accepted() {
        assert!(is_sandbox_import("wasi:cli/stdout@0.2.0"));
        assert!(is_sandbox_import("wasi:io/streams@0.2.6"));
        assert!(is_sandbox_import("wasi:http/outgoing-handler@0.2.0"));
        assert!(is_trapping_import("wasi:http/types@0.2.10"));
        assert!(!is_trapping_import("wasi:io/streams@0.2.6"));
        assert!(!is_sandbox_import("wasi:http/incoming-handler@0.2.0"));
        assert!(!is_sandbox_import("wasi:keyvalue/store@0.2.0"));
        assert!(!is_sandbox_import("wasi:cli/stdout@0.3.0"));
        assert!(!is_sandbox_import("wasi:cli/stdout@0.2."));
        assert!(!is_sandbox_import("wasi:cli/stdout"));
        assert!(needs_sandbox(["harbor:strategy/types@0.2.0", "wasi:io/error@0.2.0"].into_iter()));
        assert!(!needs_sandbox(["harbor:strategy/types@0.2.0"].into_iter()));
    }

    #[test]
    fn a_ready_future_finishes_and_a_waiting_one_does_not() {
        assert_eq!(finish(async { 7 }).ok(), Some(7));
        assert!(finish(std::future::pending::<()>()).is_err());
    }

    #[test]
    fn log_lines_are_cut_and_split() {
        let context = Arc::new(GuestContext::new("svc", "00", Default::default()));
        let mut lines = LogLines { stream: LogStream { context: Some(context), level: LogLevel::Info }, line: vec![] };
        lines.push(b"half");
        assert_eq!(lines.line, b"half");
        lines.push(b" a line\nnext");
        assert_eq!(lines.line, b"next");
        lines.push(&vec![b'x'; MAX_LOG_CHARS * 8]);
        assert_eq!(lines.line.len(), MAX_LOG_CHARS * 4);
    }
}
