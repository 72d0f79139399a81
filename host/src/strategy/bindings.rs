//! The one `bindgen!` site: Rust types and calls generated from `wit/strategy.wit`.

wasmtime::component::bindgen!({
    world: "strategy",
    path: "../wit",
});
