// What the SDK tests share: where the real gateway is (from the environment the
// pytest wrapper tests/e2e/test_js_sdk.py sets), tokens, the internal API, and
// bounded waits. Nothing here imitates the gateway: every test talks to the
// real process.

import { createHmac, randomUUID } from 'node:crypto';

import { GatewayDevice } from '../src/index.js';

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through tests/e2e/test_js_sdk.py`);
  return value;
}

export const env = {
  get wsUrl() { return required('GW_WS_URL'); },
  get publicUrl() { return required('GW_PUBLIC_URL'); },
  get internalUrl() { return required('GW_INTERNAL_URL'); },
  get serviceToken() { return required('GW_SERVICE_TOKEN'); },
  get jwtSecret() { return required('GW_JWT_SECRET'); },
  get controlUrl() { return required('GW_CONTROL_URL'); },
};

/** Node 20 has no global WebSocket: the `ws` package (a dev dependency) stands in. */
export const WebSocketImpl = globalThis.WebSocket ?? (await import('ws')).WebSocket;

const base64url = (value) => Buffer.from(value).toString('base64url');

/** An HS256 device JWT for `sub`, as the app's backend would mint it. */
export function mintToken(sub, { ttlS = 3600, secret = env.jwtSecret } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const payload = base64url(JSON.stringify({ sub, iat: now, exp: now + ttlS }));
  const signature = createHmac('sha256', secret).update(`${header}.${payload}`).digest('base64url');
  return `${header}.${payload}.${signature}`;
}

export const newUser = () => `sdk-user-${randomUUID()}`;

/** One internal API request as a sibling service makes it. */
export async function api(method, path, body) {
  const response = await fetch(`${env.internalUrl}${path}`, {
    method,
    headers: { Authorization: `Bearer ${env.serviceToken}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

export const callTool = (userId, deviceId, tool, args = {}, extra = {}) =>
  api('POST', '/tool-calls', { user_id: userId, device_id: deviceId, tool, args, ...extra });

/** Poll `check` (bounded) until it returns something truthy, and return that. */
export async function waitFor(check, { timeoutMs = 10_000, intervalMs = 25, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what} not reached within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** The next `type` event of `target`, or a rejection after `timeoutMs`. */
export function nextEvent(target, type, { timeoutMs = 10_000, filter = () => true } = {}) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      target.removeEventListener(type, listener);
      reject(new Error(`no ${type} event within ${timeoutMs} ms`));
    }, timeoutMs);
    const listener = (event) => {
      if (!filter(event.detail)) return;
      clearTimeout(timer);
      target.removeEventListener(type, listener);
      resolve(event.detail);
    };
    target.addEventListener(type, listener);
  });
}

/** Every event of `type` the target fires from now on (details, in order). */
export function record(target, type) {
  const seen = [];
  target.addEventListener(type, (event) => seen.push(event.detail));
  return seen;
}

const started = new Set();

/** A started GatewayDevice for `userId` with test-friendly back-off; stopped by stopAll(). */
export function startDevice({ userId, deviceId = `dev-${randomUUID()}`, getToken, ...options }) {
  const device = new GatewayDevice({
    url: env.wsUrl,
    deviceId,
    getToken: getToken ?? (async () => mintToken(userId)),
    WebSocket: WebSocketImpl,
    backoff: { initialMs: 50, maxMs: 500, stableMs: 1000 },
    ...options,
  });
  const opened = nextEvent(device, 'open');
  device.start();
  started.add(device);
  return { device, deviceId, opened };
}

export function stopAll() {
  for (const device of started) device.stop();
  started.clear();
}

/** The run record once it has left pending/running. */
export async function finishedRun(runId, timeoutMs = 15_000) {
  return waitFor(async () => {
    const { status, body } = await api('GET', `/runs/${runId}`);
    if (status !== 200) throw new Error(`GET /runs/${runId}: ${status} ${JSON.stringify(body)}`);
    return ['completed', 'error', 'cancelled'].includes(body.status) ? body : null;
  }, { timeoutMs, what: `run ${runId} finished` });
}

/** The run's stored events (the NDJSON stream ends when the run has ended). */
export async function runEvents(runId) {
  const response = await fetch(`${env.internalUrl}/runs/${runId}/events`, {
    headers: { Authorization: `Bearer ${env.serviceToken}` },
  });
  const text = await response.text();
  if (response.status !== 200) throw new Error(`/runs/${runId}/events: ${response.status} ${text}`);
  return text.split('\n').filter(Boolean).map((line) => JSON.parse(line));
}

/** The user's devices as the gateway lists them. */
export async function devicesOf(userId) {
  const { body } = await api('GET', `/devices?user_id=${encodeURIComponent(userId)}`);
  return body.devices;
}

/** Ask the pytest side to act on the gateway process: 'kill' (SIGKILL), 'stop' (SIGTERM, drain) or 'start' (same ports). */
export async function controlGateway(action) {
  const response = await fetch(`${env.controlUrl}/${action}`, { method: 'POST' });
  const text = await response.text();
  if (response.status !== 200) throw new Error(`gateway ${action}: ${response.status} ${text}`);
}
