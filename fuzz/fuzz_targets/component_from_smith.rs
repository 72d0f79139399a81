//! Fuzzes the loader with wasm-smith-generated strategies (see
//! `harbor_fuzz::component_from_smith`); `HARBOR_FUZZ_TEMPLATE` names the template core module.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn template() -> &'static harbor_fuzz::Template {
    static TEMPLATE: OnceLock<harbor_fuzz::Template> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let path = std::env::var("HARBOR_FUZZ_TEMPLATE").expect("HARBOR_FUZZ_TEMPLATE: a guest core module");
        harbor_fuzz::read_template(std::path::Path::new(&path))
    })
}

fuzz_target!(|data: &[u8]| harbor_fuzz::component_from_smith(template(), data));
