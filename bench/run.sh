#!/usr/bin/env bash
# Harbor side-by-side benchmark: direct (ceiling) vs HAProxy vs nginx-stream vs Harbor.
#
#   cargo xtask bench [options]        # builds strategies/*.wasm, then runs this
#   bash bench/run.sh --quick          # smoke test (~1.5 min)
#   bash bench/run.sh --help           # all options
#
# This script: installs missing tools (Debian packages), raises the descriptor
# limit, builds Harbor (release), makes a scratch directory, and hands over to
# bench/harness.py, which starts everything on loopback, measures, and writes
# bench/results/latest-<mode>.md and .json, once per CPU mode (one-core, all-cores)
# unless --mode is given; latest.md holds both. Every process it started is ended on
# exit, also on failure or Ctrl-C. See bench/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '[bench] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# Which targets? (only to decide whether Harbor must be built)
targets="direct,haproxy,nginx,harbor,harbor-rr,harbor-kernel"
build=1
modes=""
prev=""
for arg in "$@"; do
    case "$arg" in
        -h|--help)
            python3 bench/harness.py --help
            exit 0 ;;
        --targets=*) targets="${arg#--targets=}" ;;
        --no-build|--harbor|--harbor=*) build=0 ;;  # use the binary as it is
        --mode=*|--loadgen-cpus*|--server-cpus*) modes="given" ;;
    esac
    [[ "$prev" == "--targets" ]] && targets="$arg"
    [[ "$prev" == "--mode" ]] && modes="given"
    prev="$arg"
done

# 1. Tools, from Debian packages when missing.
need_pkgs=()
command -v haproxy >/dev/null 2>&1 || need_pkgs+=(haproxy)
command -v nginx >/dev/null 2>&1 || need_pkgs+=(nginx)
nginx_build="$(nginx -V 2>&1 || true)"
if ! grep -q -- '--with-stream ' <<<"$nginx_build" && [[ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]]; then
    need_pkgs+=(libnginx-mod-stream)
fi
command -v wrk >/dev/null 2>&1 || need_pkgs+=(wrk)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v taskset >/dev/null 2>&1 || need_pkgs+=(util-linux)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
if ((${#need_pkgs[@]})); then
    say "installing ${need_pkgs[*]}"
    SUDO=""
    [[ "$(id -u)" == 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq || die "apt-get update failed"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" \
        >/dev/null || die "apt-get install ${need_pkgs[*]} failed"
fi

# 2. Descriptors: as many as the hard limit allows (10 000 idle connections through
#    a proxy need ~20 000 descriptors in that one process).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# 3. Harbor (strategies are built by `cargo xtask build`, not here).
if [[ ",$targets," == *",harbor"* ]]; then
    [[ ",$targets," != *",harbor,"* || -f strategies/least_conn.wasm ]] \
        || die "strategies/least_conn.wasm is missing: run \`cargo xtask build\` (or use \`cargo xtask bench\`)"
    if ((build)); then
        say "cargo build --release -p harbor"
        cargo build --release -p harbor || die "building Harbor failed (use --targets direct,haproxy,nginx to skip it)"
        [[ -x target/release/harbor ]] || die "target/release/harbor was not produced"
    fi
fi

# 3b. The floor relay (bench/floor), only when asked for.
if [[ ",$targets," == *",floor,"* ]] && ((build)); then
    say "cargo build --release -p floor-relay"
    cargo build --release -p floor-relay || die "building the floor relay failed"
fi

# 4. Scratch directory; whatever the harness started is ended on exit, however it exits.
#    In RAM (tmpfs) when there is room: the backends then serve the 1 GiB file from memory
#    that cannot be paged out between rounds (a file on disk gets evicted when cold, and
#    the next download would measure the disk).
base=/tmp
if [[ -d /dev/shm && -w /dev/shm ]] \
    && (( $(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }' || echo 0) > 2 * 1024 * 1024 )); then
    base=/dev/shm
fi
WORK="$(mktemp -d "$base/harbor-bench.XXXXXX")"
HPID=""
cleanup() {
    local rc=$? pg
    if [[ -n "$HPID" ]] && kill -0 "$HPID" 2>/dev/null; then
        kill -TERM "$HPID" 2>/dev/null || true   # the harness stops its own servers
        for _ in $(seq 1 30); do kill -0 "$HPID" 2>/dev/null || break; sleep 0.5; done
    fi
    if [[ -s "$WORK/pids" ]]; then
        while read -r pg; do
            if [[ "$pg" =~ ^[0-9]+$ ]]; then kill -TERM -- "-$pg" 2>/dev/null || true; fi
        done <"$WORK/pids"
        sleep 1
        while read -r pg; do
            if [[ "$pg" =~ ^[0-9]+$ ]]; then kill -KILL -- "-$pg" 2>/dev/null || true; fi
        done <"$WORK/pids"
    fi
    rm -rf -- "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p bench/results
say "scratch directory $WORK"
# Both CPU modes unless one was asked for; latest.md then holds both reports.
# In the background so that a TERM to this script is handled at once (see cleanup).
if [[ -n "$modes" ]]; then
    python3 bench/harness.py --workdir "$WORK" "$@" &
    HPID=$!
    wait "$HPID"
else
    for mode in one-core all-cores; do
        python3 bench/harness.py --workdir "$WORK" --mode "$mode" "$@" &
        HPID=$!
        wait "$HPID"
    done
    cat bench/results/latest-one-core.md bench/results/latest-all-cores.md >bench/results/latest.md
    say "both modes: bench/results/latest.md (and latest-one-core.*, latest-all-cores.*)"
fi
