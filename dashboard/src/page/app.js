// The dashboard page: plain JavaScript over the /api/v1 endpoints, no dependencies.
// Every value from the API reaches the page through textContent, never as HTML.
"use strict";

const MEASURES = ["temperature", "humidity", "pressure"];
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

function svg(tag, attrs = {}) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
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

function fmtTime(iso) {
  return new Date(iso).toLocaleString();
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function stamp() {
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
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
  const [pipeline, devices] = await Promise.all([api("/api/v1/pipeline"), loadAllDevices()]);
  fleet.devices = devices;
  fleet.silentAfterSeconds = pipeline.devices.silentAfterSeconds;
  const silentAfter = pipeline.devices.silentAfter;
  const card = (label, value, bad) =>
    el("div", { class: "card" + (bad ? " bad" : ""), "data-card": label }, el("div", { class: "muted" }, label), el("div", { class: "value" }, value));
  const cards = el("section", { class: "cards", "aria-label": "Pipeline" },
    card("Devices", pipeline.devices.total),
    card("Silent (> " + silentAfter + ")", pipeline.devices.silent, pipeline.devices.silent > 0),
    card("Readings in the last hour", pipeline.readings.storedLastHour === null ? "unknown" : pipeline.readings.storedLastHour.toLocaleString("en-US")),
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
  show(cards, el("div", { class: "toolbar" }, search, count),
    el("div", { class: "table-wrap" }, el("table", { id: "fleet" }, el("thead", {}, head), body)));
  renderRows();
  stamp();
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
  const readings = [];
  if (interval) {
    // A period's mean stands for it on the chart.
    const mean = (s) => (s == null ? null : s.mean);
    for (const r of (await api(path)).rollups) {
      readings.push({ measuredAt: r.periodStart, temperature: mean(r.temperature), humidity: mean(r.humidity), pressure: mean(r.pressure) });
    }
  } else {
    let url = path;
    while (url) {
      const page = await api(url);
      readings.push(...page.readings);
      url = page.next;
    }
  }
  const link = (format, label) => el("a", { href: "#", onclick: (event) => { event.preventDefault(); download(path + "&format=" + format, id + "." + format); } }, label);
  const csv = link("csv", "CSV");
  const what = interval ? (interval === "1h" ? " hourly means" : " daily means") : " readings";
  const downloads = [csv, " · ", link("parquet", "Parquet")];
  const summary = el("p", { class: "muted", id: "summary" }, readings.length + what + " from " + from.toLocaleString() + " to " + to.toLocaleString() + " · ", ...downloads);
  const charts = MEASURES.map((m) => chart(m, readings));
  show(buttons, summary, ...charts);
  stamp();
}

function chart(measure, readings) {
  const points = readings.filter((r) => r[measure] != null).map((r) => [Date.parse(r.measuredAt), r[measure]]);
  const box = el("section", { class: "chart", "data-measure": measure });
  box.append(el("h3", {}, measure[0].toUpperCase() + measure.slice(1)));
  if (points.length === 0) {
    box.append(el("p", { class: "muted" }, "No " + measure + " readings in this range."));
    return box;
  }
  const W = 1000, H = 180;
  const x0 = points[0][0], x1 = points[points.length - 1][0] || x0 + 1;
  let lo = Infinity, hi = -Infinity;
  for (const p of points) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); }
  if (lo === hi) { lo -= 1; hi += 1; }
  const sx = (t) => ((t - x0) / Math.max(1, x1 - x0)) * W;
  const sy = (v) => H - ((v - lo) / (hi - lo)) * H;
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": measure + " over time", "data-points": points.length });
  plot.append(svg("polyline", { points: points.map(([t, v]) => sx(t).toFixed(1) + "," + sy(v).toFixed(1)).join(" ") }));
  const cursor = svg("line", { class: "cursor", y1: 0, y2: H, x1: -10, x2: -10 });
  plot.append(cursor);
  const readout = el("div", { class: "readout" }, "min " + fmtNumber(lo, 2) + " · max " + fmtNumber(hi, 2));
  plot.addEventListener("mousemove", (event) => {
    const rect = plot.getBoundingClientRect();
    const t = x0 + ((event.clientX - rect.left) / rect.width) * (x1 - x0);
    let best = points[0];
    for (const p of points) if (Math.abs(p[0] - t) < Math.abs(best[0] - t)) best = p;
    cursor.setAttribute("x1", sx(best[0]));
    cursor.setAttribute("x2", sx(best[0]));
    readout.textContent = new Date(best[0]).toLocaleString() + ": " + fmtNumber(best[1], 2);
  });
  box.append(plot, el("div", { class: "axis muted" }, el("span", {}, fmtTime(points[0][0])), el("span", {}, fmtTime(points[points.length - 1][0]))), readout);
  return box;
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
