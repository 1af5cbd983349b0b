// Debian's chromium as the browser tests drive it: playwright-core from the npm project in
// tests/stack/ohif (never a downloaded browser), and the flags a machine without network needs.
// Imported by clickthrough.mjs and page.mjs.

import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const { chromium } = await import(
  path.join(here, '..', 'stack', 'ohif', 'node_modules', 'playwright-core', 'index.mjs')
);

// The machine has no network: without these chromium waits on services it cannot reach.
export const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  // WebGL without a GPU: SwiftShader, which cornerstone's rendering needs.
  '--enable-unsafe-swiftshader',
  '--use-angle=swiftshader',
];
