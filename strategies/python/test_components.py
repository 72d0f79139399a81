"""Load the polyglot Harbor strategy components in wasmtime (wasmtime-py) and check them.

Usage: target/polyglot-venv/bin/python strategies/python/test_components.py [WASM ...]
(defaults: strategies/py_p2c.wasm and strategies/js_fastest.wasm). Run by
strategies/build-polyglot.sh after building. Prints one line per check and a closing
"N passed, N failed" line; exits non-zero on any failure.

Every check runs on a fresh instance, the way Harbor makes them: init, set-backends, pick.
"""

import os
import sys
import time

import wasmtime
from wasmtime.component import Component, Linker, Record

HERE = os.path.dirname(os.path.abspath(__file__))
STRATEGIES = os.path.dirname(HERE)

passed = 0
failed = 0


def check(label, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"  ok   {label}")
    else:
        failed += 1
        print(f"  FAIL {label} {detail}")


def wasmtime_version():
    try:
        from importlib.metadata import version
        return version("wasmtime")
    except Exception:
        return "?"


def rec(**fields):
    r = Record()
    for k, v in fields.items():
        setattr(r, k.replace("_", "-"), v)
    return r


def conn(sequence, seed):
    # wasmtime-py passes a variant whose cases have distinct Python types untagged:
    # ip-address ipv4(u32) is a plain int here.
    return rec(sequence=sequence, seed=seed, client_ip=0x7F000001,
               client_port=40000, attempt=0)


def stats_of(rows):
    """rows: (active, state, latency_us, failures) per backend -> flat list."""
    out = []
    for r in rows:
        out.extend(r)
    return out


class Instance:
    def __init__(self, engine, component, weights, config=""):
        self.store = wasmtime.Store(engine)
        linker = Linker(engine)
        self.inst = linker.instantiate(self.store, component)
        self.f_init = self.inst.get_func(self.store, "init")
        self.f_set = self.inst.get_func(self.store, "set-backends")
        self.f_pick = self.inst.get_func(self.store, "pick")
        self.info = self.call(self.f_init, config)
        backends = [rec(index=i, address=f"127.0.0.1:{9001 + i}", weight=w)
                    for i, w in enumerate(weights)]
        self.call(self.f_set, 1, backends)

    def call(self, f, *args):
        r = f(self.store, *args)
        f.post_return(self.store)
        return r

    def pick(self, seq, seed, stats):
        return self.call(self.f_pick, conn(seq, seed), stats)


def test(path):
    print(f"== {os.path.relpath(path, STRATEGIES)}")
    engine = wasmtime.Engine()
    t0 = time.perf_counter()
    component = Component.from_file(engine, path)
    t_compile = time.perf_counter() - t0

    imports = component.type.imports(engine)
    exports = component.type.exports(engine)
    print(f"  compile (wasmtime-py {wasmtime_version()}, cranelift): {t_compile:.2f} s")
    print(f"  imports: {sorted(imports)}")
    print(f"  exports: {sorted(exports)}")
    check("no WASI imports", not any(k.startswith("wasi:") for k in imports), str(sorted(imports)))

    t0 = time.perf_counter()
    inst = Instance(engine, component, [1, 1, 1, 1])
    t_inst = time.perf_counter() - t0
    print(f"  instantiate + init + set-backends: {t_inst * 1000:.1f} ms")
    name = getattr(inst.info, "name", None)
    check(f"init returns a strategy-info (name={name!r})",
          name in ("py-p2c", "js-fastest") and getattr(inst.info, "wants-reports") is False,
          repr(inst.info.__dict__ if hasattr(inst.info, "__dict__") else inst.info))

    # Only backend 2 healthy (others cooling-down, draining, unhealthy).
    only2 = stats_of([(0, 1, 100, 1), (0, 2, 100, 0), (5, 0, 900, 0), (0, 3, 0, 0)])
    got = {inst.pick(s, (s * 7919) ** 3 & (2**64 - 1), only2) for s in range(50)}
    check("only backend 2 healthy -> always 2", got == {2}, f"got {got}")

    none = stats_of([(0, 1, 100, 1), (0, 2, 100, 0), (0, 3, 900, 0), (0, 3, 0, 0)])
    got = {inst.pick(s, s * 31, none) for s in range(20)}
    check("no backend healthy -> none", got == {None}, f"got {got}")

    empty_got = inst.pick(0, 0, [])
    check("empty backend list -> none", empty_got is None, f"got {empty_got}")

    # All healthy, different load and latency.
    rows = [(10, 0, 800, 0), (2, 0, 300, 0), (7, 0, 310, 0), (0, 0, 5000, 0)]
    counts = [0, 0, 0, 0]
    for s in range(400):
        counts[inst.pick(s, (s * 0x9E3779B97F4A7C15) & (2**64 - 1), stats_of(rows))] += 1
    print(f"  all healthy, active={[r[0] for r in rows]} latency={[r[2] for r in rows]}: "
          f"picks over 400 = {counts}")
    if name == "py-p2c":
        # P2C: the most loaded backend (10 active) loses every duel it is in.
        check("p2c never picks the most loaded backend", counts[0] == 0, f"{counts}")
        check("p2c favours the least loaded", counts[3] > counts[2] and counts[1] > counts[2],
              f"{counts}")
    else:
        # Fastest: 300 and 310 us are within the band, so the less loaded of them (1) wins.
        check("fastest picks the fast, less loaded backend", counts == [0, 400, 0, 0],
              f"{counts}")
        unk = stats_of([(3, 0, 300, 0), (1, 0, 0, 0), (0, 0, 0, 0), (0, 0, 200, 0)])
        got = {inst.pick(s, 0, unk) for s in range(10)}
        check("fastest explores unknown latency first, fewest active", got == {2}, f"{got}")
        tie = stats_of([(0, 0, 0, 0), (0, 0, 0, 0), (0, 1, 0, 0), (0, 0, 0, 0)])
        got = [inst.pick(s, 0, tie) for s in range(6)]
        check("fastest rotates ties by sequence", got == [0, 1, 3, 3, 0, 1], f"{got}")
        fail = stats_of([(0, 0, 100, 2), (9, 0, 900, 0)])
        got = inst.pick(0, 0, fail)
        check("fastest avoids a backend whose last connect failed", got == 1, f"{got}")
        bad = Instance(engine, component, [1])
        # wasmtime-py returns result<strategy-info, string> untagged: err is a str.
        r = bad.call(bad.f_init, "band-percent=abc")
        check("bad config -> err(string)", isinstance(r, str), f"got {r!r}")
        print(f"    err: {r}")
        r = bad.call(bad.f_init, "band-percent=25,band-micros=0")
        check("good config -> ok", getattr(r, "name", None) == "js-fastest", f"got {r!r}")

    # Weights: p2c should send ~3x more to a weight-3 backend at equal load.
    if name == "py-p2c":
        w = Instance(engine, component, [3, 1])
        c = [0, 0]
        flat = stats_of([(0, 0, 0, 0), (0, 0, 0, 0)])
        for s in range(400):
            c[w.pick(s, (s * 0xD1B54A32D192ED03 + 12345) & (2**64 - 1), flat)] += 1
        # With two healthy backends both are always drawn; at equal load the first
        # (weighted) draw wins, so the shares follow the weights: about 300/100.
        print(f"  weights [3,1], equal load: picks over 400 = {c}")
        check("p2c shares by weight at equal load", 250 <= c[0] <= 350, f"{c}")
        flat3 = stats_of([(0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), (0, 3, 0, 0)])
        w3 = Instance(engine, component, [4, 1, 1, 1])
        c3 = [0, 0, 0, 0]
        for s in range(600):
            c3[w3.pick(s, (s * 0xD1B54A32D192ED03 + 7) & (2**64 - 1), flat3)] += 1
        print(f"  weights [4,1,1,1], backend 3 unhealthy, equal load: picks over 600 = {c3}")
        check("p2c never picks the unhealthy backend", c3[3] == 0, f"{c3}")

    # Rough per-call cost in wasmtime-py. Most of it is wasmtime-py's ctypes marshalling of
    # the arguments in Python; the 1-backend call is a baseline for that overhead.
    for nb in (1, 16):
        big = stats_of([(i % 7, 0, 100 + i, 0) for i in range(nb)])
        instn = Instance(engine, component, [1] * nb)
        n = 2000
        t0 = time.perf_counter()
        for s in range(n):
            instn.pick(s, s * 0x9E3779B97F4A7C15 & (2**64 - 1), big)
        dt = (time.perf_counter() - t0) / n
        print(f"  pick, {nb:2} backends, wasmtime-py {wasmtime_version()} "
              f"(incl. Python-side marshalling): {dt * 1e6:.1f} us/call")


def main():
    paths = sys.argv[1:] or [os.path.join(STRATEGIES, "py_p2c.wasm"),
                             os.path.join(STRATEGIES, "js_fastest.wasm")]
    for p in paths:
        try:
            test(p)
        except Exception as e:  # a load/instantiate failure is a failed check, not a crash
            check(f"{os.path.basename(p)} runs", False, f"{type(e).__name__}: {e}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
