// Drives the dashboard in a real browser (Debian's Chromium, headless, through playwright-core)
// and fails on anything a person would notice: missing devices, a chart without its points,
// an error in the console. Run by tests/it/dashboard.rs, which starts the dashboard and seeds
// the data; it saves a screenshot of each page into SCREENSHOT_DIR.
//
// Environment: DASHBOARD_URL, EXPECT_DEVICES (rows in the fleet table), DEVICE (one to open),
// EXPECT_POINTS (its temperature chart's points over the default 24 h), SCREENSHOT_DIR,
// CHROMIUM (default /usr/bin/chromium), PLAYWRIGHT_CORE (path of the playwright-core module).
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

const url = process.env.DASHBOARD_URL;
const expectDevices = Number(process.env.EXPECT_DEVICES);
const device = process.env.DEVICE;
const expectPoints = Number(process.env.EXPECT_POINTS);
const shots = process.env.SCREENSHOT_DIR;

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

    await page.goto(url, { waitUntil: "networkidle" });
    await page.waitForSelector("#devices tr", { timeout: 15000 });
    const rows = await page.locator("#devices tr").count();
    if (rows !== expectDevices) problems.push(`${name}: fleet lists ${rows} devices, expected ${expectDevices}`);
    const cards = await page.locator("[data-card]").count();
    if (cards !== 5) problems.push(`${name}: ${cards} pipeline cards, expected 5`);
    // Search narrows the table.
    await page.fill("#search", device);
    const matching = await page.locator("#devices tr").count();
    if (matching !== 1) problems.push(`${name}: searching for ${device} finds ${matching} devices, expected 1`);
    await page.fill("#search", "");
    await page.screenshot({ path: `${shots}/fleet-${name}.png`, fullPage: true });

    await page.click(`a[href="#/device/${encodeURIComponent(device)}"]`);
    const chart = page.locator('section[data-measure="temperature"] svg');
    await chart.waitFor({ timeout: 15000 });
    const points = Number(await chart.getAttribute("data-points"));
    if (points !== expectPoints) problems.push(`${name}: temperature chart has ${points} points, expected ${expectPoints}`);
    const drawn = (await page.locator('section[data-measure="temperature"] polyline').getAttribute("points")).trim().split(/\s+/).length;
    if (drawn !== expectPoints) problems.push(`${name}: the polyline draws ${drawn} points, expected ${expectPoints}`);
    // The numbers under the cursor.
    const box = await chart.boundingBox();
    await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
    const readout = await page.locator('section[data-measure="temperature"] .readout').textContent();
    if (!/: -?\d/.test(readout)) problems.push(`${name}: hovering the chart shows no value (${readout})`);
    await page.screenshot({ path: `${shots}/device-${name}.png`, fullPage: true });
    await page.close();
  }
} finally {
  await browser.close();
}
if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
console.log("browser checks passed");
