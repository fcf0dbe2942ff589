// PROTOCOL §1.8 (revision .5): runs survive reconnects and gateway restarts,
// and with event_acks every event is stored exactly once. Needs a gateway that
// implements §1.8: tests/e2e/test_js_sdk.py runs this file only with
// GATEWAY_TEST_CONTINUITY=1 (or CONTINUITY_LANDED = True there), on a gateway
// with GATEWAY_RUN_RESUME_S=30.

import assert from 'node:assert/strict';
import { afterEach, test } from 'node:test';

import {
  api, controlGateway, finishedRun, newUser, nextEvent, runEvents, startDevice, stopAll, waitFor,
} from './support.mjs';

afterEach(stopAll);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const range = (count) => Array.from({ length: count }, (_, i) => i + 1);

/** An agent emitting {n} for n = 1..input.count, one every input.everyMs, and what it saw. */
function countingAgent() {
  const seen = { aborted: null, emitted: 0 };
  const agent = async (input, { emit, signal }) => {
    signal.addEventListener('abort', () => { seen.aborted = signal.reason; });
    for (let n = 1; n <= input.count; n += 1) {
      await emit({ n });
      seen.emitted = n;
      await sleep(input.everyMs);
    }
    return { count: input.count };
  };
  return { agent, seen };
}

async function storedCount(runId) {
  const { body } = await api('GET', `/runs/${runId}`);
  return body.event_count;
}

for (const [how, action] of [['kill -9', 'kill'], ['a drain (SIGTERM)', 'stop']]) {
  test(`after ${how} and a restart the run resumes: every event stored exactly once`, async () => {
    const userId = newUser();
    const { agent, seen } = countingAgent();
    const { device, opened } = startDevice({ userId, eventAcks: true, agents: { count: agent } });
    assert.equal((await opened).eventAcks, true, 'the gateway acknowledges events');
    const count = 120;
    const { body } = await api('POST', '/runs', { user_id: userId, agent_id: 'count', input: { count, everyMs: 15 } });
    const runId = body.run_id;
    await waitFor(async () => (await storedCount(runId)) >= 20, { what: '20 events stored' });
    const closed = nextEvent(device, 'close');
    await controlGateway(action);
    await closed;
    const emittedWhileDown = seen.emitted;
    const reopened = nextEvent(device, 'open', { timeoutMs: 30_000 });
    await controlGateway('start');
    const { runs } = await reopened;
    assert.deepEqual(runs, [runId]);
    const run = await finishedRun(runId, 30_000);
    assert.equal(run.status, 'completed', JSON.stringify(run));
    assert.deepEqual(run.result, { count });
    const events = await runEvents(runId);
    assert.deepEqual(events.map((event) => event.seq), range(count));
    assert.deepEqual(events.map((event) => event.data.n), range(count));
    assert.equal(seen.aborted, null, 'the agent kept running across the reconnect');
    assert.ok(emittedWhileDown >= 20);
    await waitFor(() => device.pendingEvents === 0, { what: 'every event acked' });
  });
}

test('event_acks bound the events a run keeps: emit() waits for acks', async () => {
  const userId = newUser();
  let device;
  let most = 0;
  const agents = {
    burst: async (input, { emit }) => {
      for (let n = 1; n <= input.count; n += 1) {
        await emit({ n, pad: 'x'.repeat(100) });
        most = Math.max(most, device.pendingEvents);
      }
    },
  };
  const started = startDevice({ userId, eventAcks: true, maxUnackedEvents: 8, agents });
  device = started.device;
  assert.equal((await started.opened).eventAcks, true, 'the gateway acknowledges events');
  const { body } = await api('POST', '/runs', { user_id: userId, agent_id: 'burst', input: { count: 500 } });
  const run = await finishedRun(body.run_id);
  assert.equal(run.status, 'completed');
  assert.equal(run.event_count, 500);
  assert.ok(most <= 8, `${most} events were kept unacked (cap 8)`);
  assert.ok(most >= 1);
});

test('a replacement inherits the run; an SDK that does not know it ends it as error', async () => {
  const userId = newUser();
  const deviceId = 'replaced-laptop';
  const { agent, seen } = countingAgent();
  const first = startDevice({ userId, deviceId, eventAcks: true, agents: { count: agent } });
  await first.opened;
  const { body } = await api('POST', '/runs', { user_id: userId, agent_id: 'count', input: { count: 10_000, everyMs: 20 } });
  await waitFor(async () => (await storedCount(body.run_id)) >= 3, { what: '3 events stored' });
  // The app restarted: a new SDK instance, same device id, knows nothing of the run.
  const second = startDevice({ userId, deviceId, eventAcks: true, agents: { count: agent } });
  const lost = nextEvent(second.device, 'run-lost');
  const { runs } = await second.opened;
  assert.deepEqual(runs, [body.run_id]);
  assert.equal((await lost).runId, body.run_id);
  const run = await finishedRun(body.run_id);
  assert.equal(run.status, 'error');
  assert.deepEqual(run.errors, ['device lost the run (restarted)']);
  await waitFor(() => seen.aborted !== null, { what: 'the replaced instance aborted its agent' });
  assert.equal(seen.aborted.reason, 'replaced');
});
