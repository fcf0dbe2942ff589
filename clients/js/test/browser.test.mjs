// The SDK in headless Chromium (Debian's chromium + chromium-driver, driven by
// Selenium): a page loads src/index.js as an ES module and uses the browser's
// own WebSocket; a service then calls a tool on it and starts a run it streams.

import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';

import chrome from 'selenium-webdriver/chrome.js';

import { api, callTool, env, finishedRun, mintToken, newUser, runEvents, waitFor } from './support.mjs';

const PACKAGE_ROOT = fileURLToPath(new URL('..', import.meta.url));
const SERVED = { '/src/index.js': 'src/index.js', '/page.html': 'test/browser/page.html' };
const TYPES = { '.js': 'text/javascript', '.html': 'text/html; charset=utf-8' };

let server;
let driver;
let profile;

/** A loopback HTTP server for the page and the SDK, nothing else. */
function serveStatic() {
  return new Promise((resolve) => {
    const instance = createServer((request, response) => {
      const path = SERVED[new URL(request.url, 'http://x').pathname];
      if (!path) {
        response.writeHead(404).end();
        return;
      }
      const body = readFileSync(normalize(join(PACKAGE_ROOT, path)));
      response.writeHead(200, { 'Content-Type': TYPES[path.slice(path.lastIndexOf('.'))] }).end(body);
    });
    instance.listen(0, '127.0.0.1', () => resolve(instance));
  });
}

before(async () => {
  server = await serveStatic();
  profile = mkdtempSync(join(tmpdir(), 'sdk-chromium-'));
  const options = new chrome.Options()
    .setChromeBinaryPath(process.env.CHROMIUM_BIN ?? '/usr/bin/chromium')
    .addArguments(
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--no-first-run', `--user-data-dir=${profile}`,
    );
  // An explicit driver path: Selenium then never looks for (or downloads) one itself.
  const service = new chrome.ServiceBuilder(process.env.CHROMEDRIVER_BIN ?? '/usr/bin/chromedriver');
  driver = chrome.Driver.createSession(options, service.build());
  await driver.getSession();
});

after(async () => {
  await driver?.quit();
  server?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

const pageLog = () => driver.executeScript('return window.sdkLog || []');

test('a page in headless Chromium answers a tool call and streams a run', async () => {
  const userId = newUser();
  const deviceId = 'chromium-renderer';
  const page = new URL(`http://127.0.0.1:${server.address().port}/page.html`);
  page.searchParams.set('ws', env.wsUrl);
  page.searchParams.set('token', mintToken(userId));
  page.searchParams.set('device', deviceId);
  await driver.get(page.toString());
  await waitFor(async () => (await pageLog()).some((entry) => entry.type === 'open'),
    { what: 'hello_ack in the page', timeoutMs: 20_000 });

  const { status, body } = await callTool(userId, deviceId, 'where', { from: 'service' });
  assert.equal(status, 200, JSON.stringify(body));
  assert.equal(body.ok, true);
  assert.deepEqual(body.result.args, { from: 'service' });
  assert.match(body.result.userAgent, /HeadlessChrome|Chrome/);
  assert.equal(body.result.origin, `http://127.0.0.1:${server.address().port}`);

  const created = await api('POST', '/runs', { user_id: userId, agent_id: 'ticker', input: { count: 50 } });
  assert.equal(created.status, 201, JSON.stringify(created.body));
  const run = await finishedRun(created.body.run_id);
  assert.equal(run.status, 'completed', JSON.stringify(run));
  assert.deepEqual(run.result, { ticks: 50 });
  const events = await runEvents(created.body.run_id);
  assert.deepEqual(events.map((event) => event.seq), Array.from({ length: 50 }, (_, i) => i + 1));
  assert.deepEqual(events.map((event) => event.data.tick), Array.from({ length: 50 }, (_, i) => i + 1));
  assert.ok(events.every((event) => event.data.from === 'browser'));

  const log = await pageLog();
  assert.deepEqual(log.filter((entry) => ['close', 'gateway-error'].includes(entry.type)), []);
  assert.ok(log.some((entry) => entry.type === 'run-end' && entry.detail.status === 'completed'));
});
