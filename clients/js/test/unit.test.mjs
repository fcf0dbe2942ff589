// The SDK's pure parts and its refusal of bad configuration (no gateway needed).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { GatewayDevice, backoffDelay, tokenExpiry } from '../src/index.js';

const WebSocketStandIn = function WebSocket() {}; // never called: construction only

const valid = () => ({
  url: 'ws://127.0.0.1:1/api/v1/ws/device',
  deviceId: 'laptop-1',
  getToken: async () => 'token',
  WebSocket: WebSocketStandIn,
});

test('back-off is full jitter over a capped exponential', () => {
  const options = { initialMs: 100, maxMs: 1000 };
  assert.equal(backoffDelay(0, options, () => 0), 0);
  assert.equal(backoffDelay(0, options, () => 0.5), 50);
  assert.equal(backoffDelay(3, options, () => 0.5), 400);
  // Capped: attempt 10 would be 102,400 ms uncapped.
  assert.equal(backoffDelay(10, options, () => 0.999999), 999);
  assert.equal(backoffDelay(1e6, options, () => 0.5), 500);
  // Spread, not synchronised: many devices after one gateway restart pick different delays.
  const delays = new Set(Array.from({ length: 200 }, () => backoffDelay(5, options)));
  assert.ok(delays.size > 100, `only ${delays.size} distinct delays of 200`);
});

test('tokenExpiry reads exp from the payload without verifying', () => {
  const payload = Buffer.from(JSON.stringify({ sub: 'u', exp: 2000000000 })).toString('base64url');
  assert.equal(tokenExpiry(`e30.${payload}.sig`), 2000000000 * 1000);
  const noExp = Buffer.from(JSON.stringify({ sub: 'u' })).toString('base64url');
  assert.equal(tokenExpiry(`e30.${noExp}.sig`), null);
  assert.equal(tokenExpiry('not-a-jwt'), null);
  assert.equal(tokenExpiry('a.%%%.c'), null);
  assert.equal(tokenExpiry(`e30.${Buffer.from('[1]').toString('base64url')}.sig`), null);
  assert.equal(tokenExpiry(undefined), null);
});

test('bad configuration is a TypeError at construction', () => {
  const cases = [
    [{ url: 'http://127.0.0.1/x' }, /url/],
    [{ url: 'not a url' }, /url/],
    [{ deviceId: '' }, /deviceId/],
    [{ deviceId: 'a\u0000b' }, /deviceId/],
    [{ deviceId: 'a\u0085b' }, /deviceId/],
    [{ deviceId: '   ' }, /deviceId/],
    [{ deviceId: 'x'.repeat(257) }, /deviceId/],
    [{ deviceId: 42 }, /deviceId/],
    [{ getToken: 'token' }, /getToken/],
    [{ tools: { echo: 'not a function' } }, /tools\.echo/],
    [{ agents: { bad: null } }, /agents\.bad/],
    [{ agents: Object.fromEntries(Array.from({ length: 257 }, (_, i) => [`a${i}`, async () => {}])) }, /at most 256/],
    [{ agents: { 'tab\there': async () => {} } }, /agent id/],
    [{ WebSocket: null }, /WebSocket/],
    [{ maxUnackedEvents: 0 }, /maxUnackedEvents/],
  ];
  const saved = globalThis.WebSocket;
  globalThis.WebSocket = undefined; // so that `WebSocket: null` cannot fall back to a global one
  try {
    for (const [override, message] of cases) {
      assert.throws(() => new GatewayDevice({ ...valid(), ...override }), (error) => {
        assert.ok(error instanceof TypeError, `${JSON.stringify(override)}: ${error}`);
        assert.match(error.message, message);
        return true;
      });
    }
    assert.throws(() => new GatewayDevice(null), TypeError);
  } finally {
    globalThis.WebSocket = saved;
  }
  const device = new GatewayDevice(valid());
  assert.equal(device.state, 'idle');
});

test('start() twice is refused; stop() before start() stops for good', () => {
  const device = new GatewayDevice(valid());
  device.stop();
  assert.equal(device.state, 'stopped');
  assert.throws(() => device.start(), /stopped/);
});
