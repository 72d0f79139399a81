# Sourced by the strategy build scripts. `check_component FILE pure|wasi` asks Harbor itself
# (`harbor strategy check`, a debug build made here if needed) whether it loads FILE: Harbor
# alone decides what a strategy may import (its own interfaces and WASI 0.2) and refuses
# anything else, naming the imports. On top of that rule, a pure build must import no WASI
# (Harbor's cheap path) and a default build must import some (the sandbox). The check compiles
# through Harbor's compile cache, so Harbor's own first load of the file is then instant.

check_component() { # FILE pure|wasi
    local file="$1" kind="$2" root harbor report imports
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    harbor="${HARBOR:-}"
    if [ -z "$harbor" ]; then
        (cd "$root" && cargo build -q -p harbor) || { echo "check_component: building harbor failed" >&2; return 1; }
        harbor="${CARGO_TARGET_DIR:-$root/target}/debug/harbor"
        case "$harbor" in /*) ;; *) harbor="$root/$harbor" ;; esac
    fi
    if ! report="$("$harbor" strategy check --picks 20 "$file" 2>&1)"; then
        printf '%s\n' "$report" >&2
        echo "check_component: Harbor refuses $(basename "$file") (above)" >&2
        return 1
    fi
    imports="$(sed -n 's/^imports: *//p' <<<"$report")"
    echo "    $(basename "$file") imports: $imports"
    case "$kind" in
        pure) if [[ "$imports" == *wasi:* ]]; then
                echo "check_component: $(basename "$file") should import no WASI, but imports: $imports" >&2
                return 1
            fi ;;
        wasi) if [[ "$imports" != *wasi:* ]]; then
                echo "check_component: $(basename "$file") should import WASI 0.2, but imports: $imports" >&2
                return 1
            fi ;;
        *) echo "check_component: kind must be pure or wasi, not '$kind'" >&2; return 1 ;;
    esac
}
