// Harbor's status page: polls /status once a second and draws it. No framework, no network
// beyond this admin listener; every value goes in with textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const HISTORY = 300; // points kept per backend: five minutes at one a second
const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#a371f7", "#f85149", "#39c5cf", "#ff7b72", "#e3b341"];
const SVG = "http://www.w3.org/2000/svg";

const history = new Map(); // "service|address" -> { last: {t, picks}, cps: [], active: [] }
let writes = "off";
let polling = false;
let seeded = false; // the server's history has been read (the first poll asks for it)

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function duration(ms) {
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

function latency(micros) {
  if (!micros) return "–";
  return micros < 1000 ? micros + " µs" : (micros / 1000).toFixed(1) + " ms";
}

function time(unixMs) {
  return unixMs ? new Date(unixMs).toLocaleTimeString() : "–";
}

function stateOf(b) {
  if (b.removing) return "removing";
  return b.state;
}

// Connections per second from the change in picks since the last poll.
function track(service, b, now) {
  const key = service + "|" + b.address;
  let h = history.get(key);
  if (!h) { h = { last: null, cps: [], active: [] }; history.set(key, h); }
  let cps = 0;
  if (h.last && now > h.last.t) cps = Math.max(0, (b.picks - h.last.picks) * 1000 / (now - h.last.t));
  h.last = { t: now, picks: b.picks };
  h.cps.push(cps);
  h.active.push(b.active);
  if (h.cps.length > HISTORY) { h.cps.shift(); h.active.shift(); }
  h.seen = now;
  return h;
}

// The server's last minutes of every backend: the charts start full, not empty.
function seed(samples) {
  for (const [key, series] of Object.entries(samples || {})) {
    if (history.has(key) || series.length === 0) continue;
    const h = { last: null, cps: [], active: [], seen: series[series.length - 1].t };
    for (const point of series) {
      let cps = 0;
      if (h.last && point.t > h.last.t) cps = Math.max(0, (point.picks - h.last.picks) * 1000 / (point.t - h.last.t));
      if (h.last) { h.cps.push(cps); h.active.push(point.active); }
      h.last = { t: point.t, picks: point.picks };
    }
    history.set(key, h);
  }
}

function checkText(b) {
  const c = b.last_check;
  if (!c) return "–";
  return `${c.passed ? "✓" : "✗"} ${c.detail} (${(c.took_micros / 1000).toFixed(1)} ms)`;
}

function checkTitle(b) {
  const parts = [];
  if (b.last_check) parts.push(`checked at ${time(b.last_check.at_unix_ms)}`);
  if (b.health_changed_unix_ms) parts.push(`health changed at ${time(b.health_changed_unix_ms)}`);
  if (b.dial_failures) parts.push(`${b.dial_failures} connect failures`);
  return parts.join(" · ");
}

function chart(title, series) {
  const width = 300, height = 90;
  const max = Math.max(1, ...series.flatMap(s => s.values));
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  // At least a minute wide, so a page opened a moment ago still draws readable lines.
  const span = Math.min(HISTORY, Math.max(60, ...series.map(s => s.values.length)));
  for (const s of series) {
    if (s.values.length < 2) continue;
    const step = width / (span - 1);
    const offset = width - step * (s.values.length - 1);
    const points = s.values.map((v, i) => `${(offset + i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 6)).toFixed(1)}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", s.color);
    line.setAttribute("stroke-width", "1.6");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(line);
  }
  const legend = el("div", { class: "legend" }, ...series.map(s => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = s.color;
    return el("span", {}, swatch, s.label);
  }));
  const peak = series.length ? Math.max(0, ...series.map(s => s.values[s.values.length - 1] || 0)) : 0;
  return el("div", { class: "chart", "data-points": String(Math.max(0, ...series.map(s => s.values.length))) },
    el("div", { class: "title", text: `${title} (max ${max.toFixed(max < 10 ? 1 : 0)}, now up to ${peak.toFixed(peak < 10 ? 1 : 0)})` }),
    svg, legend);
}

async function setDraining(service, address, draining, button) {
  button.disabled = true;
  const headers = { "Content-Type": "application/json" };
  const token = document.getElementById("token").value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  try {
    const response = await fetch(`/services/${encodeURIComponent(service)}/backends/${encodeURIComponent(address)}`, {
      method: "PATCH", headers, body: JSON.stringify({ state: draining ? "draining" : "ready" }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      showError(`${draining ? "drain" : "ready"} ${address}: ${response.status} ${body.error || response.statusText}`);
    } else {
      showError(null);
    }
  } catch (e) {
    showError(`${address}: ${e}`);
  }
  poll();
}

function showError(text) {
  const box = document.getElementById("error");
  box.hidden = !text;
  box.textContent = text || "";
}

function tile(k, v, cls) {
  return el("div", { class: "tile" }, el("div", { class: "k", text: k }), el("div", { class: "v " + (cls || ""), text: String(v) }));
}

function strategyBox(s) {
  const st = s.strategy;
  const list = el("dl", {},
    el("dt", { text: "name" }), el("dd", { class: "strategy-name", text: st.name }),
    el("dt", { text: "kind" }), el("dd", { text: st.kind }),
    el("dt", { text: "sha256" }), el("dd", { text: st.sha256 ? st.sha256.slice(0, 16) + "…" : "–" }),
    el("dt", { text: "source" }), el("dd", { text: st.source || "built in" }),
    el("dt", { text: "loaded" }), el("dd", { text: st.loaded_at_unix ? time(st.loaded_at_unix * 1000) : "–" }),
    el("dt", { text: "faults" }), el("dd", { class: "strategy-faults", text: String(st.faults) }),
    el("dt", { text: "previous" }), el("dd", { text: st.previous || "–" }),
    el("dt", { text: "world" }), el("dd", { text: st.world || "built in" }),
    st.shadow ? el("dt", { text: "shadow" }) : null,
    st.shadow ? el("dd", { class: "strategy-shadow", text: `${st.shadow.name}: ${st.shadow.agreement == null ? "–" : (st.shadow.agreement * 100).toFixed(1) + " %"} agreement over ${st.shadow.picks} picks, ${st.shadow.faults} faults` }) : null,
    st.loading ? el("dt", { text: "loading" }) : null,
    st.loading ? el("dd", { class: "strategy-loading", text: `${st.loading.source} (${(st.loading.elapsed_ms / 1000).toFixed(1)} s)` }) : null);
  const rows = (st.history || []).slice().reverse().map(h => el("tr", {},
    el("td", { text: time(h.at_unix_ms) }),
    el("td", { class: "outcome-" + h.outcome, text: h.outcome }),
    el("td", { text: h.strategy || "" }),
    el("td", { class: "hide-narrow", text: h.error || h.source })));
  const table = rows.length
    ? el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, el("tr", {},
        el("th", { text: "at" }), el("th", { text: "outcome" }), el("th", { text: "strategy" }), el("th", { class: "hide-narrow", text: "detail" }))),
        el("tbody", {}, ...rows)))
    : el("div", { class: "meta", text: "no swaps since start" });
  return el("div", { class: "strategy" },
    el("div", { class: "box" }, el("div", { class: "meta", text: "active strategy" }), list),
    el("div", { class: "box" }, el("div", { class: "meta", text: "swap history" }), table));
}

// HTTP mode: a backend's answers by class (2xx · 4xx · 5xx) and its time to first byte.
function httpCells(b) {
  const r = b.http ? b.http.responses : [0, 0, 0, 0, 0];
  return [
    el("td", { class: "num statuses" + (r[4] > 0 ? " warn" : ""), text: `${r[1]} · ${r[3]} · ${r[4]}`,
      title: `1xx ${r[0]}, 2xx ${r[1]}, 3xx ${r[2]}, 4xx ${r[3]}, 5xx ${r[4]}` }),
    el("td", { class: "num first-byte", text: b.http ? latency(b.http.first_byte_micros) : "–" }),
  ];
}

function serviceSection(s, now) {
  const tracked = s.backends.map(b => ({ b, h: track(s.name, b, now) }));
  const cps = tracked.reduce((sum, t) => sum + t.h.cps[t.h.cps.length - 1], 0);
  const healthy = s.backends.filter(b => b.state === "healthy" && !b.removing).length;
  const queued = s.backends.reduce((sum, b) => sum + b.queued, 0);
  const bytesTotal = s.backends.reduce((sum, b) => sum + b.bytes_to_backend + b.bytes_to_client, 0);
  // In HTTP mode every request is a pick: the counts are of requests.
  const http = s.mode === "http";
  const unit = http ? "requests" : "connections";
  const columns = ["backend", "source", "state", "health", "check", "active", "queued", http ? "req/s" : "conn/s", unit,
    ...(http ? ["2xx · 4xx · 5xx", "first byte"] : []), "to backend", "to client", "connect", "fails", "weight", ""];
  const head = el("tr", {}, ...columns.map((h, i) => el("th", { class: i >= 5 && i < columns.length - 1 ? "num" : "", text: h })));
  const rows = tracked.map(({ b, h }) => {
    const state = stateOf(b);
    let action = null;
    if (writes !== "off" && !b.removing) {
      const draining = b.state === "draining";
      const button = el("button", { class: "drain", text: draining ? "ready" : "drain" });
      button.addEventListener("click", () => setDraining(s.name, b.address, !draining, button));
      action = button;
    }
    return el("tr", { class: "backend", "data-address": b.address },
      el("td", { class: "address", text: (b.name ? `${b.name} (${b.address})` : b.address) + (b.backup ? " · backup" : "") }),
      el("td", { class: "source", text: b.source }),
      el("td", {}, el("span", { class: "pill state " + state, text: b.maint ? "maint" : state })),
      el("td", {}, el("span", { class: "pill health " + b.health, text: b.health })),
      el("td", { class: "check hide-narrow", text: checkText(b), title: checkTitle(b) }),
      el("td", { class: "num active", text: b.max_connections == null ? String(b.active) : `${b.active} / ${b.max_connections}`,
        title: b.max_connections == null ? "" : "active / max_connections" }),
      el("td", { class: "num queued" + (b.queued > 0 ? " warn" : ""), text: String(b.queued) }),
      el("td", { class: "num cps", text: h.cps[h.cps.length - 1].toFixed(1) }),
      el("td", { class: "num picks", text: String(b.picks) }),
      ...(http ? httpCells(b) : []),
      el("td", { class: "num to-backend", "data-value": String(b.bytes_to_backend), text: bytes(b.bytes_to_backend) }),
      el("td", { class: "num to-client", "data-value": String(b.bytes_to_client), text: bytes(b.bytes_to_client) }),
      el("td", { class: "num latency", text: latency(b.connect_latency_micros) }),
      el("td", { class: "num fails", text: String(b.dial_failures) }),
      el("td", { class: "num weight", text: String(b.weight) }),
      el("td", {}, action));
  });
  const colored = tracked.map((t, i) => ({ t, color: COLORS[i % COLORS.length] }));
  return el("section", { class: "service", "data-service": s.name },
    el("h2", { text: s.name }),
    el("div", { class: "meta", text: `${http ? "HTTP" : "TCP"}${s.certificates ? " over TLS" : ""} · listening on ${s.listen.join(", ") || "nothing"} · membership generation ${s.generation}` }),
    ...(s.certificates || []).map(c => {
      const days = Math.floor((c.not_after_unix * 1000 - now) / 86400000);
      return el("div", { class: "meta certificate" + (days < 14 ? " warn" : ""),
        text: `certificate ${c.names.join(", ") || c.file}: expires in ${days} days`, title: c.file });
    }),
    el("div", { class: "tiles" },
      tile("active connections", s.active_connections),
      tile("queued clients", queued, queued > 0 ? "warn" : ""),
      tile(`${unit} / s`, cps.toFixed(1)),
      tile("healthy backends", `${healthy} / ${s.backends.length}`, healthy === 0 ? "bad" : ""),
      tile("bytes relayed", bytes(bytesTotal)),
      tile("strategy faults", s.strategy.faults)),
    el("div", { class: "charts" },
      chart(`${unit} / s per backend`, colored.map(({ t, color }) => ({ label: t.b.name || t.b.address, color, values: t.h.cps }))),
      chart(`active ${unit} per backend`, colored.map(({ t, color }) => ({ label: t.b.name || t.b.address, color, values: t.h.active })))),
    el("div", { class: "table-wrap" }, el("table", { class: "backends" }, el("thead", {}, head), el("tbody", {}, ...rows))),
    strategyBox(s));
}

function render(status) {
  writes = status.writes;
  if (status.history) seed(status.history);
  document.getElementById("token-bar").hidden = writes !== "token";
  document.getElementById("process").textContent =
    `v${status.version} (${status.commit}) · pid ${status.pid} · up ${duration(status.now_unix_ms - status.started_at_unix_ms)}`;
  const badge = document.getElementById("state");
  badge.textContent = status.draining ? "draining" : "serving";
  badge.className = "badge " + (status.draining ? "bad" : "ok");
  const now = status.now_unix_ms;
  const sections = status.services.map(s => serviceSection(s, now));
  // Backends gone for a minute are forgotten.
  for (const [key, h] of history) if (now - h.seen > 60000) history.delete(key);
  document.getElementById("services").replaceChildren(...sections);
  document.body.setAttribute("data-updated", String(now));
}

async function poll() {
  if (polling) return;
  polling = true;
  try {
    const response = await fetch(seeded ? "/status" : "/status?history=1", { cache: "no-store" });
    if (!response.ok) throw new Error(`/status answered ${response.status}`);
    render(await response.json());
    seeded = true;
    if (document.getElementById("error").textContent.startsWith("cannot reach")) showError(null);
  } catch (e) {
    showError(`cannot reach Harbor: ${e.message || e}`);
  } finally {
    polling = false;
  }
}

poll();
setInterval(poll, POLL_MS);
