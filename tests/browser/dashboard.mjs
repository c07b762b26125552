// Drives the dashboard in a real browser (Debian's Chromium, headless, through playwright-core)
// and fails on anything a person would notice: missing devices, a chart without its points,
// axes without tick labels or units, zoom that does not zoom, an error in the console. Run by
// tests/it/dashboard.rs, which starts the dashboard and seeds the data; it saves a screenshot of
// each page into SCREENSHOT_DIR.
//
// Environment: DASHBOARD_URL, EXPECT_DEVICES (rows in the fleet table), DEVICE (one to open),
// EXPECT_POINTS (its temperature chart's points over the default 24 h), SCREENSHOT_DIR,
// CHROMIUM (default /usr/bin/chromium), PLAYWRIGHT_CORE (path of the playwright-core module),
// EXPECT_ROLLUPS (optional: DEVICE's hourly rollups over 30 days; when set, the 30-day view's
// temperature chart must show that many means inside a min–max band, and its completeness strip
// that many hourly cells, EXPECT_INCOMPLETE of them (default 0) short of complete),
// EXPECT_ALARMS (default 0: alarms raised, all of DEVICE's temperature; listed on the fleet page,
// on DEVICE's page, and marked on its temperature chart).
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

const url = process.env.DASHBOARD_URL;
const expectDevices = Number(process.env.EXPECT_DEVICES);
const device = process.env.DEVICE;
const expectPoints = Number(process.env.EXPECT_POINTS);
const expectRollups = process.env.EXPECT_ROLLUPS ? Number(process.env.EXPECT_ROLLUPS) : null;
const expectIncomplete = Number(process.env.EXPECT_INCOMPLETE || 0);
const expectAlarms = Number(process.env.EXPECT_ALARMS || 0);
// The colour the page marks where a raised alarm began.
const RAISED = "#b3261e";
const shots = process.env.SCREENSHOT_DIR;
const UNITS = { temperature: "°C", humidity: "%RH", pressure: "hPa" };

// uPlot paints its axes on a canvas: record the text each canvas is painted with (since its
// last full clear), so the test sees what a person sees rather than what the page meant to draw.
function recordCanvasText() {
  const proto = CanvasRenderingContext2D.prototype;
  const fillText = proto.fillText;
  proto.fillText = function (text, ...rest) {
    (this.canvas.paintedText ||= []).push(String(text));
    return fillText.call(this, text, ...rest);
  };
  const stroke = proto.stroke;
  proto.stroke = function (...args) {
    (this.canvas.paintedStrokes ||= []).push(String(this.strokeStyle));
    return stroke.apply(this, args);
  };
  const clearRect = proto.clearRect;
  proto.clearRect = function (x, y, w, h) {
    if (x === 0 && y === 0 && w === this.canvas.width && h === this.canvas.height) {
      this.canvas.paintedText = [];
      this.canvas.paintedStrokes = [];
    }
    return clearRect.call(this, x, y, w, h);
  };
}

// Per chart on the page: its points, x range, series and bands, and each axis's tick labels
// with whether every one of them was painted.
function chartState() {
  const out = {};
  for (const [measure, u] of Object.entries(window.dashboardCharts || {})) {
    const painted = new Set(u.ctx.canvas.paintedText || []);
    out[measure] = {
      points: u.data[0].length,
      x: [u.scales.x.min, u.scales.x.max],
      series: u.series.map((s) => s.label),
      bands: u.bands.length,
      data: u.data,
      strokes: u.ctx.canvas.paintedStrokes || [],
      axes: u.axes.map((a) => {
        const labels = (a._values || []).filter((v) => v != null).map(String);
        return { labels, painted: labels.length > 0 && labels.every((l) => l.split("\n").every((line) => painted.has(line))) };
      }),
    };
  }
  return out;
}

// Waits until the charts present are drawn (uPlot draws after a microtask).
async function drawnCharts(page) {
  await page.waitForFunction(() => {
    const charts = Object.values(window.dashboardCharts || {});
    return charts.length > 0 && charts.every((u) => u.axes.every((a) => a._values && a._values.length > 0));
  }, null, { timeout: 15000 });
  return page.evaluate(chartState);
}

const problems = [];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Root in CI containers cannot use Chromium's sandbox.
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  for (const [name, viewport] of [["laptop", { width: 1280, height: 800 }], ["phone", { width: 390, height: 844 }]]) {
    const page = await browser.newPage({ viewport });
    page.on("console", (m) => { if (m.type() === "error") problems.push(`${name}: console error: ${m.text()}`); });
    page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
    page.on("requestfailed", (r) => problems.push(`${name}: request failed: ${r.url()}`));
    // Nothing may come from anywhere but the dashboard itself (uPlot included).
    page.on("request", (r) => { if (!r.url().startsWith(url) && !r.url().startsWith("data:") && !r.url().startsWith("blob:")) problems.push(`${name}: request outside the dashboard: ${r.url()}`); });
    await page.addInitScript(recordCanvasText);

    await page.goto(url, { waitUntil: "networkidle" });
    await page.waitForSelector("#devices tr", { timeout: 15000 });
    const rows = await page.locator("#devices tr").count();
    if (rows !== expectDevices) problems.push(`${name}: fleet lists ${rows} devices, expected ${expectDevices}`);
    const cards = await page.locator("[data-card]").count();
    if (cards !== 7) problems.push(`${name}: ${cards} pipeline cards, expected 7`);
    const raisedCard = Number((await page.locator('[data-card="Alarms raised"] .value').textContent()).trim());
    if (raisedCard !== expectAlarms) problems.push(`${name}: the alarms card reads ${raisedCard}, expected ${expectAlarms}`);
    const alarmRows = await page.locator("#alarms tr.alarm.raised").count();
    if (alarmRows !== expectAlarms) problems.push(`${name}: the fleet lists ${alarmRows} raised alarms, expected ${expectAlarms}`);
    if (expectAlarms > 0 && (await page.locator(`#alarms tr.alarm[data-device="${device}"] a`).count()) !== expectAlarms) problems.push(`${name}: the fleet's alarms do not name ${device}`);
    const received = (await page.locator('[data-card="Received, last day"] .value').textContent()).trim();
    if (!/^(–|\d+\.\d\d%)$/.test(received)) problems.push(`${name}: the fleet completeness card reads ${JSON.stringify(received)}`);
    // Search narrows the table.
    await page.fill("#search", device);
    const matching = await page.locator("#devices tr").count();
    if (matching !== 1) problems.push(`${name}: searching for ${device} finds ${matching} devices, expected 1`);
    await page.fill("#search", "");
    await page.screenshot({ path: `${shots}/fleet-${name}.png`, fullPage: true });

    await page.click(`a[href="#/device/${encodeURIComponent(device)}"]`);
    const section = page.locator('section[data-measure="temperature"]');
    await section.locator(".plot").waitFor({ timeout: 15000 });
    const charts = await drawnCharts(page);
    const points = Number(await section.locator(".plot").getAttribute("data-points"));
    if (points !== expectPoints) problems.push(`${name}: temperature chart has ${points} points, expected ${expectPoints}`);
    const drawn = charts.temperature ? charts.temperature.points : 0;
    if (drawn !== expectPoints) problems.push(`${name}: the temperature chart draws ${drawn} points, expected ${expectPoints}`);
    // Every chart's axes carry painted tick labels: times on x, values with their unit on y.
    for (const [measure, c] of Object.entries(charts)) {
      const [x, y] = c.axes;
      if (x.labels.length < 2 || !x.labels.every((l) => /\d\d:\d\d|[A-Z][a-z]{2} \d/.test(l))) problems.push(`${name}: ${measure} time axis labels ${JSON.stringify(x.labels)}`);
      if (y.labels.length < 2 || !y.labels.every((l) => /^-?\d+(\.\d+)? /.test(l) && l.endsWith(" " + UNITS[measure]))) problems.push(`${name}: ${measure} y axis labels ${JSON.stringify(y.labels)} lack numbers with ${UNITS[measure]}`);
      if (!x.painted || !y.painted) problems.push(`${name}: ${measure} axis labels are not all painted on its canvas`);
    }
    if (!charts.temperature) problems.push(`${name}: no temperature chart`);
    // The device's alarms: listed, and each marked where it began on the temperature chart.
    const listed = await page.locator("#device-alarms li.alarm.raised").count();
    if (listed !== expectAlarms) problems.push(`${name}: the device page lists ${listed} raised alarms, expected ${expectAlarms}`);
    const marks = charts.temperature ? charts.temperature.strokes.filter((s) => s === RAISED).length : 0;
    if (marks !== expectAlarms) problems.push(`${name}: the temperature chart marks ${marks} alarms, expected ${expectAlarms}`);
    // The values under the cursor, in the legend.
    const over = section.locator(".u-over");
    const box = await over.boundingBox();
    const middle = box.y + box.height / 2;
    await page.mouse.move(box.x + box.width / 2, middle);
    const legend = section.locator(".u-legend .u-series");
    const at = await legend.nth(0).locator(".u-value").textContent();
    const value = await legend.nth(1).locator(".u-value").textContent();
    if (!/\d\d:\d\d:\d\d UTC$/.test(at) || !/^-?\d+\.\d+ °C$/.test(value)) problems.push(`${name}: hovering the chart shows no time and value (${at}; ${value})`);
    await page.screenshot({ path: `${shots}/device-${name}.png`, fullPage: true });

    // Dragging across zooms into that stretch; a double click shows the whole range again.
    if (charts.temperature) {
      const before = charts.temperature;
      await page.mouse.move(box.x + box.width * 0.3, middle);
      await page.mouse.down();
      await page.mouse.move(box.x + box.width * 0.6, middle, { steps: 8 });
      await page.mouse.up();
      await page.waitForFunction((max) => window.dashboardCharts.temperature.scales.x.max !== max, before.x[1], { timeout: 5000 }).catch(() => {});
      const zoomed = (await page.evaluate(chartState)).temperature;
      const [a, b] = zoomed.x, [a0, b0] = before.x;
      if (!(a > a0 && b < b0 && b - a < (b0 - a0) * 0.5)) problems.push(`${name}: dragging did not zoom: x ${a0}..${b0} became ${a}..${b}`);
      if (!zoomed.axes[0].painted || zoomed.axes[0].labels.join() === before.axes[0].labels.join()) problems.push(`${name}: the zoomed time axis kept its labels ${JSON.stringify(zoomed.axes[0].labels)}`);
      await page.mouse.dblclick(box.x + box.width / 2, middle);
      const reset = (await page.evaluate(chartState)).temperature;
      if (reset.x[0] !== a0 || reset.x[1] !== b0) problems.push(`${name}: double click did not reset the zoom: ${reset.x} vs ${before.x}`);
    }

    // The 30-day view: hourly means, each inside its period's min–max band.
    if (expectRollups !== null) {
      await page.click('.ranges button:text-is("30d")');
      await page.waitForFunction(() => {
        const u = (window.dashboardCharts || {}).temperature;
        return u && u.series.length === 4 && u.axes[1]._values;
      }, null, { timeout: 15000 });
      const rollup = (await page.evaluate(chartState)).temperature;
      if (rollup.points !== expectRollups) problems.push(`${name}: the 30-day chart has ${rollup.points} means, expected ${expectRollups}`);
      if (rollup.bands !== 1 || rollup.series.slice(1).join() !== "mean,min,max") problems.push(`${name}: the 30-day chart has no min–max band (${rollup.series}, ${rollup.bands} bands)`);
      const [, mean, min, max] = rollup.data;
      if (!mean.every((m, i) => min[i] <= m && m <= max[i])) problems.push(`${name}: a mean lies outside its min–max band`);
      if (!rollup.axes[0].painted || !rollup.axes[1].painted) problems.push(`${name}: the 30-day chart's axis labels are not painted`);
      // The completeness strip: a cell an hour, each labelled with its share received.
      const cells = await page.evaluate(() => [...document.querySelectorAll("#completeness .cell")].map((c) => ({ kind: c.className.replace("cell ", ""), label: c.getAttribute("aria-label"), width: c.getBoundingClientRect().width })));
      if (cells.length !== expectRollups) problems.push(`${name}: the completeness strip has ${cells.length} cells, expected ${expectRollups}`);
      if (!cells.every((c) => / received \(\d+(\.\d)?%\)$/.test(c.label))) problems.push(`${name}: a completeness cell without its share: ${cells.map((c) => c.label).join("; ")}`);
      if (!cells.every((c) => c.width > 0)) problems.push(`${name}: a completeness cell is not drawn`);
      const incomplete = cells.filter((c) => c.kind !== "full").length;
      if (incomplete !== expectIncomplete) problems.push(`${name}: ${incomplete} incomplete hours in the strip, expected ${expectIncomplete}`);
    }
    await page.close();
  }
} finally {
  await browser.close();
}
if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
console.log("browser checks passed" + (expectRollups === null ? " (the 30-day rollup view not checked: EXPECT_ROLLUPS unset)" : ""));
