// sharpen's status page: polls /ui/api/summary and draws it. No dependencies, no CDN.
// Everything from the server is written with textContent (never parsed as HTML).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let refreshMs = 2000;
let armed = null; // {tenant, until}: the roll back button waiting for its confirming click
let last = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") Object.assign(el.style, v); // CSSOM, which the page's CSP allows (style attributes it does not)
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

const fmt = {
  n(v, d = 0) { return v === null || v === undefined ? "—" : Number(v).toLocaleString(undefined, {maximumFractionDigits: d, minimumFractionDigits: d}); },
  pct(v, d = 1) { return v === null || v === undefined ? "—" : (100 * v).toFixed(d) + "%"; },
  secs(v) {
    if (v === null || v === undefined) return "—";
    if (v < 1) return (v * 1000).toFixed(v < 0.01 ? 2 : 0) + " ms";
    return v.toFixed(2) + " s";
  },
  time(t) { return t ? new Date(t * 1000).toLocaleString() : "—"; },
  score(v) { return v === null || v === undefined ? "—" : Number(v).toFixed(3); },
};

function table(head, rows, numeric = []) {
  if (!rows.length) return h("div", {class: "empty"}, "nothing yet");
  return h("table", {},
    h("thead", {}, h("tr", {}, head.map((c, i) => h("th", {class: numeric.includes(i) ? "num" : null}, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) => h("td", {class: numeric.includes(i) ? "num" : null}, c))))));
}

function put(id, ...nodes) { $(id).replaceChildren(...nodes); }

// -- charts ----------------------------------------------------------------------------------

function lineChart(points, color, {area = false} = {}) {
  const W = 480, H = 150, L = 40, B = 18, T = 8, R = 6;
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img"});
  const vals = points.map((p) => p.y).filter((y) => y !== null);
  const max = Math.max(...vals, 0) || 1;
  const x = (i) => L + (i / Math.max(points.length - 1, 1)) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  for (const f of [0, 0.5, 1]) {
    svg.append(s("line", {x1: L, x2: W - R, y1: y(max * f), y2: y(max * f), class: "axis"}));
    const t = s("text", {x: L - 4, y: y(max * f) + 3, "text-anchor": "end"});
    t.textContent = max * f >= 10 ? (max * f).toFixed(0) : (max * f).toPrecision(2);
    svg.append(t);
  }
  const ago = s("text", {x: L, y: H - 4}); ago.textContent = "-" + Math.round(points.length * 10 / 60) + " min";
  const now = s("text", {x: W - R, y: H - 4, "text-anchor": "end"}); now.textContent = "now";
  svg.append(ago, now);
  let d = "", started = false;
  points.forEach((p, i) => {
    if (p.y === null) { started = false; return; }
    d += (started ? "L" : "M") + x(i).toFixed(1) + "," + y(p.y).toFixed(1);
    started = true;
  });
  if (area && points.length) {
    const a = `M${x(0)},${y(0)}` + points.map((p, i) => `L${x(i).toFixed(1)},${y(p.y || 0).toFixed(1)}`).join("") +
      `L${x(points.length - 1)},${y(0)}Z`;
    svg.append(s("path", {d: a, fill: color, "fill-opacity": 0.15, stroke: "none"}));
  }
  if (d) svg.append(s("path", {d, fill: "none", stroke: color, "stroke-width": 1.8, "vector-effect": "non-scaling-stroke"}));
  return svg;
}

function histogram(bins, edges) {
  const W = 300, H = 150, L = 30, B = 20, T = 8, R = 4;
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img"});
  const max = Math.max(...bins, 1);
  const bw = (W - L - R) / bins.length;
  svg.append(s("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  const top = s("text", {x: L - 4, y: T + 6, "text-anchor": "end"}); top.textContent = max; svg.append(top);
  bins.forEach((c, i) => {
    const hgt = (c / max) * (H - T - B);
    // green when sure, amber to red when unsure
    const hue = 140 - 140 * (i / (bins.length - 1));
    const r = s("rect", {x: L + i * bw + 1, y: H - B - hgt, width: bw - 2, height: hgt, rx: 2, fill: `hsl(${hue} 55% 50%)`});
    const tip = s("title"); tip.textContent = `${edges[i].toFixed(1)}–${edges[i + 1].toFixed(1)}: ${c}`;
    r.append(tip); svg.append(r);
  });
  for (const [i, lab] of [[0, "0 sure"], [bins.length, "1 unsure"]]) {
    const t = s("text", {x: L + i * bw, y: H - 5, "text-anchor": i ? "end" : "start"}); t.textContent = lab; svg.append(t);
  }
  return svg;
}

function bar(frac, color) {
  const f = Math.max(0, Math.min(1, frac || 0));
  return h("div", {class: "bar"}, h("span", {style: {width: `${(100 * f).toFixed(1)}%`, ...(color ? {background: color} : {})}}));
}

function ciBar(row) {
  const el = h("div", {class: "ci", title: `${fmt.pct(row.ci_low)} to ${fmt.pct(row.ci_high)}`});
  el.append(h("div", {class: "range", style: {left: `${100 * row.ci_low}%`, width: `${100 * (row.ci_high - row.ci_low)}%`}}));
  el.append(h("div", {class: "point", style: {left: `${100 * row.accuracy}%`}}));
  return el;
}

// -- sections --------------------------------------------------------------------------------

function renderKpis(t) {
  const kpi = (label, value, unit) => h("div", {class: "kpi", id: "kpi-" + label.toLowerCase().replace(/\W+/g, "-")}, h("div", {class: "label"}, label),
    h("div", {class: "value"}, value, unit ? h("small", {}, unit) : null));
  put("kpis",
    kpi("Requests / s", fmt.n(t.rate_per_s, 2), "last min"),
    kpi("Latency p50", fmt.secs(t.latency_s.p50)),
    kpi("Latency p90", fmt.secs(t.latency_s.p90)),
    kpi("Latency p99", fmt.secs(t.latency_s.p99)),
    kpi("Requests", fmt.n(t.requests), ` in ${Math.round(t.window_s / 60)} min`),
    kpi("Errors", fmt.n(t.errors), t.requests ? fmt.pct(t.errors / t.requests) : ""));
  $("traffic-window").textContent = `last ${Math.round(t.window_s / 60)} min, 10 s buckets`;
  put("chart-rate", lineChart(t.series.map((p) => ({y: p.rate_per_s})), "#2f6fde", {area: true}));
  put("chart-latency", lineChart(t.series.map((p) => ({y: p.p90_s})), "#12a89d"));
  const u = t.uncertainty;
  $("unc-note").textContent = u.count ? `${u.count} answers, mean ${u.mean.toFixed(2)}` : "no strategy answers yet";
  put("chart-unc", histogram(u.bins, u.edges));
  const rows = t.strategies.map((r) => [
    h("strong", {}, r.strategy), fmt.n(r.requests), h("div", {}, bar(r.share)), fmt.pct(r.share),
    fmt.n(r.prompt_tokens), fmt.n(r.completion_tokens), fmt.n(r.tokens_per_request, 0),
    fmt.n(r.upstream_calls), fmt.n(r.calls_per_request, 1), fmt.secs(r.p50_s), fmt.n(r.errors)]);
  put("strategy-table", table(["strategy", "requests", "share", "", "prompt tokens", "completion tokens",
    "tokens / req", "upstream calls", "calls / req", "p50", "errors"], rows, [1, 3, 4, 5, 6, 7, 8, 9, 10]));
}

function renderEvals(ev) {
  if (!ev) {
    $("eval-title").textContent = "";
    put("eval-body", h("div", {class: "empty"}, "No eval report found. Run ", h("code", {}, "sharpen eval --out evals-out"),
      " (or set ui.eval_dirs)."));
    return;
  }
  $("eval-title").textContent = `${ev.title} · ${fmt.time(ev.written_at)}`;
  const rows = ev.rows.map((r) => {
    const vs = r.vs_baseline;
    return [h("strong", {}, r.strategy), fmt.n(r.items), fmt.pct(r.accuracy),
      `${fmt.pct(r.ci_low)} – ${fmt.pct(r.ci_high)}`, ciBar(r), fmt.n(r.tokens_per_item), fmt.n(r.calls_per_item, 1),
      fmt.n(r.wall_s_per_item, 1), vs ? `+${vs.other_only} / −${vs.base_only}, p = ${vs.p_value}` : "baseline"];
  });
  const plots = h("div", {class: "plots"}, ev.plots.map((p) =>
    h("img", {src: "/ui/evals/" + encodeURIComponent(p) + "?v=" + Math.round(ev.written_at), alt: p, loading: "lazy"})));
  put("eval-body", table(["strategy", "items", "accuracy", "95% CI", "", "tokens / item", "calls / item", "s / item",
    "vs baseline (McNemar)"], rows, [1, 2, 5, 6, 7]), plots);
}

function renderAdapters(a, viewer) {
  $("adapter-actions").hidden = !(viewer.admin && a.enabled);
  if (!a.enabled) {
    $("adapters-note").textContent = "adaptation is off (adapt.enabled)";
    put("adapter-table", h("div", {class: "empty"}, "no adapters"));
    put("adapter-history", h("div", {class: "empty"}, "—"));
    return;
  }
  $("adapters-note").textContent = a.base ? `base ${a.base}` : "";
  if (armed && armed.until < Date.now()) armed = null;
  const rows = a.versions.slice().reverse().map((v) => {
    let action = "";
    if (viewer.admin && v.status === "active") {
      const isArmed = armed && armed.tenant === v.tenant;
      action = h("button", {class: isArmed ? "armed" : null, "data-tenant": v.tenant, "data-adapter": v.name,
        onclick: () => rollback(v.tenant)}, isArmed ? "Confirm roll back" : "Roll back");
    }
    return [h("strong", {}, v.name), v.tenant, "v" + v.version, h("span", {class: "status " + v.status}, v.status),
      v.lineage.length ? v.lineage.join(" ← ") : h("span", {class: "muted"}, "base"),
      fmt.score(v.score_new), fmt.score(v.score_old), fmt.n(v.in_flight), fmt.time(v.created),
      v.note ? h("span", {class: "muted"}, v.note) : "", action];
  });
  put("adapter-table", table(["adapter", "tenant", "version", "status", "lineage (parents)", "gate: new",
    "gate: old", "in flight", "trained", "note", ""], rows, [5, 6, 7]));
  const hist = a.history.slice(0, 30).map((e) => [fmt.time(e.at), h("span", {class: "status " + e.event}, e.event),
    e.adapter, e.tenant, e.event === "promoted" ? `${fmt.score(e.score_new)} vs ${fmt.score(e.score_old)}` : (e.note || "")]);
  put("adapter-history", table(["when", "event", "adapter", "tenant", "detail"], hist));
}

async function rollback(tenant) {
  const msg = $("adapter-msg");
  if (!armed || armed.tenant !== tenant) {
    armed = {tenant, until: Date.now() + 5000};
    if (last) renderAdapters(last.adapters, last.viewer);
    return;
  }
  armed = null;
  const key = $("admin-key").value.trim();
  if (!key) { msg.className = "msg err"; msg.textContent = "Enter the admin key first."; return; }
  sessionStorage.setItem("sharpen-admin-key", key);
  msg.className = "msg"; msg.textContent = `Rolling back ${tenant}…`;
  try {
    const r = await fetch("/admin/adapters/rollback", {method: "POST", credentials: "omit",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + key}, body: JSON.stringify({tenant})});
    const body = await r.json();
    if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
    msg.className = "msg ok"; msg.textContent = `Rolled back ${body.rolled_back}; now serving ${body.now}.`;
  } catch (e) {
    msg.className = "msg err"; msg.textContent = "Roll back failed: " + e.message;
  }
  poll();
}

function renderMemory(m, viewer) {
  if (!m.enabled) { $("memory-note").textContent = "memory is off"; put("memory-table", h("div", {class: "empty"}, "—")); return; }
  $("memory-note").textContent = viewer.admin && m.entries !== undefined && m.entries !== null
    ? `${fmt.n(m.entries)} entries · ${m.embedder || ""}` : (m.ready ? "" : "warming up");
  const rows = m.tenants.map((t) => [h("strong", {}, t.tenant), fmt.n(t.entries), fmt.n(t.recalls), fmt.n(t.hits),
    h("div", {}, bar(t.hit_rate, "#12a89d")), fmt.pct(t.hit_rate)]);
  put("memory-table", table(["tenant", "entries", "recalls", "hits", "hit rate", ""], rows, [1, 2, 3, 5]));
}

function renderReplicas(r) {
  $("replicas").hidden = !r;
  $("memory").className = "card " + (r ? "span6" : "span12"); // a tenant sees no replicas: memory takes the row
  if (!r) return;
  let list = Array.isArray(r.replicas) ? r.replicas : Array.isArray(r.upstreams) ? r.upstreams : null;
  if (!list) list = [{url: r.upstream, ready: r.ready, status: r.status}];
  const keys = [...new Set(list.flatMap((x) => Object.keys(x)))].filter((k) => k !== "ready" && k !== "healthy");
  const rows = list.map((x) => {
    const up = x.ready !== undefined ? x.ready : x.healthy;
    return [h("span", {class: "status " + (up ? "ready" : "down")}, up ? "ready" : "down"),
      ...keys.map((k) => typeof x[k] === "object" && x[k] !== null ? JSON.stringify(x[k]) : (x[k] ?? "—"))];
  });
  put("replica-table", table(["state", ...keys], rows));
}

function render(d) {
  last = d;
  refreshMs = Math.max(500, (d.refresh_s || 2) * 1000);
  $("viewer").textContent = d.viewer.admin ? "admin" : "tenant " + d.viewer.tenant;
  renderKpis(d.traffic);
  renderEvals(d.evals);
  renderAdapters(d.adapters, d.viewer);
  renderMemory(d.memory, d.viewer);
  renderReplicas(d.replicas);
  $("updated").textContent = "updated " + new Date(d.generated_at * 1000).toLocaleTimeString();
  $("live").className = "live ok";
  $("banner").hidden = true;
  document.body.dataset.loaded = "1";
}

let timer = null;
async function poll() {
  clearTimeout(timer);
  try {
    const r = await fetch("/ui/api/summary", {credentials: "same-origin", cache: "no-store"});
    const body = await r.json();
    if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
    render(body);
  } catch (e) {
    $("live").className = "live stale";
    $("banner").hidden = false;
    $("banner").textContent = "Could not refresh: " + e.message;
  }
  timer = setTimeout(poll, refreshMs);
}

document.addEventListener("DOMContentLoaded", () => {
  const saved = sessionStorage.getItem("sharpen-admin-key");
  if (saved) $("admin-key").value = saved;
  poll();
});
