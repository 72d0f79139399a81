"""Harbor strategy "py-p2c": weighted power of two choices.

For every pick, two distinct healthy backends are drawn at random, each with a
probability proportional to its weight (from `set-backends`), and the one with
fewer active connections per unit of weight wins (ties go to the first draw, so
idle backends share by weight). Randomness comes only from the host's per-pick `seed`,
so the component needs no WASI random source and stays deterministic for a
given (seed, stats) pair.

Built with componentize-py against /work/main/wit/strategy.wit, world
`strategy` (see ../README.md). componentize-py 0.25 (the pinned version) expects
the exports to be implemented by a class named `WitWorld` in the app module, and
generates the `wit_world` package imported below at build time.
"""

from typing import List, Optional

import wit_world
from wit_world.imports import types

NAME = "py-p2c"
MASK64 = (1 << 64) - 1

# Module state, rebuilt by every `set-backends` (an instance may be replaced at
# any time, and Harbor always calls set-backends before the first pick).
_weights: List[int] = []


def _splitmix64(x: int) -> int:
    """One step of SplitMix64: a good 64-bit mix of `x` (already advanced)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
    return x ^ (x >> 31)


def _weight(i: int) -> int:
    """Weight of backend `i`, at least 1 (1 if the host sent more stats than backends)."""
    if i < len(_weights):
        w = _weights[i]
        return w if w > 0 else 1
    return 1


def _draw(cands: List[int], total: int, r: int, skip: int) -> int:
    """Pick one of `cands` (except `skip`) with probability weight/total; r is random."""
    target = r % total
    for i in cands:
        if i == skip:
            continue
        w = _weight(i)
        if target < w:
            return i
        target -= w
    # Unreachable when total is the sum over cands minus skip; be safe anyway.
    for i in cands:
        if i != skip:
            return i
    return cands[0]


def choose(seed: int, stats: List[int]) -> Optional[int]:
    """The strategy itself, free of binding types so it can be tested in plain CPython."""
    n = len(stats) // 4
    healthy = [i for i in range(n) if stats[4 * i + 1] == 0]
    if not healthy:
        return None
    if len(healthy) == 1:
        return healthy[0]

    total = 0
    for i in healthy:
        total += _weight(i)

    s = (seed + 0x9E3779B97F4A7C15) & MASK64
    a = _draw(healthy, total, _splitmix64(s), -1)
    s = (s + 0x9E3779B97F4A7C15) & MASK64
    b = _draw(healthy, total - _weight(a), _splitmix64(s), a)

    # Compare active/weight without division: a_act * w_b vs b_act * w_a.
    wa, wb = _weight(a), _weight(b)
    la = stats[4 * a] * wb
    lb = stats[4 * b] * wa
    # Ties go to the first draw, which is itself weighted: at equal load (e.g. idle) the
    # shares stay proportional to the weights.
    if lb < la:
        return b
    return a


class WitWorld(wit_world.WitWorld):
    def init(self, config: str) -> types.StrategyInfo:
        # No options: any config string is accepted and ignored.
        return types.StrategyInfo(name=NAME, wants_reports=False)

    def set_backends(self, generation: int, backends: List[types.BackendInfo]) -> None:
        global _weights
        weights = [1] * len(backends)
        for b in backends:
            if 0 <= b.index < len(weights):
                weights[b.index] = b.weight if b.weight > 0 else 1
        _weights = weights

    def pick(self, conn: types.Connection, stats: List[int]) -> Optional[int]:
        return choose(conn.seed, stats)

    def report(self, outcome: types.ConnectionOutcome) -> None:
        # wants-reports is false, so Harbor never calls this.
        pass
