// The SDK against the real gateway process: tool calls, progress, cancel,
// runs, heartbeats, token refresh, close codes and a kill -9 of the gateway.
// Run through tests/e2e/test_js_sdk.py (it starts the gateway with
// GATEWAY_JWT_LEEWAY_S=0, GATEWAY_HEARTBEAT_S=1, GATEWAY_MAX_DEVICES_PER_USER=4
// and GATEWAY_RUN_RESUME_S=0).

import assert from 'node:assert/strict';
import { afterEach, describe, test } from 'node:test';

import {
  api, callTool, controlGateway, devicesOf, env, finishedRun, mintToken, newUser, nextEvent,
  record, runEvents, startDevice, stopAll, waitFor,
} from './support.mjs';

afterEach(stopAll);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

describe('tool calls', () => {
  test('a registered tool answers with its result', async () => {
    const userId = newUser();
    const { deviceId, opened } = startDevice({ userId, tools: { echo: async (args) => ({ echoed: args }) } });
    await opened;
    const { status, body } = await callTool(userId, deviceId, 'echo', { hi: [1, 'two'] });
    assert.equal(status, 200, JSON.stringify(body));
    assert.deepEqual(body, { call_id: body.call_id, device_id: deviceId, ok: true, result: { echoed: { hi: [1, 'two'] } } });
  });

  test('a tool that returns nothing answers null', async () => {
    const userId = newUser();
    const { deviceId, opened } = startDevice({ userId, tools: { quiet: async () => {} } });
    await opened;
    const { body } = await callTool(userId, deviceId, 'quiet');
    assert.equal(body.ok, true);
    assert.equal(body.result, null);
  });

  test('a tool that throws is a tool error with its code and message', async () => {
    const userId = newUser();
    const tools = {
      coded: async () => { throw Object.assign(new Error('disk full'), { code: 'enospc' }); },
      plain: async () => { throw new Error('plain failure'); },
    };
    const { deviceId, opened } = startDevice({ userId, tools });
    await opened;
    const coded = await callTool(userId, deviceId, 'coded');
    assert.deepEqual(coded.body.error, { code: 'enospc', message: 'disk full' });
    assert.equal(coded.body.ok, false);
    const plain = await callTool(userId, deviceId, 'plain');
    assert.deepEqual(plain.body.error, { code: 'tool_error', message: 'plain failure' });
  });

  test('an unknown tool is refused by the SDK with unknown_tool', async () => {
    const userId = newUser();
    const { deviceId, opened } = startDevice({ userId, tools: {} });
    await opened;
    const { body } = await callTool(userId, deviceId, 'nope');
    assert.equal(body.ok, false);
    assert.equal(body.error.code, 'unknown_tool');
  });

  test('a result larger than maxFrameBytes becomes result_too_large, not a 1009 close', async () => {
    const userId = newUser();
    const { device, deviceId, opened } = startDevice({
      userId, maxFrameBytes: 10_000, tools: { big: async () => 'x'.repeat(20_000) },
    });
    await opened;
    const closes = record(device, 'close');
    const { body } = await callTool(userId, deviceId, 'big');
    assert.equal(body.error.code, 'result_too_large');
    assert.deepEqual(closes, []);
  });

  test('tool_progress keeps a call alive past its timeout', async () => {
    const userId = newUser();
    const tools = {
      slow: async (args, { progress }) => {
        // 1.5 s of work with a 0.6 s timeout: only progress keeps the call alive.
        for (let step = 1; step <= 6; step += 1) {
          await sleep(250);
          progress(step / 6, `step ${step}`);
        }
        return 'done';
      },
    };
    const { deviceId, opened } = startDevice({ userId, tools });
    await opened;
    const { status, body } = await callTool(userId, deviceId, 'slow', {}, { timeout_s: 0.6 });
    assert.equal(status, 200, JSON.stringify(body));
    assert.equal(body.result, 'done');
  });

  test('tool_cancel aborts the tool through its AbortSignal', async () => {
    const userId = newUser();
    let aborted;
    const abortSeen = new Promise((resolve) => { aborted = resolve; });
    const tools = {
      forever: (args, { signal }) => new Promise((resolve, reject) => {
        signal.addEventListener('abort', () => {
          aborted(signal.reason);
          reject(signal.reason);
        });
      }),
    };
    const { device, deviceId, opened } = startDevice({ userId, tools: { ...tools, echo: async (args) => args } });
    await opened;
    const errors = record(device, 'gateway-error');
    const { status, body } = await callTool(userId, deviceId, 'forever', {}, { timeout_s: 0.3 });
    assert.equal(status, 504, JSON.stringify(body));
    const reason = await abortSeen;
    assert.equal(reason.name, 'AbortError');
    assert.equal(reason.reason, 'timeout');
    // No result was sent for the cancelled call (it would draw an unknown_call
    // error frame, which arrives before the answer to this next call).
    assert.deepEqual((await callTool(userId, deviceId, 'echo', { still: 'here' })).body.result, { still: 'here' });
    assert.deepEqual(errors, []);
  });
});

describe('agent runs', () => {
  test('an async generator agent streams its events and completes with its result', async () => {
    const userId = newUser();
    const agents = {
      count: async function* (input) {
        for (let n = 1; n <= input.to; n += 1) yield { n };
        return { total: input.to };
      },
    };
    const { opened } = startDevice({ userId, agents });
    await opened;
    const { status, body } = await api('POST', '/runs', { user_id: userId, agent_id: 'count', input: { to: 25 } });
    assert.equal(status, 201, JSON.stringify(body));
    const run = await finishedRun(body.run_id);
    assert.equal(run.status, 'completed', JSON.stringify(run));
    assert.deepEqual(run.result, { total: 25 });
    const events = await runEvents(body.run_id);
    assert.deepEqual(events.map((event) => event.seq), Array.from({ length: 25 }, (_, i) => i + 1));
    assert.deepEqual(events.map((event) => event.data.n), Array.from({ length: 25 }, (_, i) => i + 1));
  });

  test('an emit-style agent that throws ends the run as error with its message', async () => {
    const userId = newUser();
    const agents = {
      fragile: async (input, { emit }) => {
        await emit({ step: 1 });
        await emit({ step: 2 });
        throw new Error('model unavailable');
      },
    };
    const { opened } = startDevice({ userId, agents, eventAcks: true });
    await opened;
    const { body } = await api('POST', '/runs', { user_id: userId, agent_id: 'fragile', input: {} });
    const run = await finishedRun(body.run_id);
    assert.equal(run.status, 'error');
    assert.deepEqual(run.errors, ['model unavailable']);
    assert.deepEqual((await runEvents(body.run_id)).map((event) => event.data), [{ step: 1 }, { step: 2 }]);
  });

  test('a run created before the device connects is dispatched at hello', async () => {
    const userId = newUser();
    const deviceId = 'late-laptop';
    const { body } = await api('POST', '/runs', { user_id: userId, agent_id: 'hello', input: 'world', device_id: deviceId });
    assert.equal(body.status, 'pending');
    startDevice({ userId, deviceId, agents: { hello: async (input) => `hello ${input}` } });
    const run = await finishedRun(body.run_id);
    assert.equal(run.status, 'completed');
    assert.equal(run.result, 'hello world');
  });

  test('agent_cancel aborts the agent: its signal fires and emit() throws', async () => {
    const userId = newUser();
    let started;
    const running = new Promise((resolve) => { started = resolve; });
    let finished;
    const outcome = new Promise((resolve) => { finished = resolve; });
    const agents = {
      endless: async (input, { emit, signal }) => {
        started();
        try {
          for (let n = 0; ; n += 1) {
            await emit({ n });
            await sleep(20);
          }
        } catch (error) {
          finished({ error, aborted: signal.aborted, reason: signal.reason });
          throw error;
        }
      },
    };
    const { device, opened } = startDevice({ userId, agents });
    await opened;
    const { body } = await api('POST', '/runs', { user_id: userId, agent_id: 'endless', input: {} });
    await running;
    const cancel = await api('POST', `/runs/${body.run_id}/cancel`);
    assert.equal(cancel.status, 200);
    const result = await outcome;
    assert.equal(result.aborted, true);
    assert.equal(result.error.name, 'AbortError');
    assert.equal(typeof result.reason.reason, 'string');
    assert.equal((await finishedRun(body.run_id)).status, 'cancelled');
    // The SDK sent no agent_complete for the cancelled run (that would draw run_finished).
    const errors = record(device, 'gateway-error');
    await callTool(userId, device.deviceId, 'none'); // one round trip after the cancel
    assert.deepEqual(errors, []);
  });

  test('an event that is not JSON is refused to the agent, not sent', async () => {
    const userId = newUser();
    const agents = {
      sloppy: async (input, { emit }) => {
        await emit({ fine: true });
        await emit(undefined);
      },
      cyclic: async (input, { emit }) => {
        const value = {};
        value.self = value;
        await emit(value);
      },
    };
    const { device, opened } = startDevice({ userId, agents });
    await opened;
    const errors = record(device, 'gateway-error');
    for (const [agentId, events, message] of [['sloppy', 1, /not undefined/], ['cyclic', 0, /circular/i]]) {
      const { body } = await api('POST', '/runs', { user_id: userId, agent_id: agentId, input: {} });
      const run = await finishedRun(body.run_id);
      assert.equal(run.status, 'error');
      assert.match(run.errors[0], message);
      assert.equal(run.event_count, events);
    }
    assert.deepEqual(errors, []);
  });

  test('an event larger than maxFrameBytes is refused to the agent, not sent', async () => {
    const userId = newUser();
    const agents = {
      huge: async (input, { emit }) => {
        await emit('small');
        await emit('x'.repeat(5000));
      },
    };
    const { opened } = startDevice({ userId, agents, maxFrameBytes: 1000 });
    await opened;
    const { body } = await api('POST', '/runs', { user_id: userId, agent_id: 'huge', input: {} });
    const run = await finishedRun(body.run_id);
    assert.equal(run.status, 'error');
    assert.match(run.errors[0], /exceeds 1000 bytes/);
    assert.equal(run.event_count, 1);
  });
});

describe('connection', () => {
  test('the device answers the gateway ping and its own ping is answered', async () => {
    const pongs = async () => {
      const text = await (await fetch(`${env.publicUrl}/metrics`)).text();
      const line = text.split('\n').find((l) => l.startsWith('gateway_frames_received_total{type="pong"}'));
      return line ? Number(line.split(' ')[1]) : 0;
    };
    const pings = async () => {
      const text = await (await fetch(`${env.publicUrl}/metrics`)).text();
      const line = text.split('\n').find((l) => l.startsWith('gateway_frames_received_total{type="ping"}'));
      return line ? Number(line.split(' ')[1]) : 0;
    };
    const before = { pongs: await pongs(), pings: await pings() };
    const userId = newUser();
    const { device, opened } = startDevice({ userId });
    await opened;
    await waitFor(async () => (await pongs()) > before.pongs, { what: 'a pong from the device' });
    await waitFor(async () => (await pings()) > before.pings, { what: 'a ping from the device' });
    assert.equal(device.state, 'open');
  });

  test('the token is refreshed with auth_refresh before it expires: no reconnect', async () => {
    const userId = newUser();
    let tokens = 0;
    const { device, deviceId, opened } = startDevice({
      userId,
      refreshMarginMs: 1500,
      getToken: async () => { tokens += 1; return mintToken(userId, { ttlS: 3 }); },
    });
    const { connectionId } = await opened;
    const closes = record(device, 'close');
    const refreshed = record(device, 'token-refreshed');
    const errors = record(device, 'gateway-error');
    // Three refreshes take past the first token's exp (3 s, no leeway).
    await waitFor(() => refreshed.length >= 3, { what: 'three refreshes', timeoutMs: 15_000 });
    await sleep(1000);
    assert.deepEqual(closes, []);
    assert.deepEqual(errors, []);
    assert.ok(tokens >= 4);
    const [listed] = await devicesOf(userId);
    assert.equal(listed.device_id, deviceId);
    assert.equal(listed.connection_id, connectionId);
    assert.equal((await callTool(userId, deviceId, 'x')).body.error.code, 'unknown_tool');
  });

  test('4001 (token expired): a fresh token from getToken(), then a reconnect', async () => {
    const userId = newUser();
    let tokens = 0;
    const { device, opened } = startDevice({
      userId,
      refreshMarginMs: 0, // no refresh: let it expire
      getToken: async () => { tokens += 1; return mintToken(userId, { ttlS: 2 }); },
    });
    const first = await opened;
    const close = await nextEvent(device, 'close');
    assert.equal(close.code, 4001);
    assert.equal(close.willReconnect, true);
    const second = await nextEvent(device, 'open');
    assert.notEqual(second.connectionId, first.connectionId);
    assert.equal(tokens, 2);
  });

  test('a refused handshake (401, seen as 1006) makes the SDK ask getToken() again', async () => {
    const userId = newUser();
    const tokens = [];
    const { device, opened } = startDevice({
      userId,
      tokenRetryAfter: 3,
      getToken: async () => {
        // The first token is signed with the wrong key: the gateway answers 401.
        const token = tokens.length === 0 ? mintToken(userId, { secret: 'not-the-gateway-secret' }) : mintToken(userId);
        tokens.push(token);
        return token;
      },
    });
    const closes = record(device, 'close');
    await opened;
    assert.equal(tokens.length, 2);
    assert.equal(closes.length, 3);
    for (const close of closes) assert.equal(close.code, 1006);
  });

  test('4000 (replaced): the old connection stops for good, the new one stays', async () => {
    const userId = newUser();
    const deviceId = 'shared-id';
    const old = startDevice({ userId, deviceId });
    await old.opened;
    const oldClose = nextEvent(old.device, 'close');
    const stopped = nextEvent(old.device, 'stopped');
    const replacement = startDevice({ userId, deviceId });
    const { connectionId } = await replacement.opened;
    assert.equal((await oldClose).code, 4000);
    assert.equal((await oldClose).willReconnect, false);
    assert.equal((await stopped).reason, 'replaced');
    assert.equal(old.device.state, 'stopped');
    await sleep(700); // longer than the test back-off: a reconnect would have replaced it back
    const listed = await devicesOf(userId);
    assert.equal(listed.length, 1);
    assert.equal(listed[0].connection_id, connectionId);
  });

  test('4002 (too many devices): retried with back-off until a device leaves', async () => {
    const userId = newUser();
    const four = Array.from({ length: 4 }, () => startDevice({ userId }));
    await Promise.all(four.map((entry) => entry.opened));
    const fifth = startDevice({ userId });
    const close = await nextEvent(fifth.device, 'close');
    assert.equal(close.code, 4002);
    assert.equal(close.willReconnect, true);
    four[0].device.stop();
    await fifth.opened;
    const ids = (await devicesOf(userId)).map((entry) => entry.device_id).sort();
    assert.deepEqual(ids, [...four.slice(1).map((entry) => entry.deviceId), fifth.deviceId].sort());
  });

  test('kill -9 of the gateway: the device reconnects to the restarted one; its run is ended', async () => {
    const userId = newUser();
    let runSignal;
    const runStarted = new Promise((resolve) => { runSignal = resolve; });
    const agents = {
      long: async (input, { emit, signal }) => {
        runSignal(signal);
        for (let n = 0; ; n += 1) {
          await emit({ n });
          await sleep(50);
        }
      },
    };
    const { device, deviceId, opened } = startDevice({ userId, agents, tools: { echo: async (args) => args } });
    await opened;
    const { body } = await api('POST', '/runs', { user_id: userId, agent_id: 'long', input: {} });
    const signal = await runStarted;
    await sleep(200);
    const closed = nextEvent(device, 'close');
    await controlGateway('kill');
    assert.equal((await closed).code, 1006);
    const reopened = nextEvent(device, 'open', { timeoutMs: 30_000 });
    await controlGateway('start');
    const { runs } = await reopened;
    // GATEWAY_RUN_RESUME_S=0 (revision .4 behaviour): the restarted gateway ended the run.
    assert.deepEqual(runs, []);
    assert.equal(signal.aborted, true);
    assert.equal(signal.reason.reason, 'run_lost');
    assert.equal((await finishedRun(body.run_id)).status, 'error');
    const { body: call } = await callTool(userId, deviceId, 'echo', { after: 'restart' });
    assert.deepEqual(call.result, { after: 'restart' });
  });
});
