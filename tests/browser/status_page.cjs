// Drives Harbor's status page in Debian's chromium for tests/status_page.rs, one step per
// line on stdin; answers one line per step on stdout.
//   node status_page.cjs URL SCREENSHOT_DIR
// Steps: `rows` (print the backend rows as JSON once two fresh updates have been drawn),
// `wait-state ADDR STATE` (until that row shows STATE), `click ADDR` (its drain/ready
// button), `shot NAME` (a screenshot), `quit`.
"use strict";

const { chromium } = require("playwright-core");
const readline = require("readline");
const path = require("path");

const [url, shots] = process.argv.slice(2);
const STEP_MS = 15000;

async function freshUpdates(page, count) {
  for (let i = 0; i < count; i++) {
    const before = await page.getAttribute("body", "data-updated");
    await page.waitForFunction(b => document.body.getAttribute("data-updated") !== b, before, { timeout: STEP_MS });
  }
}

async function rows(page) {
  return page.$$eval("tr.backend", trs => trs.map(tr => {
    const text = cls => tr.querySelector("." + cls).textContent.trim();
    const value = cls => tr.querySelector("." + cls).getAttribute("data-value");
    return {
      service: tr.closest("section").getAttribute("data-service"),
      address: tr.getAttribute("data-address"),
      source: text("source"),
      check: text("check"),
      state: text("state"),
      health: text("health"),
      active: Number(text("active").split(" / ")[0]),
      queued: Number(text("queued")),
      picks: Number(text("picks")),
      weight: Number(text("weight")),
      bytes_to_backend: Number(value("to-backend")),
      bytes_to_client: Number(value("to-client")),
      button: tr.querySelector("button.drain") ? tr.querySelector("button.drain").textContent : null,
    };
  }));
}

async function main() {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const say = line => process.stdout.write(line + "\n");
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const problems = [];
    page.on("console", m => { if (m.type() === "error") problems.push(m.text()); });
    page.on("pageerror", e => problems.push(String(e)));
    page.on("response", r => { if (r.status() >= 400) problems.push(`${r.status()} ${r.url()}`); });
    await page.goto(url, { timeout: STEP_MS });
    await page.waitForSelector("tr.backend", { timeout: STEP_MS });
    // Points in the first chart as first drawn: the server's history fills it at once.
    const points = Number(await page.getAttribute(".chart", "data-points"));
    say("ready " + JSON.stringify({ problems, title: await page.title(), points }));
    const input = readline.createInterface({ input: process.stdin });
    for await (const line of input) {
      const [step, ...args] = line.trim().split(/\s+/);
      try {
        if (step === "rows") {
          await freshUpdates(page, 2);
          say("rows " + JSON.stringify(await rows(page)));
        } else if (step === "wait-state") {
          const [address, state] = args;
          await page.waitForFunction(([a, s]) => {
            const tr = document.querySelector(`tr.backend[data-address="${a}"]`);
            return tr && tr.querySelector(".state").textContent.trim() === s;
          }, [address, state], { timeout: STEP_MS });
          say("ok");
        } else if (step === "click") {
          await page.click(`tr.backend[data-address="${args[0]}"] button.drain`, { timeout: STEP_MS });
          say("ok");
        } else if (step === "shot") {
          const file = path.join(shots, args[0] + ".png");
          await page.screenshot({ path: file, fullPage: true });
          say("ok " + file);
        } else if (step === "phone") {
          await page.setViewportSize({ width: 390, height: 844 });
          await freshUpdates(page, 1);
          const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
          say("ok " + JSON.stringify({ overflow }));
        } else if (step === "problems") {
          say("ok " + JSON.stringify(problems));
        } else if (step === "quit") {
          say("ok");
          break;
        } else {
          say("error unknown step " + step);
        }
      } catch (e) {
        say("error " + String(e.message || e).split("\n")[0]);
      }
    }
  } finally {
    await browser.close();
  }
}

main().catch(e => {
  process.stdout.write("error " + String(e.message || e).split("\n")[0] + "\n");
  process.exit(1);
});
