#!/usr/bin/env bash
# Builds every strategies/wat/*.wat (component-model WAT text) into the binary component
# strategies/<name>.wasm, next to the Rust strategies that `cargo xtask build` writes.
#
#   bash strategies/wat/build.sh             # every .wat in this folder
#   bash strategies/wat/build.sh FILE.wat... # only these (written to strategies/ as well)
#
# Tool, first found wins:
#   1. `wasm-tools` on PATH or in ~/.cargo/bin: parse, then validate and print the world;
#   2. `jco` (npm @bytecodealliance/jco, which bundles wasm-tools) on PATH or already
#      installed in the local tool cache below: parse, then print the world;
#   3. neither: install jco into the local tool cache with npm (a few seconds, no root
#      needed), or if there is no npm, `cargo install wasm-tools --locked` (a few minutes).
# Set HARBOR_WAT_TOOL=wasm-tools or HARBOR_WAT_TOOL=jco to insist on one (installing it if
# missing), and HARBOR_TOOLS_DIR to move the cache (default ~/.cache/harbor-tools).
set -euo pipefail

WASM_TOOLS_VERSION=1.263.0   # the same wat/wast release as wasmtime's `wat` feature in Cargo.lock
JCO_VERSION=1.35.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out_dir="$(dirname "$here")"   # strategies/
tools_dir="${HARBOR_TOOLS_DIR:-$HOME/.cache/harbor-tools}"
want="${HARBOR_WAT_TOOL:-}"

say() { echo "wat/build.sh: $*" >&2; }
run() { say "+ $*"; "$@"; }

find_wasm_tools() {
  if command -v wasm-tools >/dev/null 2>&1; then command -v wasm-tools
  elif [ -x "$HOME/.cargo/bin/wasm-tools" ]; then echo "$HOME/.cargo/bin/wasm-tools"
  else return 1; fi
}
find_jco() {
  if command -v jco >/dev/null 2>&1; then command -v jco
  elif [ -x "$tools_dir/node_modules/.bin/jco" ]; then echo "$tools_dir/node_modules/.bin/jco"
  else return 1; fi
}
install_wasm_tools() {
  command -v cargo >/dev/null 2>&1 || { say "cannot install wasm-tools: no cargo"; exit 1; }
  say "installing wasm-tools $WASM_TOOLS_VERSION with cargo (takes a few minutes)"
  run cargo install wasm-tools --locked --version "$WASM_TOOLS_VERSION" >&2
}
install_jco() {
  command -v npm >/dev/null 2>&1 || { say "cannot install jco: no npm"; exit 1; }
  say "installing @bytecodealliance/jco $JCO_VERSION into $tools_dir"
  mkdir -p "$tools_dir"
  run npm install --prefix "$tools_dir" --no-audit --no-fund --no-update-notifier --loglevel=error \
    "@bytecodealliance/jco@$JCO_VERSION" >&2
}

tool="" ; bin=""
case "$want" in
  wasm-tools) bin="$(find_wasm_tools)" || { install_wasm_tools; bin="$(find_wasm_tools)"; }; tool=wasm-tools ;;
  jco)        bin="$(find_jco)"        || { install_jco;        bin="$(find_jco)"; };        tool=jco ;;
  "")
    if bin="$(find_wasm_tools)"; then tool=wasm-tools
    elif bin="$(find_jco)"; then tool=jco
    elif command -v npm >/dev/null 2>&1; then install_jco; bin="$(find_jco)"; tool=jco
    else install_wasm_tools; bin="$(find_wasm_tools)"; tool=wasm-tools
    fi ;;
  *) say "HARBOR_WAT_TOOL must be wasm-tools or jco, not '$want'"; exit 2 ;;
esac
say "using $tool ($bin)"

if [ "$#" -gt 0 ]; then sources=("$@"); else sources=("$here"/*.wat); fi
[ -e "${sources[0]}" ] || { say "no .wat files in $here"; exit 1; }

for src in "${sources[@]}"; do
  name="$(basename "$src" .wat)"
  out="$out_dir/$name.wasm"
  tmp="$out.tmp.$$"
  say "building $src -> $out"
  # Write to a temporary file first so a failed build never leaves a half-written component.
  trap 'rm -f "$tmp"' EXIT
  if [ "$tool" = wasm-tools ]; then
    run "$bin" parse "$src" -o "$tmp"
    run "$bin" validate "$tmp"
    world="$("$bin" component wit "$tmp")"
  else
    run "$bin" parse "$src" -o "$tmp"
    world="$("$bin" wit "$tmp")"
  fi
  # A strategy must export the world's four functions (the host checks their exact types
  # when it loads the component; `jco parse` does not validate function bodies either).
  for export in init set-backends pick report; do
    # A here-string, not `printf | grep -q`: an early grep exit would SIGPIPE printf (pipefail).
    if ! grep -Eq "^\s*export $export: func" <<<"$world"; then
      say "error: $src does not export \`$export\`; its world is:"
      printf '%s\n' "$world" >&2
      exit 1
    fi
  done
  mv "$tmp" "$out"
  trap - EXIT
  # Show the component's world (imports and exports) so a wrong shape is seen at once.
  say "$name.wasm ($(wc -c <"$out") bytes) implements:"
  printf '%s\n' "$world" | { grep -E '^\s*(import|export|use) ' || true; } | sed 's/^\s*/    /' >&2
done
say "done: ${#sources[@]} component(s)"
