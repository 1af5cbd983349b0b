// One page of the bridge in a real browser: open it, wait for what it must show, optionally click, and say
// what was seen (the DOM's text, every request the page made) with a screenshot.
//
// Drives Debian's chromium (chromium.mjs), as clickthrough.mjs does. Run by
// tests/stack/viewer.py's run_page:
//
//   node tests/browser/page.mjs '<json options>'
//
// Options: url, waitFor (a CSS selector that must appear), headers (sent with every request, e.g. an
// API key), click (a selector clicked once waitFor is there; a navigation it starts is waited for),
// afterClick (a selector that must appear afterwards), screenshot (a PNG path, written even when a
// step fails), chromium (executable path), timeoutMs.
// Prints one JSON line: {ok, status, title, text, after_text, requests, failed_requests, console_errors}.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { CHROMIUM_FLAGS, chromium } from './chromium.mjs';

const options = JSON.parse(process.argv[2] ?? '{}');
const timeout = options.timeoutMs ?? 30000;
const result = { ok: false, requests: [], failed_requests: [], console_errors: [] };
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'bridge-chromium-'));
let context;
let page;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: options.chromium ?? '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: { width: 1280, height: 800 },
    extraHTTPHeaders: options.headers ?? {},
    timeout,
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(timeout);
  page.on('request', request => result.requests.push(request.url()));
  page.on('requestfailed', request => result.failed_requests.push(request.url()));
  page.on('console', message => {
    if (message.type() === 'error') result.console_errors.push(message.text().slice(0, 300));
  });
  page.on('pageerror', error => result.console_errors.push(`page error: ${error.message.slice(0, 300)}`));

  const answer = await page.goto(options.url);
  result.status = answer ? answer.status() : null;
  if (options.waitFor) await page.locator(options.waitFor).first().waitFor({ state: 'visible' });
  result.title = await page.title();
  result.text = await page.evaluate(() => document.body.innerText);
  if (options.click) {
    const navigated = page.waitForNavigation({ waitUntil: 'load' }).catch(() => null);
    await page.locator(options.click).first().click();
    const after = await navigated;
    result.after_status = after ? after.status() : null;
    result.after_url = page.url();
    if (options.afterClick) await page.locator(options.afterClick).first().waitFor({ state: 'visible' });
    result.after_text = await page.evaluate(() => document.body.innerText);
  }
  result.ok = true;
} catch (error) {
  result.error = String(error && error.message ? error.message : error).slice(0, 1000);
  result.page_url = page ? page.url() : null;
} finally {
  if (page && options.screenshot) {
    try {
      await page.screenshot({ path: options.screenshot, fullPage: true });
      result.screenshot = options.screenshot;
    } catch (error) {
      result.screenshot_error = String(error).slice(0, 300);
    }
  }
  if (context) await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
