#!/usr/bin/env bash
# Build Harbor's polyglot strategy components:
#   strategies/py_p2c.wasm      Python,     componentize-py  (strategies/python/p2c/app.py)
#   strategies/js_fastest.wasm  JavaScript, componentize-js  (strategies/js/fastest/strategy.js)
# and the same two with each toolchain's defaults, which import WASI 0.2 (and wasi:http) and
# run in Harbor's sandbox: strategies/wasi/py_p2c.wasm and strategies/wasi/js_fastest.wasm.
#
# Installs the pinned toolchains from the package registries when missing:
#   - componentize-py + wasmtime (wasmtime-py, for the checks) into a venv at
#     target/polyglot-venv (override with POLYGLOT_VENV);
#   - componentize-js + jco into strategies/js/node_modules with `npm ci` (package-lock.json).
# Harbor itself checks each build (`harbor strategy check`, strategies/check_component.sh):
# the pure builds import no WASI, the default ones WASI 0.2; anything Harbor refuses fails
# the script.
# Then it loads both in wasmtime (wasmtime-py) and in node (jco transpile), checks their
# picks and prints rough per-pick timings (skip with --no-test).
#
# Usage: strategies/build-polyglot.sh [--no-test] [py|js ...]
# Needs: python3 (>= 3.9, with venv), node >= 20 with npm.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1
WASMTIME_PY_VERSION=50.0.1

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
WIT="$ROOT/wit"
VENV="${POLYGLOT_VENV:-$ROOT/target/polyglot-venv}"
JS="$HERE/js"

die() {
    echo "" >&2
    echo "build-polyglot: ERROR: $*" >&2
    exit 1
}
step() { echo "==> $*"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
size_of() { stat -c %s "$1" | awk '{ printf "%d bytes (%.1f MiB)", $1, $1 / 1048576 }'; }

RUN_TEST=1
TARGETS=()
for arg in "$@"; do
    case "$arg" in
        --no-test) RUN_TEST=0 ;;
        py | js) TARGETS+=("$arg") ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument '$arg' (expected --no-test, py, js)" ;;
    esac
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(py js)
want() { local t; for t in "${TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }

# ---------------------------------------------------------------- toolchains
install_python_tools() {
    command -v python3 >/dev/null || die "python3 not found: install it (apt-get install python3 python3-venv)"
    if [ ! -x "$VENV/bin/python" ]; then
        step "creating venv $VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv?)"
    fi
    local have_cpy have_wt
    have_cpy="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("componentize-py"))' 2>/dev/null || true)"
    have_wt="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("wasmtime"))' 2>/dev/null || true)"
    if [ "$have_cpy" != "$COMPONENTIZE_PY_VERSION" ] || [ "$have_wt" != "$WASMTIME_PY_VERSION" ]; then
        step "pip install componentize-py==$COMPONENTIZE_PY_VERSION wasmtime==$WASMTIME_PY_VERSION"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
            "componentize-py==$COMPONENTIZE_PY_VERSION" "wasmtime==$WASMTIME_PY_VERSION" \
            || die "pip could not install componentize-py==$COMPONENTIZE_PY_VERSION / wasmtime==$WASMTIME_PY_VERSION"
    fi
    "$VENV/bin/componentize-py" --version >/dev/null 2>&1 || die "componentize-py does not run from $VENV"
    echo "    $("$VENV/bin/componentize-py" --version), wasmtime-py $WASMTIME_PY_VERSION ($VENV)"
}

install_js_tools() {
    command -v node >/dev/null || die "node not found: install Node.js >= 20"
    command -v npm >/dev/null || die "npm not found: install npm"
    local major
    major="$(node -p 'process.versions.node.split(".")[0]')"
    [ "$major" -ge 20 ] || die "node $(node --version) is too old: componentize-js needs node >= 20"
    local want_cjs want_jco have_cjs have_jco
    want_cjs="$(node -p "require('$JS/package.json').devDependencies['@bytecodealliance/componentize-js']")"
    want_jco="$(node -p "require('$JS/package.json').devDependencies['@bytecodealliance/jco']")"
    have_cjs="$(node -p "require('$JS/node_modules/@bytecodealliance/componentize-js/package.json').version" 2>/dev/null || true)"
    have_jco="$(node -p "require('$JS/node_modules/@bytecodealliance/jco/package.json').version" 2>/dev/null || true)"
    if [ "$have_cjs" != "$want_cjs" ] || [ "$have_jco" != "$want_jco" ]; then
        step "npm ci in strategies/js (componentize-js $want_cjs, jco $want_jco)"
        (cd "$JS" && npm ci --no-audit --no-fund) || die "npm ci failed in $JS"
    fi
    [ -f "$JS/node_modules/@bytecodealliance/componentize-js/src/cli.js" ] || die "componentize-js missing after npm ci"
    [ -x "$JS/node_modules/.bin/jco" ] || die "jco missing after npm ci"
    echo "    componentize-js $want_cjs, jco $want_jco, node $(node --version)"
}

# ------------------------------------------------------------- import check
# Prints the component's imports; fails unless the only one is the type-only
# harbor:strategy/types interface (which every strategy, Rust ones too, has), and, with
# `wasi` as the second argument, WASI 0.2 interfaces.
# shellcheck source=check_component.sh
source "$HERE/check_component.sh"

# -------------------------------------------------------------------- builds
# One build of OUT by "$@" (a toolchain command line), timed, then checked by Harbor as
# KIND (pure: no WASI imports; wasi: the toolchain's defaults).
build_one() { # OUT KIND DESCRIPTION COMMAND...
    local out="$1" kind="$2" what="$3" t
    shift 3
    step "$what -> strategies/${out#"$HERE"/}"
    t="$(now)"
    mkdir -p "$(dirname "$out")"
    "$@" || die "$what failed to build $out"
    echo "    built in $(elapsed "$t"), $(size_of "$out")"
    check_component "$out" "$kind" || die "$(basename "$out") did not pass Harbor's check"
}

componentize_py() { # OUT [FLAGS...]
    local out="$1"
    shift
    "$VENV/bin/componentize-py" -d "$WIT" -w strategy componentize -p "$HERE/python/p2c" "$@" app -o "$out"
}

componentize_js() { # OUT [FLAGS...]
    local out="$1"
    shift
    (cd "$JS" && node node_modules/@bytecodealliance/componentize-js/src/cli.js \
        fastest/strategy.js --wit "$WIT" --world-name strategy "$@" -o "$out")
}

build_py() {
    # -s/--stub-wasi: every WASI import becomes a trapping stub, so the component imports none.
    build_one "$HERE/py_p2c.wasm" pure "componentize-py" componentize_py "$HERE/py_p2c.wasm" --stub-wasi
    build_one "$HERE/wasi/py_p2c.wasm" wasi "componentize-py, its defaults (WASI)" \
        componentize_py "$HERE/wasi/py_p2c.wasm"
}

build_js() {
    # --disable every WASI feature: no stdio, random, clocks, http: the component imports none.
    build_one "$HERE/js_fastest.wasm" pure "componentize-js" componentize_js "$HERE/js_fastest.wasm" \
        --disable stdio random clocks http fetch-event
    build_one "$HERE/wasi/js_fastest.wasm" wasi "componentize-js, its defaults (WASI)" \
        componentize_js "$HERE/wasi/js_fastest.wasm"
}

T0="$(now)"
# jco (for the checks in node) comes with the JS toolchain, so it is installed for both.
install_js_tools
if want py || [ "$RUN_TEST" = 1 ]; then install_python_tools; fi
want py && build_py
want js && build_js

if [ "$RUN_TEST" = 1 ]; then
    files=()
    want py && files+=("$HERE/py_p2c.wasm")
    want js && files+=("$HERE/js_fastest.wasm")
    step "checking the components in wasmtime (wasmtime-py $WASMTIME_PY_VERSION)"
    "$VENV/bin/python" "$HERE/python/test_components.py" "${files[@]}" \
        || die "component checks failed in wasmtime-py"
    step "checking the components in node (jco transpile)"
    # componentize-py's core modules use extended constant expressions, which node 20's
    # V8 only accepts behind a flag (on by default from V8 11.4 / node 21).
    node_flags=()
    # Captured, then searched from a here-string: with `printf … | grep -q`, grep exits at
    # the first match and printf dies of SIGPIPE (141), which pipefail turns into "no match".
    v8_options="$(node --v8-options)"
    if grep -q -- '--experimental-wasm-extended-const' <<<"$v8_options"; then
        node_flags+=(--experimental-wasm-extended-const)
    fi
    node "${node_flags[@]}" "$JS/test/run-components.mjs" "${files[@]}" \
        || die "component checks failed in node (jco transpile)"
fi
step "done in $(elapsed "$T0")"
