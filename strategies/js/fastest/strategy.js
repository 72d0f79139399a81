// Harbor strategy "js-fastest": prefer the backend with the lowest recent connect latency.
//
// Built with componentize-js against /work/main/wit/strategy.wit, world `strategy`
// (see ../README.md). Exports are the world's functions in camelCase.
//
// Among healthy backends (stats[4*i+1] == 0):
//   1. backends whose last connect failed (stats[4*i+3] > 0) are used only if every healthy
//      backend has failed its last connect;
//   2. a backend whose latency is still unknown (stats[4*i+2] == 0) is explored first;
//   3. otherwise every backend whose latency EWMA is within the band of the fastest one
//      (best + max(best * bandPercent / 100, bandMicros)) counts as equally fast, so a
//      near-tie does not pile every connection onto a single backend;
//   4. ties go to the fewest active connections per unit of weight,
//   5. then to the first one in an order rotated by the host's `sequence`.
//
// Config (optional, comma separated): `band-percent=N,band-micros=N` (defaults 10 and 100).
// Uses no WASI: no clock, no random, no console.

const NAME = 'js-fastest';

let bandPercent = 10;
let bandMicros = 100;

// Weights by backend index, from set-backends. Missing or zero weights count as 1.
let weights = [];

function weightOf(i) {
  const w = weights[i];
  return w > 0 ? w : 1;
}

function parseConfig(config) {
  let percent = 10;
  let micros = 100;
  for (const part of config.split(',')) {
    const item = part.trim();
    if (item === '') continue;
    const eq = item.indexOf('=');
    const key = eq < 0 ? item : item.slice(0, eq).trim();
    const text = eq < 0 ? '' : item.slice(eq + 1).trim();
    if (!/^[0-9]{1,9}$/.test(text)) {
      throw `js-fastest: bad config item '${item}': expected ${key}=<non-negative integer>`;
    }
    const value = Number(text);
    if (key === 'band-percent') percent = value;
    else if (key === 'band-micros') micros = value;
    else throw `js-fastest: unknown config key '${key}' (known: band-percent, band-micros)`;
  }
  return [percent, micros];
}

// result<strategy-info, string>: returning is ok, throwing a string is err.
export function init(config) {
  const [percent, micros] = parseConfig(config);
  bandPercent = percent;
  bandMicros = micros;
  return { name: NAME, wantsReports: false };
}

export function setBackends(generation, backends) {
  const next = new Array(backends.length).fill(1);
  for (const b of backends) {
    if (b.index < next.length) next[b.index] = b.weight > 0 ? b.weight : 1;
  }
  weights = next;
}

// The choice itself. `sequence` is a BigInt or a number; returns an index or undefined.
function choose(sequence, stats) {
  const n = (stats.length / 4) | 0;
  if (n === 0) return undefined;

  // Pass 1: which class of backend is eligible at all.
  let anyHealthy = false;
  let anyClean = false; // healthy and last connect did not fail
  for (let i = 0; i < n; i++) {
    if (stats[4 * i + 1] !== 0) continue;
    anyHealthy = true;
    if (stats[4 * i + 3] === 0) {
      anyClean = true;
      break;
    }
  }
  if (!anyHealthy) return undefined;

  // Pass 2: among eligible ones, unknown latency first, else the fastest latency.
  let anyUnknown = false;
  let best = Infinity;
  for (let i = 0; i < n; i++) {
    if (stats[4 * i + 1] !== 0) continue;
    if (anyClean && stats[4 * i + 3] !== 0) continue;
    const lat = stats[4 * i + 2];
    if (lat === 0) {
      anyUnknown = true;
      break;
    }
    if (lat < best) best = lat;
  }
  const limit = anyUnknown ? 0 : best + Math.max((best * bandPercent) / 100, bandMicros);

  // Pass 3: in rotated order, the least loaded (active per weight) of the fast ones.
  const start = typeof sequence === 'bigint' ? Number(sequence % BigInt(n)) : sequence % n;
  let pick = -1;
  let pickActive = 0;
  let pickWeight = 1;
  for (let k = 0; k < n; k++) {
    let i = start + k;
    if (i >= n) i -= n;
    if (stats[4 * i + 1] !== 0) continue;
    if (anyClean && stats[4 * i + 3] !== 0) continue;
    if (stats[4 * i + 2] > limit) continue;
    const active = stats[4 * i];
    const w = weightOf(i);
    // active / w < pickActive / pickWeight, without division.
    if (pick < 0 || active * pickWeight < pickActive * w) {
      pick = i;
      pickActive = active;
      pickWeight = w;
    }
  }
  return pick < 0 ? undefined : pick;
}

export function pick(conn, stats) {
  return choose(conn.sequence, stats);
}

export function report(outcome) {
  // wants-reports is false, so Harbor never calls this.
}
