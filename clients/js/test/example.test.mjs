// The README's "For device authors" example (examples/echo-device.mjs), run
// exactly as written in its own process, answers a tool call from a service.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';

import { callTool, devicesOf, env, mintToken, newUser, waitFor } from './support.mjs';

const example = fileURLToPath(new URL('../examples/echo-device.mjs', import.meta.url));
const preload = fileURLToPath(new URL('./global-websocket.mjs', import.meta.url));

test('the README example answers a tool call', async () => {
  const userId = newUser();
  const child = spawn(process.execPath, ['--import', preload, example], {
    env: { ...process.env, GATEWAY_WS_URL: env.wsUrl, DEVICE_TOKEN: mintToken(userId) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.on('data', (chunk) => { output += chunk; });
  child.stderr.on('data', (chunk) => { output += chunk; });
  try {
    await waitFor(async () => {
      if (child.exitCode !== null) throw new Error(`example exited ${child.exitCode}: ${output}`);
      return (await devicesOf(userId)).some((device) => device.device_id === 'laptop-1');
    }, { what: 'the example device online' });
    const { status, body } = await callTool(userId, 'laptop-1', 'echo', { hello: 'device' });
    assert.equal(status, 200, output);
    assert.deepEqual(body.result, { hello: 'device' });
  } finally {
    child.kill();
  }
});
