// Device page: charts (uPlot) fed by /live/device/<id> (SSE): points, events, device facts.
"use strict";
const device = decodeURIComponent(location.pathname.split("/").pop());
const statusEl = document.getElementById("status");
const MAX_POINTS = 2000;
const COLORS = ["#2457c5", "#d9480f", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#e03131",
                "#5c940d", "#1864ab", "#862e9c"];
const state = { meta: null, cols: null, charts: {}, lastSeq: 0, eventsSeq: 0 };
window.dashboard = state; // for debugging and the browser test

function chartWidth(id) {
  return Math.max(300, document.getElementById(id).clientWidth - 4);
}

function makeChart(id, names, opts) {
  const target = document.getElementById(id);
  target.replaceChildren();
  const series = [{}].concat(names.map((name, i) => ({
    label: name, stroke: (opts.colors || COLORS)[i % COLORS.length], width: 1.2,
    dash: opts.dashed && opts.dashed.includes(i) ? [6, 4] : undefined, spanGaps: false,
  })));
  const u = new uPlot({ width: chartWidth(id), height: 190, series, scales: { x: { time: true } },
                        legend: { live: false } }, [[]].concat(names.map(() => [])), target);
  return { u, id, names, extra: opts.extra || null };
}

function emptyCols() {
  return { t: [], seq: [], reward: [], ood: [], latency_us: [], action: [], summary: [] };
}

function append(cols, data) {
  for (const k of ["t", "seq", "reward", "ood", "latency_us"]) cols[k].push(...data[k]);
  for (const k of ["action", "summary"]) {
    const n = Math.max(cols[k].length, data[k].length);
    const before = cols.t.length - data.t.length;
    for (let i = 0; i < n; i++) {
      if (!cols[k][i]) cols[k][i] = new Array(before).fill(null);
      cols[k][i].push(...(data[k][i] || new Array(data.t.length).fill(null)));
    }
  }
  const drop = cols.t.length - MAX_POINTS;
  if (drop > 0) {
    for (const k of ["t", "seq", "reward", "ood", "latency_us"]) cols[k].splice(0, drop);
    for (const k of ["action", "summary"]) for (const c of cols[k]) c.splice(0, drop);
  }
}

function ensureCharts() {
  const m = state.meta, cols = state.cols, c = state.charts;
  const dims = cols.summary.length;
  const names = m.dims.length === dims ? m.dims : cols.summary.map((_, i) => "s" + i);
  document.getElementById("summary-title").textContent =
    m.labels.summary + (m.alg ? " (" + m.alg + ")" : "");
  if (!c.summary || c.summary.names.length !== dims) {
    if (dims === 0) {
      document.getElementById("chart-summary").replaceChildren(
        el("p", { class: "muted" }, "the device reports no " + m.labels.summary + " vector"));
      c.summary = { u: null, id: "chart-summary", names: [] };
    } else {
      c.summary = makeChart("chart-summary", names.map((n) => m.labels.summary + " " + n), {});
    }
  }
  if (!c.reward) c.reward = makeChart("chart-reward", ["reward"], {});
  if (!c.action || c.action.names.length !== cols.action.length) {
    c.action = makeChart("chart-action", cols.action.map((_, i) => "a" + i), {});
  }
  if (!c.ood) {
    const th = m.ood_thresholds, names = ["OOD score"], dashed = [];
    if (th.warn !== null) { names.push("warn " + th.warn); dashed.push(1); }
    if (th.alarm !== null) { names.push("alarm " + th.alarm); dashed.push(names.length - 1); }
    document.getElementById("ood-note").textContent = th.warn === null && th.alarm === null
      ? "(thresholds not announced by the device)" : "";
    c.ood = makeChart("chart-ood", names, { dashed, colors: ["#e03131", "#f08c00", "#862e9c"] });
  }
  if (!c.latency) c.latency = makeChart("chart-latency", ["step latency µs"], {});
}

function redraw() {
  const cols = state.cols, c = state.charts, th = state.meta.ood_thresholds;
  const constant = (v) => cols.t.map(() => v);
  const sets = {
    summary: [cols.t, ...cols.summary], reward: [cols.t, cols.reward],
    action: [cols.t, ...cols.action], latency: [cols.t, cols.latency_us],
    ood: [cols.t, cols.ood].concat(th.warn !== null ? [constant(th.warn)] : [],
                                   th.alarm !== null ? [constant(th.alarm)] : []),
  };
  for (const [name, data] of Object.entries(sets)) {
    const chart = c[name];
    if (!chart) continue;
    const box = document.getElementById(chart.id);
    if (chart.u) chart.u.setData(data);
    box.dataset.points = String(cols.t.length);
    box.dataset.lastSeq = String(cols.seq.length ? cols.seq[cols.seq.length - 1] : 0);
    box.dataset.lastT = String(cols.t.length ? cols.t[cols.t.length - 1] : 0);
  }
}

function onPoints(data) {
  // after a reconnect the stream starts over with the newest window: replace, do not append
  if (!state.cols || (data.seq.length && data.seq[0] <= state.lastSeq)) state.cols = emptyCols();
  append(state.cols, data);
  state.lastSeq = data.last_seq;
  ensureCharts();
  redraw();
}

function onEvents(doc) {
  const body = document.querySelector("#events tbody");
  for (const ev of doc.items) {
    if (ev.seq <= state.eventsSeq) continue;
    const tr = el("tr", { "data-seq": ev.seq, class: ev.type === "ood_alarm" ? "alarm" : "" });
    for (const v of [ev.seq, clock(ev.t), ev.kind, ev.type, ev.status || "", ev.detail]) {
      tr.appendChild(el("td", { title: String(v) }, v));
    }
    body.prepend(tr);
  }
  while (body.children.length > 200) body.lastChild.remove();
  state.eventsSeq = Math.max(state.eventsSeq, doc.last_seq);
}

function onMeta(m) {
  state.meta = m;
  document.title = m.device + " · edgeadapt";
  document.getElementById("device-name").textContent = m.device;
  const badge = document.getElementById("state");
  badge.textContent = m.online ? "online" : "offline";
  badge.className = "badge " + (m.online ? "online" : "offline");
  const bundle = m.bundle_id ? m.bundle_id + " @ " + (m.bundle_version || "?") : "no birth yet";
  document.getElementById("facts").textContent = [
    "fleet " + m.fleet, "algorithm " + (m.alg || "?"), "bundle " + bundle,
    "profile " + (m.profile || "?"), "boot #" + m.boot_n,
    "last seen " + ago(m.last_seen, Date.now() / 1000),
  ].join(" · ");
  if (state.cols) { ensureCharts(); redraw(); }
}

fetch("/api/device/" + encodeURIComponent(device)).then((r) => r.json()).then((m) => {
  onMeta(m);
  live("/live/device/" + encodeURIComponent(device),
       { points: onPoints, events: onEvents, meta: onMeta }, statusEl);
});
