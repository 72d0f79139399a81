// Run the polyglot Harbor strategy components in node through `jco transpile`, check a few
// picks and time `pick`. The timings are for jco-transpiled JS + core wasm on node's V8,
// not for Harbor's wasmtime host.
//
// Usage: node strategies/js/test/run-components.mjs [WASM ...]
// (defaults: strategies/py_p2c.wasm and strategies/js_fastest.wasm). Transpiled output goes
// to target/polyglot-jco/. Prints "N passed, N failed"; exits 1 on any failure.
import { execFileSync } from 'node:child_process';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const strategies = resolve(here, '..', '..');
const root = resolve(strategies, '..');
const jco = join(strategies, 'js', 'node_modules', '.bin', 'jco');

let passed = 0;
let failed = 0;
function check(label, ok, detail = '') {
  if (ok) {
    passed++;
    console.log(`  ok   ${label}`);
  } else {
    failed++;
    console.log(`  FAIL ${label} ${detail}`);
  }
}

const conn = (sequence, seed) => ({
  sequence: BigInt(sequence),
  seed: BigInt.asUintN(64, BigInt(seed)),
  clientIp: { tag: 'ipv4', val: 0x7f000001 },
  clientPort: 40000,
  attempt: 0,
});
const flat = (rows) => new Uint32Array(rows.flat());
const backends = (weights) =>
  weights.map((weight, index) => ({ index, address: `127.0.0.1:${9001 + index}`, weight }));
const mix = (s) => BigInt.asUintN(64, BigInt(s) * 0x9e3779b97f4a7c15n);

async function load(wasm) {
  const name = basename(wasm, '.wasm');
  const out = join(root, 'target', 'polyglot-jco', name);
  let t = performance.now();
  execFileSync(jco, ['transpile', wasm, '-o', out, '--quiet'], { stdio: 'inherit' });
  const tTranspile = performance.now() - t;
  t = performance.now();
  // Each import of a fresh URL is a fresh instance (module state starts over).
  const mod = await import(`${pathToFileURL(join(out, `${name}.js`)).href}?t=${Date.now()}`);
  const tLoad = performance.now() - t;
  return { mod, tTranspile, tLoad };
}

async function fresh(wasm, weights, config = '') {
  const { mod } = await load(wasm);
  const info = mod.init(config);
  mod.setBackends(1n, backends(weights));
  return { mod, info };
}

async function test(wasm) {
  console.log(`== ${basename(wasm)}`);
  const { mod, tTranspile, tLoad } = await load(wasm);
  console.log(`  jco transpile: ${(tTranspile / 1000).toFixed(1)} s, import (compile + instantiate): ${tLoad.toFixed(0)} ms`);
  const info = mod.init('');
  mod.setBackends(1n, backends([1, 1, 1, 1]));
  check(`init -> ${JSON.stringify(info)}`, (info.name === 'py-p2c' || info.name === 'js-fastest') && info.wantsReports === false);

  const only2 = flat([[0, 1, 100, 1], [0, 2, 100, 0], [5, 0, 900, 0], [0, 3, 0, 0]]);
  const got2 = new Set();
  for (let s = 0; s < 50; s++) got2.add(mod.pick(conn(s, mix(s)), only2));
  check('only backend 2 healthy -> always 2', got2.size === 1 && got2.has(2), [...got2].join(','));

  const none = flat([[0, 1, 100, 1], [0, 2, 100, 0], [0, 3, 900, 0], [0, 3, 0, 0]]);
  const gotNone = new Set();
  for (let s = 0; s < 20; s++) gotNone.add(mod.pick(conn(s, mix(s)), none));
  check('no backend healthy -> none', gotNone.size === 1 && gotNone.has(undefined), [...gotNone].join(','));

  const rows = [[10, 0, 800, 0], [2, 0, 300, 0], [7, 0, 310, 0], [0, 0, 5000, 0]];
  const counts = [0, 0, 0, 0];
  for (let s = 0; s < 400; s++) counts[mod.pick(conn(s, mix(s)), flat(rows))]++;
  console.log(`  all healthy, active=[10,2,7,0] latency=[800,300,310,5000]: picks over 400 = [${counts}]`);
  if (info.name === 'py-p2c') {
    check('p2c never picks the most loaded', counts[0] === 0, `[${counts}]`);
    const { mod: w } = await fresh(wasm, [3, 1]);
    const c = [0, 0];
    for (let s = 0; s < 400; s++) c[w.pick(conn(s, mix(s + 1)), flat([[0, 0, 0, 0], [0, 0, 0, 0]]))]++;
    console.log(`  weights [3,1], equal load: picks over 400 = [${c}]`);
    check('p2c shares by weight at equal load', c[0] >= 250 && c[0] <= 350, `[${c}]`);
  } else {
    check('fastest picks the fast, less loaded backend', counts.join() === '0,400,0,0', `[${counts}]`);
    const { mod: bad } = await load(wasm);
    let err;
    try {
      bad.init('nope=1');
    } catch (e) {
      err = e;
    }
    // jco surfaces a result err as a thrown ComponentError whose payload is the string.
    check('bad config -> err', err !== undefined, String(err));
    if (err) console.log(`    err: ${err.payload ?? err}`);
  }

  for (const n of [4, 16, 64]) {
    const { mod: m } = await fresh(wasm, new Array(n).fill(1));
    const stats = flat(Array.from({ length: n }, (_, i) => [i % 7, 0, 100 + 13 * i, 0]));
    const conns = Array.from({ length: 1000 }, (_, s) => conn(s, mix(s)));
    for (let s = 0; s < 2000; s++) m.pick(conns[s % 1000], stats); // warm up
    const iters = 20000;
    const t = performance.now();
    for (let s = 0; s < iters; s++) m.pick(conns[s % 1000], stats);
    const us = ((performance.now() - t) * 1000) / iters;
    console.log(`  pick, ${String(n).padStart(2)} backends, jco transpile on node ${process.version}: ${us.toFixed(2)} us/call`);
  }
}

const files = process.argv.slice(2);
const wasms = files.length
  ? files.map((f) => resolve(f))
  : [join(strategies, 'py_p2c.wasm'), join(strategies, 'js_fastest.wasm')];
for (const wasm of wasms) {
  try {
    await test(wasm);
  } catch (e) {
    check(`${basename(wasm)} runs`, false, e?.stack ?? String(e));
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
