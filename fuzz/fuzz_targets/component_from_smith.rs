//! Fuzzes the loader with *generated* strategies: wasm-smith makes a core module with exactly
//! the imports and exports of a shipped Rust strategy (the world's core signatures, memory and
//! realloc included) but arbitrary bodies; wit-component wraps it into a component of
//! Harbor's world. So every input gets past the world check, and what the guest does at run
//! time is random: Harbor must judge and contain it. Never a panic, a hang or unbounded memory.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use harbor::strategy::engine::StrategyEngine;
use harbor::strategy::loaded::{sha256_hex, GuestLimits, LoadedStrategy};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

/// The template core module (`HARBOR_FUZZ_TEMPLATE`, set by `cargo xtask fuzz`) and its
/// `component-type` custom sections, which carry the world for wit-component.
fn template() -> &'static (Vec<u8>, Vec<(String, Vec<u8>)>) {
    static TEMPLATE: OnceLock<(Vec<u8>, Vec<(String, Vec<u8>)>)> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let path = std::env::var("HARBOR_FUZZ_TEMPLATE").expect("HARBOR_FUZZ_TEMPLATE: a guest core module");
        let module = std::fs::read(&path).expect("read the template module");
        let mut sections = Vec::new();
        for payload in wasmparser::Parser::new(0).parse_all(&module) {
            if let Ok(wasmparser::Payload::CustomSection(reader)) = payload {
                if reader.name().starts_with("component-type") {
                    sections.push((reader.name().to_string(), reader.data().to_vec()));
                }
            }
        }
        assert!(!sections.is_empty(), "the template has no component-type section");
        (module, sections)
    })
}

fn leb(mut value: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends a custom section.
fn append_custom(module: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut contents = Vec::new();
    leb(name.len(), &mut contents);
    contents.extend_from_slice(name.as_bytes());
    contents.extend_from_slice(data);
    module.push(0);
    leb(contents.len(), module);
    module.extend_from_slice(&contents);
}

fuzz_target!(|data: &[u8]| {
    let (shape, sections) = template();
    let mut u = Unstructured::new(data);
    let config = wasm_smith::Config {
        module_shape: Some(shape.clone()),
        max_funcs: 40,
        max_instructions: 2_000,
        max_memory32_bytes: 32 << 20,
        ..wasm_smith::Config::default()
    };
    let Ok(module) = wasm_smith::Module::new(config, &mut u) else { return };
    let mut bytes = module.to_bytes();
    for (name, data) in sections {
        append_custom(&mut bytes, name, data);
    }
    let mut encoder = wit_component::ComponentEncoder::default();
    let Ok(encoder) = encoder.module(&bytes) else { return };
    let Ok(component) = encoder.encode() else { return };

    let engine = StrategyEngine::global().expect("the engine builds with its limits");
    let limits = GuestLimits {
        call_timeout: Duration::from_millis(10),
        memory_bytes: 16 << 20,
        ready_instances: 1,
        ..GuestLimits::default()
    };
    let sha = sha256_hex(&component);
    let Ok(loaded) = LoadedStrategy::from_bytes(
        engine,
        &component,
        sha,
        Path::new("smith.wasm"),
        limits,
        "",
        &harbor::strategy::GuestEnv::default(),
    ) else {
        return;
    };
    harbor_fuzz::pick_and_judge(loaded, 4);
});
