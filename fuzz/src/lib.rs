//! The fuzz targets' bodies (in `targets.rs`, which the host's corpus replay test includes
//! too), for the libFuzzer binaries in `fuzz_targets/`.

mod targets;
pub use targets::*;
