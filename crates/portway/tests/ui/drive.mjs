// Drives the agent's local UI in Debian's headless Chromium, as a person would: one step
// per run, its result printed as JSON for the Rust test (crates/portway/tests/ui/mod.rs).
//
//   node drive.mjs BASE screens ID PATH DIR   the three pages, waited for and shot to DIR
//   node drive.mjs BASE replay ID             the detail's Replay button; the new entry
//   node drive.mjs BASE pause TUNNEL          the tunnel's Pause switch; its state after
import { chromium } from 'playwright-core';

const [base, step, ...args] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(15000);
  // A script error or a CSP refusal fails the step.
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Refused|Uncaught/.test(m.text())) errors.push(m.text());
  });
  let out = {};
  // The link portway prints: its token becomes the page's cookie.
  await page.goto(`${base}/?token=${process.env.PORTWAY_UI_TOKEN}`);
  if (step === 'screens') {
    const [id, path, dir] = args;
    await page.goto(`${base}/#/tunnels`);
    await page.waitForSelector('[data-tunnel][data-state="online"]');
    // The chart shows the request made before (a second's sample of it).
    await page.waitForFunction(() =>
      [...document.querySelectorAll('[data-tunnel] svg rect')]
        .some((r) => parseFloat(r.getAttribute('height') || '0') > 0));
    await page.screenshot({ path: `${dir}/tunnels.png`, fullPage: true });
    out.tunnels = await page.locator('[data-tunnel]').first().innerText();
    await page.goto(`${base}/#/inspect`);
    await page.waitForSelector(`[data-id="${id}"]`);
    out.row = await page.locator(`[data-id="${id}"]`).innerText();
    await page.screenshot({ path: `${dir}/inspector.png`, fullPage: true });
    await page.goto(`${base}/#/inspect/${id}`);
    await page.waitForSelector('pre.body');
    out.bodies = await page.locator('pre.body').allInnerTexts();
    out.page = await page.locator('main').innerText();
    await page.screenshot({ path: `${dir}/request.png`, fullPage: true });
    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: `${dir}/request-phone.png`, fullPage: true });
    out.path = path;
  } else if (step === 'replay') {
    const [id] = args;
    await page.goto(`${base}/#/inspect/${id}`);
    await page.waitForSelector('pre.body');
    await page.getByRole('button', { name: 'Replay', exact: true }).click();
    await page.waitForFunction((old) => {
      const m = location.hash.match(/^#\/inspect\/(\d+)$/);
      return m && m[1] !== old;
    }, id);
    out.hash = await page.evaluate(() => location.hash);
  } else if (step === 'pause') {
    const [tunnel] = args;
    await page.goto(`${base}/#/tunnels`);
    const card = page.locator(`[data-tunnel="${tunnel}"]`);
    await card.waitFor();
    const before = await card.getAttribute('data-state');
    await card.getByRole('button', { name: /pause/i }).click();
    const want = before === 'paused' ? 'online' : 'paused';
    await page.waitForSelector(`[data-tunnel="${tunnel}"][data-state="${want}"]`);
    out.state = want;
  } else {
    throw new Error(`unknown step ${step}`);
  }
  out.errors = errors;
  console.log(JSON.stringify(out));
} finally {
  await browser.close();
}
