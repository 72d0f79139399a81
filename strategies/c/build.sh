#!/usr/bin/env bash
# Builds the C strategy (swrr.c, smooth weighted round-robin) twice:
#   strategies/swrr_c.wasm       no libc I/O: imports nothing, Harbor's cheap path;
#   strategies/wasi/swrr_c.wasm  -DHARBOR_WASI: writes to stderr through wasi-libc and the
#                                WASI preview1 adapter, so it imports WASI 0.2 (the sandbox).
# Toolchain, each installed here if missing: Debian's clang, lld, wasi-libc and the wasm32
# compiler-rt (apt); wit-bindgen's C generator and wit-component's `component new`, built
# into xtask (`cargo xtask wit-bindgen-c`, `cargo xtask component-new`); the preview1
# reactor adapter of wasmtime 48 (the
# wasi-preview1-component-adapter-provider crate, written out by `cargo xtask wasi-adapter`).
set -euo pipefail


here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
work="$target/c-strategy"

say() { echo "c/build.sh: $*" >&2; }
run() { say "+ $*"; "$@"; }

apt_install() {
  local missing=()
  [ -x /usr/bin/clang ] || missing+=(clang)
  [ -x /usr/bin/wasm-ld ] || missing+=(lld)
  [ -f /usr/include/wasm32-wasi/stdio.h ] || missing+=(wasi-libc)
  compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a" >/dev/null \
    || missing+=(libclang-rt-dev-wasm32)
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}


apt_install
mkdir -p "$work" "$root/strategies/wasi"

# Bindings for harbor:strategy@0.1.0: strategy.h, strategy.c and the component type object.
(cd "$root" && run cargo xtask wit-bindgen-c "$root/wit/strategy.wit" strategy "$work")

cflags=(--target=wasm32-wasi --sysroot=/usr -O2 -Wall -Wextra -Werror -mexec-model=reactor -I "$work")
sources=("$here/swrr.c" "$work/strategy.c" "$work/strategy_component_type.o")

# Pure: a core module importing nothing, wrapped as is.
run clang "${cflags[@]}" -o "$work/swrr_pure.core.wasm" "${sources[@]}"
(cd "$root" && run cargo xtask component-new "$work/swrr_pure.core.wasm" "$root/strategies/swrr_c.wasm")

# WASI: wasi-libc's stderr imports wasi_snapshot_preview1, which the adapter turns into WASI 0.2.
(cd "$root" && run cargo xtask wasi-adapter "$work/wasi_snapshot_preview1.reactor.wasm")
run clang "${cflags[@]}" -DHARBOR_WASI -o "$work/swrr_wasi.core.wasm" "${sources[@]}"
(cd "$root" && run cargo xtask component-new "$work/swrr_wasi.core.wasm" "$root/strategies/wasi/swrr_c.wasm" \
  "$work/wasi_snapshot_preview1.reactor.wasm")

# Harbor loads both; the pure one imports no WASI, the other WASI 0.2.
# shellcheck source=../check_component.sh
source "$here/../check_component.sh"
check_component "$root/strategies/swrr_c.wasm" pure
check_component "$root/strategies/wasi/swrr_c.wasm" wasi
say "wrote strategies/swrr_c.wasm and strategies/wasi/swrr_c.wasm"
