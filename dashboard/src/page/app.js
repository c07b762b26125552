// The dashboard page: plain JavaScript over the /api/v1 endpoints. One library: uPlot
// (vendor/, embedded in the binary and served by it) draws the charts.
// Every value from the API reaches the page through textContent, never as HTML.
// Times are shown in UTC throughout, as the API and its downloads give them.
"use strict";

const MEASURES = ["temperature", "humidity", "pressure"];
// The contract's units (docs/contract.md).
const UNITS = { temperature: "°C", humidity: "%RH", pressure: "hPa" };
const CHART_HEIGHT = 220;
// Time-axis labels, 24-hour: per tick step (s), the label and what is added below it when the
// year or the day changes (uPlot's table; its own is 12-hour).
const TIME_TICKS = [
  [365 * 86400, "{YYYY}", null, null, null, null, null, null, 1],
  [28 * 86400, "{MMM}", "\n{YYYY}", null, null, null, null, null, 1],
  [86400, "{MMM} {D}", "\n{YYYY}", null, null, null, null, null, 1],
  [60, "{HH}:{mm}", "\n{MMM} {D} {YYYY}", null, "\n{MMM} {D}", null, null, null, 1],
  [1, "{HH}:{mm}:{ss}", "\n{MMM} {D} {YYYY}", null, "\n{MMM} {D}", null, null, null, 1],
];
// Raw readings up to a week; hourly rollups for a month, daily ones for a year.
const RANGES = [["1h", 3600e3], ["6h", 6 * 3600e3], ["24h", 86400e3], ["7d", 7 * 86400e3], ["30d", 30 * 86400e3, "1h"], ["1y", 365 * 86400e3, "1d"]];
const SHOWN_ROWS = 500;

let fleet = { devices: [], sort: { key: "lastSeen", dir: 1 }, query: "", silentAfterSeconds: 600 };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

async function api(path) {
  const headers = {};
  const token = sessionStorage.getItem("token");
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, { headers });
  if (response.status === 401) {
    await askToken();
    return api(path);
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || body.title || response.statusText);
  return body;
}

// One prompt however many requests were refused at once.
let asking = null;
function askToken() {
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = document.getElementById("login");
      document.getElementById("login-form").onsubmit = () => {
        sessionStorage.setItem("token", document.getElementById("token").value);
        asking = null;
        resolve();
      };
      dialog.showModal();
    });
  }
  return asking;
}

// A download that carries the token (a plain link would not).
async function download(path, name) {
  const headers = {};
  const token = sessionStorage.getItem("token");
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, { headers });
  if (!response.ok) {
    const body = await response.json();
    alert("Cannot download: " + (body.detail || response.statusText));
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  URL.revokeObjectURL(url);
}

function fmtNumber(v, digits = 1) {
  return v == null ? "" : Number(v).toFixed(digits);
}

function fmtAgo(seconds) {
  if (seconds < 90) return seconds + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return Math.round(seconds / 3600) + " h";
  return Math.round(seconds / 86400) + " d";
}

// "2024-01-15 10:00 UTC", or to the second.
function fmtUtc(ms, seconds = false) {
  return new Date(ms).toISOString().slice(0, seconds ? 19 : 16).replace("T", " ") + " UTC";
}

function show(...nodes) {
  dropCharts();
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function stamp() {
  document.getElementById("updated").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
}

function failed(error) {
  show(el("p", { class: "error", role: "alert" }, "Cannot load: " + error.message));
}

async function loadAllDevices() {
  const all = [];
  let url = "/api/v1/devices?limit=1000";
  while (url) {
    const page = await api(url);
    all.push(...page.devices);
    url = page.next;
  }
  return all;
}

async function showFleet() {
  document.getElementById("crumb").textContent = "Fleet";
  // Alarms that cannot be read leave the rest of the page as it is.
  const [pipeline, devices, alarms] = await Promise.all([api("/api/v1/pipeline"), loadAllDevices(), api("/api/v1/alarms").catch(() => null)]);
  fleet.devices = devices;
  fleet.silentAfterSeconds = pipeline.devices.silentAfterSeconds;
  const silentAfter = pipeline.devices.silentAfter;
  const card = (label, value, bad) =>
    el("div", { class: "card" + (bad ? " bad" : ""), "data-card": label }, el("div", { class: "muted" }, label), el("div", { class: "value" }, value));
  const cards = el("section", { class: "cards", "aria-label": "Pipeline" },
    card("Devices", pipeline.devices.total),
    card("Silent (> " + silentAfter + ")", pipeline.devices.silent, pipeline.devices.silent > 0),
    card("Readings in the last hour", pipeline.readings.storedLastHour === null ? "unknown" : pipeline.readings.storedLastHour.toLocaleString("en-US")),
    completenessCard(card, pipeline.completeness.lastDay),
    alarms ? card("Alarms raised", alarms.alarms.filter((a) => a.status === "raised").length, alarms.alarms.some((a) => a.status === "raised")) : card("Alarms raised", "unknown"),
    card("Ingest queue", pipeline.queues.ingest.depth, pipeline.queues.ingest.depth > 10000),
    card("Dead-letter messages", pipeline.queues.deadLetter.depth, pipeline.queues.deadLetter.depth > 0));
  const search = el("input", { type: "search", placeholder: "Search devices", "aria-label": "Search devices", id: "search" });
  search.value = fleet.query;
  search.addEventListener("input", () => { fleet.query = search.value; renderRows(); });
  const count = el("span", { class: "muted", id: "count" });
  const columns = [["id", "Device"], ["lastSeen", "Last seen"], ["temperature", "Temperature", true], ["humidity", "Humidity", true], ["pressure", "Pressure", true]];
  const head = el("tr", {}, ...columns.map(([key, label, num]) => {
    const th = el("th", { scope: "col", "data-key": key, class: num ? "num" : "" }, label);
    th.addEventListener("click", () => {
      fleet.sort = { key, dir: fleet.sort.key === key ? -fleet.sort.dir : 1 };
      renderRows();
    });
    return th;
  }));
  const body = el("tbody", { id: "devices" });
  show(cards, alarmTable(alarms), el("div", { class: "toolbar" }, search, count),
    el("div", { class: "table-wrap" }, el("table", { id: "fleet" }, el("thead", {}, head), body)));
  renderRows();
  stamp();
}

// The alarms raised, then pending (out of band, not for long enough yet), the longest-standing
// first, as the API lists them; each device links to its page.
function alarmTable(answer) {
  const box = el("section", { class: "alarms", id: "alarms", "aria-label": "Alarms" }, el("h3", {}, "Alarms"));
  if (answer === null) {
    box.append(el("p", { class: "muted" }, "Alarms: cannot be read now."));
    return box;
  }
  if (answer.alarms.length === 0) {
    box.append(el("p", { class: "muted" }, "No alarm is raised or pending."));
    return box;
  }
  const head = el("tr", {}, ...["Status", "Device", "Rule", "On", "Since (UTC)", "Last value"].map((h) => el("th", { scope: "col" }, h)));
  const rows = answer.alarms.map((a) => el("tr", { class: "alarm " + a.status, "data-device": a.deviceId, "data-rule": a.rule },
    el("td", {}, a.status),
    el("td", {}, el("a", { href: "#/device/" + encodeURIComponent(a.deviceId) }, a.deviceId)),
    el("td", {}, a.rule),
    el("td", {}, a.condition),
    el("td", {}, a.since ? fmtUtc(Date.parse(a.since), true) : "–"),
    el("td", { class: "num" }, a.value == null ? "–" : fmtNumber(a.value, 2))));
  box.append(el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows))));
  if (answer.truncated) box.append(el("p", { class: "muted" }, "More alarms than shown: `alarms list` has them all."));
  return box;
}

// The fleet's completeness over the last day: the share of numbered readings received, from the
// hourly ledgers the rollup keeper sums; "unknown" when they cannot be read, "–" before any.
function completenessCard(card, day) {
  const label = "Received, last day";
  if (!day) return card(label, "unknown");
  if (day.percent === null) return card(label, "–");
  return card(label, fmtNumber(day.percent, 2) + "%", day.missing > 0);
}

function sortValue(d, key) {
  if (key === "id") return d.id;
  if (key === "lastSeen") return d.lastSeen;
  return d.latest[key] == null ? -Infinity : d.latest[key];
}

function renderRows() {
  const q = fleet.query.trim().toLowerCase();
  const { key, dir } = fleet.sort;
  const rows = fleet.devices.filter((d) => d.id.toLowerCase().includes(q));
  rows.sort((a, b) => {
    const x = sortValue(a, key), y = sortValue(b, key);
    return (x < y ? -1 : x > y ? 1 : 0) * dir;
  });
  for (const th of document.querySelectorAll("#fleet th")) {
    th.setAttribute("aria-sort", th.dataset.key === key ? (dir > 0 ? "ascending" : "descending") : "none");
  }
  document.getElementById("devices").replaceChildren(...rows.slice(0, SHOWN_ROWS).map((d) => {
    const silent = d.silentForSeconds > fleet.silentAfterSeconds;
    return el("tr", { class: silent ? "silent" : "" },
      el("td", {}, el("a", { href: "#/device/" + encodeURIComponent(d.id) }, d.id)),
      el("td", { title: d.lastSeen }, fmtAgo(d.silentForSeconds) + " ago"),
      el("td", { class: "num" }, fmtNumber(d.latest.temperature)),
      el("td", { class: "num" }, fmtNumber(d.latest.humidity)),
      el("td", { class: "num" }, fmtNumber(d.latest.pressure)));
  }));
  const more = rows.length > SHOWN_ROWS ? " (first " + SHOWN_ROWS + " shown; search to narrow)" : "";
  document.getElementById("count").textContent = rows.length + " of " + fleet.devices.length + " devices" + more;
}

async function showDevice(id, rangeName) {
  document.getElementById("crumb").textContent = id;
  const range = RANGES.find(([name]) => name === rangeName) || RANGES[2];
  const to = new Date();
  const from = new Date(to.getTime() - range[1]);
  const buttons = el("div", { class: "ranges toolbar", role: "group", "aria-label": "Range" }, ...RANGES.map(([name]) =>
    el("button", { type: "button", "aria-pressed": String(name === range[0]), onclick: () => { location.hash = "#/device/" + encodeURIComponent(id) + "/" + name; } }, name)));
  const interval = range[2];
  const base = "/api/v1/devices/" + encodeURIComponent(id);
  const span = "from=" + from.toISOString() + "&to=" + to.toISOString();
  const path = interval ? base + "/rollups?interval=" + interval + "&" + span : base + "/readings?" + span;
  // The device's alarms: those not clear are listed, and marked on their measure's chart.
  let alarms = null;
  try {
    alarms = (await api(base + "/alarms")).alarms.filter((a) => a.status !== "clear");
  } catch (error) {
    alarms = null;
  }
  // One row a reading, or a period: its time and, per measure, { mean, min, max } (all three
  // the reading's value when raw).
  const rows = [];
  // The completeness ledger by period: the view's own rollups, or for a raw view its hours'.
  let ledger = [];
  if (interval) {
    for (const r of (await api(path)).rollups) {
      const row = { at: Date.parse(r.periodStart) };
      for (const m of MEASURES) row[m] = r[m] && r[m].mean != null ? { mean: r[m].mean, min: r[m].min, max: r[m].max } : null;
      rows.push(row);
      ledger.push({ at: row.at, seq: r.seq });
    }
  } else {
    try {
      ledger = (await api(base + "/rollups?interval=1h&" + span)).rollups.map((r) => ({ at: Date.parse(r.periodStart), seq: r.seq }));
    } catch (error) {
      ledger = null;
    }
    let url = path;
    while (url) {
      const page = await api(url);
      for (const r of page.readings) {
        const row = { at: Date.parse(r.measuredAt) };
        for (const m of MEASURES) row[m] = r[m] == null ? null : { mean: r[m], min: r[m], max: r[m] };
        rows.push(row);
      }
      url = page.next;
    }
  }
  const link = (format, label) => el("a", { href: "#", onclick: (event) => { event.preventDefault(); download(path + "&format=" + format, id + "." + format); } }, label);
  const csv = link("csv", "CSV");
  const what = interval ? (interval === "1h" ? " hourly means" : " daily means") : " readings";
  const downloads = [csv, " · ", link("parquet", "Parquet")];
  const summary = el("p", { class: "muted", id: "summary" }, rows.length + what + " from " + fmtUtc(from.getTime()) + " to " + fmtUtc(to.getTime()) + " · ", ...downloads);
  const made = MEASURES.map((m) => chart(m, rows, Boolean(interval), (alarms || []).filter((a) => a.measurement === m)));
  const periodMs = interval === "1d" ? 86400e3 : 3600e3;
  const ledgerBox = ledger ? strip(ledger, from.getTime(), to.getTime(), periodMs) : el("p", { class: "muted" }, "Completeness: cannot be read now.");
  show(buttons, summary, deviceAlarms(alarms), ledgerBox, ...made.map((c) => c.box));
  // Drawn once in the page, where they can measure their width.
  for (const c of made) if (c.draw) c.draw();
  stamp();
}

// A device's alarms that are not clear: what, since when, the last value judged.
function deviceAlarms(alarms) {
  const box = el("section", { class: "alarms", id: "device-alarms", "aria-label": "Alarms" }, el("h3", {}, "Alarms"));
  if (alarms === null) {
    box.append(el("p", { class: "muted" }, "Alarms: cannot be read now."));
  } else if (alarms.length === 0) {
    box.append(el("p", { class: "muted" }, "No alarm is raised or pending."));
  } else {
    box.append(el("ul", {}, ...alarms.map((a) => el("li", { class: "alarm " + a.status },
      a.status + ": " + a.rule + " (" + a.condition + ") since " + (a.since ? fmtUtc(Date.parse(a.since), true) : "–") +
      (a.value == null ? "" : ", last value " + fmtNumber(a.value, 2))))));
  }
  return box;
}

// The completeness strip: one cell a period that has a rollup (an hour, or a day in the year
// view), placed on the time axis, coloured by the share of the device's numbered readings
// received (its `seq` ledger); grey when none of its readings is numbered, or its ledger is
// not known. An hour not rolled up yet (the current one) has no cell.
function strip(periods, from, to, periodMs) {
  const cells = el("div", { class: "cells", role: "list", "aria-label": "Completeness by " + (periodMs === 3600e3 ? "hour" : "day") });
  let received = 0;
  let missing = 0;
  for (const p of periods) {
    const q = p.seq;
    let kind = "none";
    let label = fmtUtc(p.at) + ": no numbered readings";
    if (q) {
      received += q.distinct;
      missing += q.missing;
      const share = (100 * q.distinct) / (q.distinct + q.missing);
      kind = q.missing === 0 ? "full" : share >= 90 ? "part" : "low";
      label = fmtUtc(p.at) + ": " + q.distinct + " of " + (q.distinct + q.missing) + " received (" + fmtNumber(share, 1) + "%)";
    }
    const left = Math.max(0, (p.at - from) / (to - from));
    const width = Math.max(periodMs / (to - from), 0.002);
    const cell = el("span", { class: "cell " + kind, role: "listitem", title: label, "aria-label": label });
    cell.style.left = (100 * left).toFixed(3) + "%";
    cell.style.width = (100 * Math.min(width, 1 - left)).toFixed(3) + "%";
    cells.append(cell);
  }
  const total = received + missing;
  const headline = total === 0
    ? "no numbered readings in this range"
    : fmtNumber((100 * received) / total, 2) + "% received: " + missing + " missing of " + total + " numbered readings";
  return el("div", { class: "strip", id: "completeness" },
    el("h3", {}, "Completeness"),
    el("p", { class: "readout muted" }, headline + " (hover a cell for its period; the current hour is not rolled up yet)"),
    cells);
}

// The charts on the page, by measure: dropped with the page, open to the browser test.
let liveCharts = [];
window.dashboardCharts = {};

function dropCharts() {
  for (const { u, observer } of liveCharts) {
    observer.disconnect();
    u.destroy();
  }
  liveCharts = [];
  window.dashboardCharts = {};
}

// Decimals enough for a tick increment: 2.5 → 1, 0.25 → 2, 50 → 0.
function decimals(incr) {
  const text = String(Number(incr.toFixed(6)));
  const dot = text.indexOf(".");
  return dot < 0 ? 0 : text.length - dot - 1;
}

// A y axis as wide as its longest tick label (uPlot's own is a fixed width).
function axisWidth(u, values, axisIdx, cycleNum) {
  const axis = u.axes[axisIdx];
  if (cycleNum > 1) return axis._size;
  let size = axis.ticks.size + axis.gap;
  const longest = (values || []).reduce((a, v) => (v != null && String(v).length > a.length ? String(v) : a), "");
  if (longest) {
    u.ctx.font = axis.font[0];
    size += u.ctx.measureText(longest).width / devicePixelRatio;
  }
  return Math.ceil(size);
}

// One chart: the reading (or, for rollups, the period's mean) as the line, with the period's
// min–max as a band around it; time in UTC; the values under the cursor in the legend; drag
// across to zoom, double-click to see the whole range again.
function chart(measure, rows, rollup, alarms) {
  const unit = UNITS[measure];
  const title = measure[0].toUpperCase() + measure.slice(1);
  const shown = rows.filter((r) => r[measure] != null);
  const box = el("section", { class: "chart", "data-measure": measure, "data-alarms": String(alarms.length), "aria-label": title + " in " + unit });
  box.append(el("h3", {}, title + ", " + unit));
  if (shown.length === 0) {
    box.append(el("p", { class: "muted" }, "No " + measure + " readings in this range."));
    return { box };
  }
  const t = shown.map((r) => r.at / 1000);
  const mean = shown.map((r) => r[measure].mean);
  const min = shown.map((r) => r[measure].min);
  const max = shown.map((r) => r[measure].max);
  const lo = min.reduce((a, v) => Math.min(a, v), Infinity), hi = max.reduce((a, v) => Math.max(a, v), -Infinity);
  const plot = el("div", { class: "plot", "data-points": shown.length });
  const what = rollup ? "the mean of each period as the line, its minimum to maximum as the band" : "each reading";
  const note = el("p", { class: "readout muted" }, "min " + fmtNumber(lo, 2) + " " + unit + " · max " + fmtNumber(hi, 2) + " " + unit +
    " · " + what + " · drag across the chart to zoom, double-click to reset");
  box.append(plot, note);

  const value = (u, v) => (v == null ? "–" : fmtNumber(v, 2) + " " + unit);
  const color = "#0b63c5";
  const series = [{ label: "Time (UTC)", value: (u, ts) => (ts == null ? "–" : fmtUtc(ts * 1000, !rollup)) }];
  const data = [t, mean];
  let bands;
  if (rollup) {
    series.push({ label: "mean", stroke: color, width: 1.5, value },
      { label: "min", stroke: "rgba(11, 99, 197, 0.35)", width: 1, points: { show: false }, value },
      { label: "max", stroke: "rgba(11, 99, 197, 0.35)", width: 1, points: { show: false }, value });
    data.push(min, max);
    bands = [{ series: [3, 2], fill: "rgba(11, 99, 197, 0.12)" }];
  } else {
    series.push({ label: title, stroke: color, width: 1.5, value });
  }
  const grid = () => ({ stroke: "#e6e9ed", width: 1 });
  const ticks = () => ({ stroke: "#c9ced4", width: 1, size: 5 });
  const opts = {
    height: CHART_HEIGHT,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
    scales: { x: { time: true } },
    series,
    bands,
    axes: [
      { grid: grid(), ticks: ticks(), space: 60, values: TIME_TICKS },
      { grid: grid(), ticks: ticks(), size: axisWidth, values: (u, splits, axisIdx, space, incr) => splits.map((v) => v.toFixed(decimals(incr)) + " " + unit) },
    ],
    legend: { live: true },
    // Each alarm not clear: a red line where it began (raised, or pending), if in view.
    hooks: {
      draw: [(u) => {
        const { ctx, bbox } = u;
        for (const a of alarms) {
          if (!a.since) continue;
          const x = u.valToPos(Date.parse(a.since) / 1000, "x", true);
          if (x < bbox.left || x > bbox.left + bbox.width) continue;
          ctx.save();
          ctx.strokeStyle = a.status === "raised" ? "#b3261e" : "#f9a825";
          ctx.lineWidth = 2 * devicePixelRatio;
          ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
          ctx.beginPath();
          ctx.moveTo(x, bbox.top);
          ctx.lineTo(x, bbox.top + bbox.height);
          ctx.stroke();
          ctx.restore();
        }
      }],
    },
  };
  const draw = () => {
    const u = new uPlot({ ...opts, width: plot.clientWidth }, data, plot);
    u.root.querySelector(".u-wrap").setAttribute("role", "img");
    u.root.querySelector(".u-wrap").setAttribute("aria-label", title + " over time in " + unit + ": " + note.textContent);
    // As wide as its box, whatever the window does.
    const observer = new ResizeObserver(() => {
      const width = plot.clientWidth;
      if (width > 0 && width !== u.width) u.setSize({ width, height: CHART_HEIGHT });
    });
    observer.observe(plot);
    liveCharts.push({ u, observer });
    window.dashboardCharts[measure] = u;
  };
  return { box, draw };
}

async function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  try {
    if (parts[0] === "device" && parts[1]) await showDevice(decodeURIComponent(parts[1]), parts[2]);
    else await showFleet();
  } catch (error) {
    failed(error);
  }
}

window.addEventListener("hashchange", route);
route();
setInterval(() => { if (!location.hash.startsWith("#/device")) route(); }, 60000);
