// A clinician's click-through in a real browser: record page -> "Open images" -> resolver 302 -> OHIF.
//
// Drives Debian's chromium (never a downloaded browser) with playwright-core from the npm project
// in tests/stack/ohif. Run by tests/integration/test_clickthrough.py:
//
//   node tests/browser/clickthrough.mjs '<json options>'
//
// Options: recordUrl (the patient's record page), startUrl (where to begin, e.g. an EHR launch; default
// recordUrl), study (the description of the row to click),
// series (series descriptions OHIF must list), screenshotDir, chromium (executable path),
// timeoutMs; with authentication on, login ({username, password}: the record page sends the browser
// to the identity provider's form, which is filled in) and forbiddenUrl (a page of another patient,
// opened last in the same session; its status is reported).
// Prints one JSON line with what it saw; exits 1 with {"error": ...} when a step fails.
// Screenshots (record.png, viewer.png) are written even when a later step fails.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { CHROMIUM_FLAGS, chromium } from './chromium.mjs';

const options = JSON.parse(process.argv[2] ?? '{}');
const timeout = options.timeoutMs ?? 60000;
const result = { steps: [], console_errors: [] };
const started = Date.now();
const step = name => result.steps.push({ name, ms: Date.now() - started });

function fail(message) {
  const error = new Error(message);
  error.expected = true;
  throw error;
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'bridge-chromium-'));
let context;
let page;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: options.chromium ?? '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: { width: 1280, height: 800 },
    timeout,
  });
  step('browser started');
  page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(timeout);
  page.on('console', message => {
    if (message.type() === 'error') result.console_errors.push(message.text().slice(0, 300));
  });
  page.on('pageerror', error => result.console_errors.push(`page error: ${error.message.slice(0, 300)}`));
  // Every study the viewer learns of through a study-level QIDO-RS search (its "other studies").
  result.qido_study_searches = [];
  page.on('response', async response => {
    const url = new URL(response.url());
    if (!/\/studies$/.test(url.pathname) || response.request().method() !== 'GET') return;
    try {
      const rows = await response.json();
      result.qido_study_searches.push({
        by_patient_id: url.searchParams.has('00100020') || url.searchParams.has('PatientID'),
        study_uids: rows.map(row => row['0020000D']?.Value?.[0]).filter(Boolean),
      });
    } catch {
      // not a DICOM JSON answer: nothing listed from it
    }
  });

  // 1. The record page, as the clinician sees it (after logging in, when authentication is on).
  let record = await page.goto(options.startUrl ?? options.recordUrl);
  if (options.login) {
    result.login_page = new URL(page.url()).origin;
    await page.locator('input[name="username"]').fill(options.login.username);
    await page.locator('input[name="password"]').fill(options.login.password);
    const back = page.waitForResponse(
      response => response.url() === options.recordUrl && response.request().isNavigationRequest(),
    );
    await page.locator('button[type="submit"]').click();
    record = await back;
    result.cookies = (await context.cookies()).map(c => ({
      name: c.name,
      httpOnly: c.httpOnly,
      sameSite: c.sameSite,
      secure: c.secure,
      path: c.path,
    }));
    step('logged in at the identity provider');
  }
  if (!record || record.status() !== 200) fail(`record page answered ${record && record.status()}`);
  result.record_title = await page.title();
  const row = page.locator('tr.study', { has: page.locator('td.description', { hasText: options.study }) });
  if ((await row.count()) !== 1) fail(`expected one row for the study, found ${await row.count()}`);
  result.record_rows = await page.locator('tr.study').count();
  // Thumbnails are loaded through the bridge's redirect to WADO-RS rendered.
  await page.waitForFunction(
    () => [...document.querySelectorAll('img.thumb')].every(img => img.complete),
    null,
    { timeout },
  );
  result.thumbnails_loaded = await page.evaluate(
    () => [...document.querySelectorAll('img.thumb')].filter(img => img.naturalWidth > 0).length,
  );
  await page.screenshot({ path: path.join(options.screenshotDir, 'record.png') });
  step('record page shown');

  // 2. One click: the resolver answers 302 to the viewer, and the browser follows it.
  const link = row.locator('a.open-images');
  result.link_href = await link.getAttribute('href');
  const redirect = page.waitForResponse(
    response => response.url().includes('/imaging-studies/') && response.url().endsWith('/viewer'),
  );
  await link.click();
  const answer = await redirect;
  result.redirect = { status: answer.status(), location: (await answer.allHeaders()).location ?? null };
  await page.waitForURL(url => url.pathname === '/viewer', { timeout });
  result.viewer_url = page.url();
  step('followed the redirect into OHIF');

  // 3. The study's series are listed in OHIF's study browser.
  await page.waitForFunction(
    wanted => {
      const labels = [...document.querySelectorAll('[data-cy="series-description-label"]')].map(e =>
        e.textContent.trim(),
      );
      return wanted.every(description => labels.includes(description));
    },
    options.series,
    { timeout },
  );
  result.series_listed = await page.evaluate(() =>
    [...document.querySelectorAll('[data-cy="study-browser-thumbnail"]')].map(thumb => ({
      modality: thumb.querySelector('[data-cy="series-modality-label"]')?.textContent.trim() ?? null,
      description: thumb.querySelector('[data-cy="series-description-label"]')?.textContent.trim() ?? null,
    })),
  );
  step('series listed');

  // 4. An image is drawn: the viewport's canvas holds a picture, not a blank field.
  const measure = () => {
    const canvas = document.querySelector('[data-cy="viewport-pane"] canvas.cornerstone-canvas');
    if (!canvas || canvas.width === 0 || canvas.height === 0) return null;
    const copy = document.createElement('canvas');
    copy.width = canvas.width;
    copy.height = canvas.height;
    const ctx = copy.getContext('2d', { willReadFrequently: true });
    ctx.drawImage(canvas, 0, 0);
    const { data } = ctx.getImageData(0, 0, copy.width, copy.height);
    let lit = 0;
    const levels = new Set();
    for (let i = 0; i < data.length; i += 4) {
      const grey = Math.round((data[i] + data[i + 1] + data[i + 2]) / 3);
      if (grey > 8) lit += 1;
      levels.add(grey);
    }
    const pixels = data.length / 4;
    return { width: copy.width, height: copy.height, lit_fraction: lit / pixels, grey_levels: levels.size };
  };
  await page.waitForFunction(
    `(${measure})() !== null && (${measure})().lit_fraction > 0.05 && (${measure})().grey_levels > 16`,
    null,
    { timeout, polling: 250 },
  );
  result.canvas = await page.evaluate(measure);
  result.overlay = await page.evaluate(
    () => document.querySelector('[data-cy="viewport-overlay-top-left"]')?.innerText.split('\n') ?? [],
  );
  result.webgl = await page.evaluate(() => {
    const gl = document.createElement('canvas').getContext('webgl2');
    const info = gl && gl.getExtension('WEBGL_debug_renderer_info');
    return gl ? (info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.VERSION)) : null;
  });
  step('image drawn');
  // The study browser's search for the patient's other studies has been answered.
  const deadline = Date.now() + 15000;
  while (!result.qido_study_searches.some(q => q.by_patient_id) && Date.now() < deadline) {
    await page.waitForTimeout(250);
  }
  await page.screenshot({ path: path.join(options.screenshotDir, 'viewer.png') });
  if (options.forbiddenUrl) {
    // 5. The same session asks for another patient's study.
    const refused = await page.goto(options.forbiddenUrl);
    result.forbidden_status = refused ? refused.status() : null;
    step('another patient refused');
  }
  result.ok = true;
} catch (error) {
  result.ok = false;
  result.error = error.expected ? error.message : String(error.stack ?? error).slice(0, 2000);
  if (page) {
    try {
      result.page_url = page.url();
      await page.screenshot({ path: path.join(options.screenshotDir, 'failure.png') });
    } catch {
      // the browser itself is gone; the error above says why
    }
  }
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(profile, { recursive: true, force: true });
}
result.total_ms = Date.now() - started;
process.stdout.write(JSON.stringify(result) + '\n');
process.exit(result.ok ? 0 : 1);
